"""Computed (not measured) training cost of full-size models, from the host's own classes on the meta device
(nothing is allocated, no weights are needed): parameter counts of the UNets, text encoders, VAE and CLIP vision
towers; the Taming Encoder adapter for each base model and tower; the trainable counts of the other trainers'
modules; UNet FLOPs per training sample (forward, and forward + backward with the UNet trained or frozen), counted
by torch's FlopCounterMode on the host's UNet code path; and the activation memory autograd keeps for one sample,
summed over the tensors saved for backward (bf16 activations, attention saving what a fused flash kernel saves:
q, k, v, its output and the row log-sum-exp). Training-state memory follows: a trained fp32 parameter costs 16 bytes
(weight, gradient, AdamW's two moments), a frozen one 2 bytes (bf16/fp16).

Run: .host/venv/bin/python bench/train_cost.py   -> bench/results/train_cost.json
"""
import contextlib
import logging
import math
import os

import torch

from common import boot_host, write_result

log = logging.getLogger("train_cost")
GiB = 2 ** 30

# Full UNet configurations of the host's model detection (comfy/model_detection.py), architecture facts.
_COMMON = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
           "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
           "use_temporal_resblock": False}
_SD = {**_COMMON, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
       "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
       "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}
UNETS = {
    "SD1.5": ("SD15", {**_SD, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8}, 64),
    "SD2-768": ("SD20", {**_SD, "use_linear_in_transformer": True, "context_dim": 1024, "num_head_channels": 64}, 96),
    "SDXL": ("SDXL", {**_COMMON, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
                      "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
                      "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
                      "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]}, 128),
}
TOWERS = {"ViT-L/14": "clip_vision_config_vitl.json", "ViT-H/14": "clip_vision_config_h.json",
          "ViT-bigG/14": "clip_vision_config_g.json"}
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def meta_model(family, dtype=torch.float32):
    """(ModelPatcher, config) of a full-size UNet on the meta device, through the host's model classes."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    name, unet, _ = UNETS[family]
    config = getattr(comfy.supported_models, name)(dict(unet))
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, device="meta") if name == "SDXL" else comfy.model_base.BaseModel(config, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu")), config


def text_encoder_params(config) -> int:
    import comfy.ops

    te = config.clip_target().clip(device="meta", dtype=torch.float32,
                                   model_options={"custom_operations": comfy.ops.disable_weight_init})
    return count(te)


def tower_params(comfy_dir) -> dict:
    import json

    import comfy.ops
    from comfy.clip_model import CLIPVisionModelProjection

    out = {}
    for name, file in TOWERS.items():
        with open(os.path.join(comfy_dir, "comfy", file)) as f:
            cfg = json.load(f)
        out[name] = {"params": count(CLIPVisionModelProjection(cfg, torch.float32, "meta", comfy.ops.disable_weight_init)),
                     "width": cfg["hidden_size"], "layers": cfg["num_hidden_layers"]}
    return out


def meta_vae():
    import comfy.ldm.modules.diffusionmodules.model as vae_blocks
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    for block in vae.modules():   # torch attention (the sliced CPU default asks the device for free memory)
        if hasattr(block, "optimized_attention"):
            block.optimized_attention = vae_blocks.pytorch_attention
    return vae


def vae_params() -> int:
    return count(meta_vae())


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with host_attention(torch.nn.functional.scaled_dot_product_attention), counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def encoder_flops(comfy_dir) -> dict:
    """Forward TFLOPs per image of the frozen encoders a step runs: the VAE encoder (and decoder, for PhotoVerse's
    L_face) per image size, each CLIP vision tower at 224."""
    import json

    import comfy.ops
    from comfy.clip_model import CLIPVisionModelProjection

    vae = meta_vae()
    out = {}
    for latent in sorted({u[2] for u in UNETS.values()}):
        out[f"vae_encode_{8 * latent}"] = flops_of(lambda: vae.encode(torch.empty(1, 3, 8 * latent, 8 * latent,
                                                                                  device="meta"))) / 1e12
        out[f"vae_decode_{8 * latent}"] = flops_of(lambda: vae.decode(torch.empty(1, 4, latent, latent,
                                                                                  device="meta"))) / 1e12
    for name, file in TOWERS.items():
        with open(os.path.join(comfy_dir, "comfy", file)) as f:
            cfg = json.load(f)
        with torch.device("meta"):   # some of the tower's LayerNorms take no device argument
            tower = CLIPVisionModelProjection(cfg, torch.float32, "meta", comfy.ops.disable_weight_init)
        out[f"clip_vision_{name}"] = flops_of(lambda: tower(torch.empty(1, 3, 224, 224, device="meta"))) / 1e12
    return out


@contextlib.contextmanager
def host_attention(fn):
    """Route the host's attention through fn for the duration (the CPU default, sub-quadratic attention, asks the
    device for free memory, which the meta device cannot answer)."""
    import comfy.ldm.modules.attention as attention
    import comfy.ops

    saved = (attention.optimized_attention, attention.optimized_attention_masked, comfy.ops.scaled_dot_product_attention)
    attention.optimized_attention = attention.optimized_attention_masked = attention.attention_pytorch
    comfy.ops.scaled_dot_product_attention = fn
    try:
        yield
    finally:
        attention.optimized_attention, attention.optimized_attention_masked, comfy.ops.scaled_dot_product_attention = saved


class _FlashLike(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and the row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("only for counting saved tensors")


def _flash_like(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
    return _FlashLike.apply(q, k, v)


def unet_inputs(patcher, latent, dtype, grad=False):
    context_dim = patcher.model.model_config.unet_config["context_dim"]
    context = torch.empty(1, 77, context_dim, device="meta", dtype=dtype)
    x = torch.empty(1, 4, latent, latent, device="meta", dtype=dtype, requires_grad=grad)
    y = None
    adm = patcher.model.model_config.unet_config.get("adm_in_channels")
    if adm:
        y = torch.empty(1, adm, device="meta", dtype=dtype)
    return x, torch.empty(1, device="meta", dtype=dtype), context, y


def unet_flops(family) -> dict:
    """UNet FLOPs (2 per multiply-add) per sample: forward; forward + backward with every weight trained; forward +
    backward to the activations only (frozen UNet, gradients flowing to added modules inside it)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    latent = UNETS[family][2]
    for mode in ("forward", "trained", "frozen"):
        patcher, _ = meta_model(family)
        dm = patcher.model.diffusion_model
        dm.requires_grad_(mode == "trained")
        x, t, context, y = unet_inputs(patcher, latent, torch.float32, grad=mode == "frozen")
        counter = FlopCounterMode(display=False)
        with host_attention(torch.nn.functional.scaled_dot_product_attention), counter:
            with torch.enable_grad() if mode != "forward" else torch.no_grad():
                result = dm(x, t, context, y)
                if mode != "forward":
                    result.float().sum().backward()
        out[mode] = counter.get_total_flops()
    return out


def activation_bytes(family, trained: bool) -> int:
    """Bytes of the activations autograd saves for one sample (bf16), weights excluded; each tensor once."""
    patcher, _ = meta_model(family, torch.bfloat16)
    dm = patcher.model.diffusion_model
    dm.requires_grad_(trained)
    params = {id(p) for p in dm.parameters()}
    seen, total = set(), [0]

    def pack(t):
        key = id(t._base) if t._base is not None else id(t)
        if id(t) not in params and key not in seen:
            seen.add(key)
            total[0] += t.numel() * t.element_size()
        return t

    x, t, context, y = unet_inputs(patcher, UNETS[family][2], torch.bfloat16, grad=not trained)
    with host_attention(_flash_like), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dm(x, t, context, y)
    return total[0]


def taming_counts(patcher, towers) -> dict:
    from comfyui_likeness.core.layout import attention_layout
    from comfyui_likeness.encoders.taming_encoder import TamingSpec, VisionSpec

    layout = attention_layout(patcher)
    out = {}
    for name, tower in towers.items():
        spec = TamingSpec.for_layout(layout, VisionSpec(tower["width"], 257, tower["layers"]))
        shapes = spec.expected_shapes()
        kv = sum(math.prod(s) for k, s in shapes.items() if k.startswith("layers."))
        total = spec.parameter_count() - math.prod(shapes["null_tokens"])   # phi is fixed: not trained
        out[name] = {"trainable": total, "added_kv_and_gates": kv, "projection": total - kv,
                     "resampler_width": spec.width, "sites": len(layout.sites)}
    return out, layout


def other_trainer_counts(layout, towers) -> dict:
    """The other trainers' trainable modules, built from their specs for this layout (the designs of this commit)."""
    from comfyui_likeness.encoders.embedded_attention_adapter import EAASpec
    from comfyui_likeness.encoders.photoverse import PhotoVerseSpec

    out = {"inv_adapter_eaa": EAASpec.for_layout(layout, (layout_latent(layout), layout_latent(layout))).parameter_count()}
    vit_l = towers["ViT-L/14"]
    cv = {"width": vit_l["width"], "layers": vit_l["layers"], "image_size": 224, "patch": 14}
    out["photoverse_vit_l"] = PhotoVerseSpec.for_models(layout, cv).parameter_count()
    return out


def layout_latent(layout) -> int:
    return {"SD15": 64, "SD20": 96, "SDXL": 128}.get(layout.model_name, 64)


def promptnet_count(family, towers) -> int | None:
    try:
        from comfyui_likeness.encoders.promptnet import PromptNet
    except ImportError:
        return None
    _, unet, latent = UNETS[family]
    try:
        with torch.device("meta"):
            net = PromptNet(unet, towers["ViT-H/14"]["width"], unet["context_dim"], latent_size=latent, device="meta")
        return count(net)
    except Exception as e:   # a layout the PromptNet of this commit does not build
        log.info("PromptNet for %s: %s", family, e)
        return None


def state_gib(trained: int, frozen: int) -> float:
    return (16 * trained + 2 * frozen) / GiB


def main():
    logging.basicConfig(level=logging.INFO)
    comfy_dir, _ = boot_host()
    towers = tower_params(comfy_dir)
    vae = vae_params()
    encoders = encoder_flops(comfy_dir)
    families = {}
    for family in UNETS:
        log.info("counting %s", family)
        patcher, config = meta_model(family)
        unet = count(patcher.model.diffusion_model)
        text = text_encoder_params(config)
        tower = "ViT-L/14" if family == "SD1.5" else "ViT-H/14"
        taming, layout = taming_counts(patcher, towers)
        flops = unet_flops(family)
        act = {"trained": activation_bytes(family, True), "frozen": activation_bytes(family, False)}
        frozen_encoders = text + vae + towers[tower]["params"]
        adapter = taming[tower]["trainable"]
        families[family] = {
            "latent": UNETS[family][2], "unet_params": unet, "text_encoder_params": text, "vae_params": vae,
            "tower": tower, "taming_adapter": taming, "other_trainers": other_trainer_counts(layout, towers),
            "promptnet_params": promptnet_count(family, towers),
            "unet_tflops_per_sample": {k: v / 1e12 for k, v in flops.items()},
            "activation_gib_per_sample_bf16": {k: v / GiB for k, v in act.items()},
            "taming_state_gib": {
                "whole_unet": state_gib(unet + adapter, frozen_encoders),
                "adapter_only": state_gib(adapter, unet + frozen_encoders)},
        }
    result = {
        "what": "computed from the host's classes on the meta device (no measurement): parameter counts, UNet "
                "FLOPs per sample at the family's training resolution (FlopCounterMode; 2 FLOPs per multiply-add), "
                "activation memory autograd keeps per sample (bf16, fused-attention saves), training state (16 B "
                "per trained fp32 parameter with AdamW, 2 B per frozen one)",
        "towers": towers, "encoder_tflops_per_image": encoders, "families": families,
    }
    write_result("train_cost", result)


if __name__ == "__main__":
    main()
