"""Write a small stand-in SD1.5 checkpoint that the host's CheckpointLoaderSimple accepts.

The host detects SD1.5 from model_channels=320 and context_dim=768 only, so a one-level UNet with one res block
passes detection (about 19 M parameters). The text encoder must be a full CLIP-L (the SD1.5 loader always builds
one), and the VAE is a TAESD-shaped autoencoder, which the host's VAE loader recognises by its keys. Weights are
random but deterministic; the images it makes are noise-like. It exists so workflows and tests run with no
download. Usage: python standin_checkpoint.py COMFYUI_DIR OUT_FILE
"""
import json
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


def build_standin_checkpoint(comfy_dir: str, out_file: str, seed: int = 0) -> str:
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    unet = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                     channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                     transformer_depth_middle=-2, num_heads=8, context_dim=768, use_linear_in_transformer=False,
                     use_spatial_transformer=True, legacy=False, dtype=torch.float32, device="meta",
                     operations=comfy.ops.disable_weight_init)
    with open(os.path.join(comfy_dir, "comfy", "sd1_clip_config.json")) as f:
        clip_config = json.load(f)
    clip = CLIPTextModel(clip_config, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init)
    with torch.device("meta"):
        vae = TAESD(latent_channels=4)

    sd = {}
    sd.update({"model.diffusion_model." + k: v for k, v in _init(_shapes(unet), seed).items()})
    clip_sd = _init(_shapes(clip), seed + 1)
    clip_sd.pop("text_projection.weight", None)
    clip_sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip_sd.items()})
    vae_sd = _init(_shapes(vae), seed + 2)
    vae_sd["vae_scale"] = torch.tensor(0.18215, dtype=torch.float16)
    vae_sd["vae_shift"] = torch.tensor(0.0, dtype=torch.float16)
    sd.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, out_file,
              metadata={"likeness_standin": "random weights; for tests and demos only"})
    return out_file


if __name__ == "__main__":
    print(build_standin_checkpoint(sys.argv[1], sys.argv[2]))
