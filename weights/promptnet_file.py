"""The PromptNet file format, its validation, and the converter from ProFusion's published layout.

Pack format (safetensors): the PromptNet state dict in the host's LDM key layout (encoders/promptnet.py) with
metadata: likeness_format "promptnet", version 1, base_model, unet_config (JSON), vision_width, prompt_width,
prompt_widths (one per text encoder, ascending; SDXL [768, 1280]; files without it have one), latent_size,
region_channels.

ProFusion's checkpoint (drboog/ProFusion, diffusers/src/diffusers/models/promptnet.py) is a diffusers model
folder: config.json plus weights in diffusers naming (conv_in, time_embedding, down_blocks.*, mid_block.*,
promptnet_cond_embedding.*, vision_embedding, first_prompt_projection, down_prompt_projections.*,
mid_prompt_projection, region_prompt_output; residual_projections* are multiplied by zero there and dropped here).
The published weights are pickled .bin files: weights/promptnet_diffusers.py reads them through the host's
restricted (weights-only) loader and converts them on load; scripts/convert_promptnet.py does the same offline.
"""
import logging

from ..encoders.promptnet import PromptNet
from .safetensors_file import WeightFileError, check_tensors, load_file, read_header, register_format, save_file

log = logging.getLogger("likeness")

FORMAT, VERSION = "promptnet", 1
WHAT = "PromptNet file"
register_format(FORMAT, WHAT)
CONFIG_KEYS = ("model_channels", "in_channels", "out_channels", "num_res_blocks", "channel_mult", "transformer_depth",
               "transformer_depth_output", "transformer_depth_middle", "context_dim", "use_linear_in_transformer",
               "adm_in_channels", "use_temporal_attention", "use_temporal_resblock", "image_size",
               "use_spatial_transformer", "legacy", "use_checkpoint", "num_heads", "num_head_channels", "num_classes")
FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


def portable_config(unet_config: dict) -> dict:
    return {k: unet_config[k] for k in CONFIG_KEYS if k in unet_config}


def promptnet_meta(net: PromptNet, base_model: str = "", extra: dict | None = None) -> dict:
    """The metadata a PromptNet file carries (and a loaded PromptNet is described by)."""
    return {"method": "ProFusion PromptNet", "base_model": base_model or FAMILIES.get(net.unet_config["context_dim"], ""),
            "unet_config": portable_config(net.unet_config), "vision_width": net.vision_width,
            "prompt_width": net.prompt_width, "prompt_widths": net.prompt_widths, "latent_size": net.latent_size,
            "region_channels": net.region_channels, **(extra or {})}


def save_promptnet(path: str, net: PromptNet, base_model: str = "", extra: dict | None = None):
    return save_file(path, net.state_dict(), FORMAT, VERSION, promptnet_meta(net, base_model, extra))


def build_from_metadata(meta: dict, path: str = "file") -> PromptNet:
    try:
        widths = meta.get("prompt_widths") or int(meta["prompt_width"])   # one width per text encoder (SDXL: two)
        return PromptNet(meta["unet_config"], int(meta["vision_width"]), widths,
                         int(meta.get("latent_size", 64)), int(meta.get("region_channels", 128)))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightFileError(f"'{path}' has incomplete PromptNet metadata ({e}); re-create it with the converter") from e


def load_promptnet(path: str) -> tuple[PromptNet, dict]:
    tensors, meta = load_file(path, FORMAT, (VERSION,), WHAT)
    net = build_from_metadata(meta, path)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    check_tensors(path, tensors, expected, WHAT)
    net.load_state_dict(tensors)
    net.eval().requires_grad_(False)
    return net, meta


def promptnet_metadata(path: str) -> dict:
    meta, _ = read_header(path, WHAT)
    return meta


def check_fits(meta: dict, context_dim: int | None = None, vision_width: int | None = None, name: str = "PromptNet"):
    """Plain-words errors for a PromptNet used with the wrong base model or CLIP vision."""
    own_ctx = int(meta["unet_config"]["context_dim"])
    if context_dim is not None and own_ctx != context_dim:
        raise ValueError(f"{name} was made for {FAMILIES.get(own_ctx, 'a model')} (cross-attention {own_ctx}) but the "
                         f"model is {FAMILIES.get(context_dim, 'another family')} ({context_dim})")
    if vision_width is not None and int(meta["vision_width"]) != vision_width:
        raise ValueError(f"{name} expects CLIP-vision tokens {meta['vision_width']} wide (ProFusion: OpenCLIP ViT-H/14, "
                         f"1280) but the connected CLIP vision gives {vision_width}")


def unet_config_from_diffusers(config: dict) -> dict:
    """The host's UNet config for a diffusers PromptNet config.json (down blocks + mid block only)."""
    boc = list(config.get("block_out_channels", (160, 320, 640, 640)))
    types = list(config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    layers = int(config.get("layers_per_block", 2))
    base = boc[0]
    if any(c % base for c in boc):
        raise ValueError(f"block_out_channels {boc} are not multiples of the first one")
    depth = [1 if "CrossAttn" in t else 0 for t in types]
    heads = config.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        # Old diffusers configs store the number of heads per block; LDM wants channels per head (constant).
        per_head = {c // h for c, h in zip(boc, heads)}
        if len(per_head) != 1:
            raise ValueError(f"attention_head_dim {heads} gives different head widths per block")
        num_heads, num_head_channels = -1, per_head.pop()
    else:
        num_heads, num_head_channels = int(heads), -1
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    return {
        "model_channels": base, "in_channels": int(config.get("in_channels", 4)), "out_channels": 4,
        "num_res_blocks": [layers] * len(boc), "channel_mult": [c // base for c in boc],
        "transformer_depth": [d for d in depth for _ in range(layers)],
        "transformer_depth_output": [d for d in depth for _ in range(layers + 1)],
        "transformer_depth_middle": 1 if mid and "CrossAttn" in mid else -2,
        "context_dim": int(config.get("cross_attention_dim", 1024)),
        "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
        "image_size": 32, "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
        "num_heads": num_heads, "num_head_channels": num_head_channels,
    }


def convert_diffusers_promptnet(state_dict: dict, config: dict) -> PromptNet:
    """A PromptNet from ProFusion's diffusers-layout weights and config.json."""
    import comfy.utils

    unet_config = unet_config_from_diffusers(config)
    vision_width = int(state_dict["vision_embedding.weight"].shape[1]) if "vision_embedding.weight" in state_dict \
        else (1280 if config.get("use_clip_vision_embeds") else 1024)
    net = PromptNet(unet_config, vision_width, int(config.get("prompt_channel", 1024)),
                    int(config.get("sample_size") or 64), int(config.get("region_proj_channel", 128)))
    kernel = config.get("region_kernel_size")
    if kernel is not None and int(kernel) != net.grid:
        raise ValueError(f"region_kernel_size {kernel} does not match the {net.grid}x{net.grid} grid this layout gives "
                         f"at sample_size {net.latent_size}")
    levels = len(unet_config["channel_mult"])
    names = dict(comfy.utils.unet_to_diffusers({**unet_config, "transformer_depth_middle": max(unet_config["transformer_depth_middle"], 0)}))
    names.update({
        "promptnet_cond_embedding.conv_in": "cond_embedding.conv_in",
        "promptnet_cond_embedding.conv_out": "cond_embedding.conv_out",
        "vision_embedding": "vision_proj", "first_prompt_projection": "projections.0",
        "mid_prompt_projection": f"projections.{levels + 1}", "region_prompt_output": "head",
        **{f"down_prompt_projections.{i}": f"projections.{i + 1}" for i in range(levels)},
    })
    own = net.state_dict()
    converted, dropped = {}, []
    for key, value in state_dict.items():
        target = names.get(key)
        if target is None:
            stem, _, leaf = key.rpartition(".")
            target = names.get(stem) and f"{names[stem]}.{leaf}"
        if target is None or target not in own:
            dropped.append(key)
            continue
        converted[target] = value
    unused = [k for k in dropped if "residual_projection" not in k]
    if unused:
        raise ValueError(f"{len(unused)} weights of the checkpoint have no place in PromptNet (e.g. {', '.join(unused[:3])}); "
                         "is this a ProFusion PromptNet?")
    missing = [k for k in own if k not in converted]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} PromptNet weights (e.g. {', '.join(missing[:3])})")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(converted[k].shape)]
    if wrong:
        raise ValueError(f"shape mismatch for {wrong[0]}: {tuple(converted[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}")
    net.load_state_dict(converted)
    if dropped:
        log.info("PromptNet converter: dropped %d residual-projection weights (unused by ProFusion)", len(dropped))
    return net
