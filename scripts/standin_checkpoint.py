"""Write a small stand-in checkpoint (SD1.5, SD2.x base or SDXL) that the host's CheckpointLoaderSimple accepts.

The host detects a family from a few UNet config values (see FAMILIES), so a shrunken UNet passes detection
(SD1.5: about 19 M parameters; SDXL: about 100 M). The text encoders must be full size (the loader always builds
them: CLIP-L for SD1.5, OpenCLIP ViT-H text for SD2, CLIP-L + OpenCLIP bigG text for SDXL), written in the layout
the host's own checkpoint saver uses. The VAE is a TAESD-shaped autoencoder, which the host's VAE loader recognises
by its keys. Weights are random but deterministic; the images they make are noise-like. They exist so workflows
and tests run with no download. Usage: python standin_checkpoint.py COMFYUI_DIR OUT_FILE [sd15|sd2|sdxl]
"""
import os
import sys

import torch


def _init(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, (shape, dtype) in shapes.items():
        if not dtype.is_floating_point:
            out[key] = torch.zeros(shape, dtype=dtype)
        elif key.endswith("bias"):
            out[key] = torch.zeros(shape, dtype=torch.float16)
        elif len(shape) <= 1:
            out[key] = torch.ones(shape, dtype=torch.float16)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            std = 0.02 if "embedding" in key else fan_in ** -0.5
            out[key] = (torch.randn(shape, generator=g) * std).to(torch.float16)
    return out


def _shapes(module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


# UNet settings per family. The host detects the family from a few config values (comfy/supported_models.py:
# model_channels, context_dim, use_linear_in_transformer, adm_in_channels, and for SDXL transformer_depth), so the
# stand-ins keep those and shrink everything else: one 320-channel level for SD1.5 / SD2, and for SDXL three
# 320-channel levels with SDXL's input transformer depths [0, 0, 2, 2, 10, 10] but one block per output level.
FAMILIES = {
    "sd15": dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                 transformer_depth_middle=-2, num_heads=8, context_dim=768, use_linear_in_transformer=False),
    "sd2": dict(num_res_blocks=[1], channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                transformer_depth_middle=-2, num_heads=-1, num_head_channels=64, context_dim=1024,
                use_linear_in_transformer=True),
    "sdxl": dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1, num_heads=-1,
                 num_head_channels=64, context_dim=2048, use_linear_in_transformer=True, adm_in_channels=2816,
                 num_classes="sequential"),
}
VAE_SCALE = {"sd15": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def build_standin_checkpoint(comfy_dir: str, out_file: str, seed: int = 0, family: str = "sd15") -> str:
    """A random-weight checkpoint of `family` (sd15, sd2 = SD2.x base 512, sdxl) that CheckpointLoaderSimple loads
    as that family, with the family's full-size text encoder(s) (the loader always builds them)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)} (got {family!r})")
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, use_spatial_transformer=True,
                     legacy=False, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init,
                     **FAMILIES[family])
    config_class = {"sd15": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
                    "sdxl": comfy.supported_models.SDXL}[family]
    config = config_class({**config_class.unet_config, "in_channels": 4})
    text = config.clip_target().clip(device="meta", dtype=torch.float32, model_options={
        "custom_operations": comfy.ops.disable_weight_init})
    with torch.device("meta"):
        vae = TAESD(latent_channels=4)

    sd = {"model.diffusion_model." + k: v for k, v in _init(_shapes(unet), seed).items()}
    clip_sd = _init(_shapes(text), seed + 1)
    for key in list(clip_sd):
        if key.endswith("position_ids"):
            clip_sd[key] = torch.arange(clip_sd[key].shape[-1])[None]
        elif key.endswith("logit_scale") or (family == "sd15" and key.endswith("text_projection.weight")):
            clip_sd.pop(key)
    if family == "sd15":   # the SD1.5 layout: cond_stage_model.transformer.text_model.*
        clip_sd = {"cond_stage_model.transformer." + k[len("clip_l.transformer."):]: v for k, v in clip_sd.items()}
    else:
        clip_sd = config.process_clip_state_dict_for_saving(clip_sd)
    sd.update(clip_sd)
    vae_sd = _init(_shapes(vae), seed + 2)
    vae_sd["vae_scale"] = torch.tensor(VAE_SCALE[family], dtype=torch.float16)
    vae_sd["vae_shift"] = torch.tensor(0.0, dtype=torch.float16)
    sd.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, out_file,
              metadata={"likeness_standin": f"random {family} weights; for tests and demos only"})
    return out_file


if __name__ == "__main__":
    print(build_standin_checkpoint(sys.argv[1], sys.argv[2], family=sys.argv[3] if len(sys.argv) > 3 else "sd15"))
