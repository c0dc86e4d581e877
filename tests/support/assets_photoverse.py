"""Files the shipped PhotoVerse workflows need in a test host.

- models/clip_vision/clip-vit-large-patch14.safetensors: the full-size random ViT-L/14 stand-in (standins.py),
  which the host's CLIPVisionLoader accepts.
- models/likeness/photoverse_sd15.safetensors: a PhotoVerse adapter with random weights, real shapes (the paper's
  1024-hidden MLP adapters, rank-8 LoRA, visual K/V) for the stand-in checkpoint and a ViT-L/14. No trained
  PhotoVerse weights exist; the trainer writes a real one under the same format.
- models/checkpoints/sd_xl_base_1.0.safetensors and models/clip_vision/clip_vision_h.safetensors: the SDXL and
  ViT-H/14 stand-ins under the public names photoverse_sdxl uses, and models/likeness/photoverse_sdxl.safetensors:
  a random adapter for them (words for clip_l 768 and clip_g 1280, visual tokens at 2048).
- models/likeness/elite/global_mapper.pt and local_mapper.pt: random tensors in ELITE's published layout
  (fixtures_photoverse.elite_checkpoints) for the stand-in checkpoint's blocks, pickled with torch.save as ELITE
  publishes them; photoverse_elite converts them.
- input/astronaut_2.png (the astronaut mirrored: a second photo of the same person) and input/elite_object.png
  (scikit-image's coffee cup, RGBA with alpha 0 over the cup as ComfyUI's mask editor leaves it, so LoadImage's
  MASK marks the object).
"""
import os

import numpy as np
import torch

import standins

ADAPTER_NAME = "photoverse_sd15.safetensors"
SDXL_ADAPTER_NAME = "photoverse_sdxl.safetensors"
CHECKPOINT = standins.CHECKPOINT_NAME
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
VIT_L = "clip-vit-large-patch14.safetensors"
VIT_H = "clip_vision_h.safetensors"
VIT_L14 = {"width": 1024, "layers": 24, "image_size": 224, "patch": 14}
VIT_H14 = {"width": 1280, "layers": 32, "image_size": 224, "patch": 14}


def write_standin_photoverse(path: str, checkpoint_path: str, seed: int = 31, clip_vision=None) -> str:
    """A random adapter for a stand-in checkpoint, with words for each of its text encoders."""
    import comfy.sd
    from comfyui_likeness.concepts.photoverse_concept import clip_text_widths
    from comfyui_likeness.weights.photoverse import write_random_photoverse

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(checkpoint_path, output_vae=False, output_clip=True)
    return write_random_photoverse(path, model, clip_vision or VIT_L14, seed=seed, scale=0.5,
                                   text_widths=clip_text_widths(clip))


def write_elite_files(folder: str, checkpoint_path: str, seed: int = 41):
    """ELITE-layout global / local mapper files (real ELITE widths: CLIP 1024, hidden 1024, words 768) for the
    stand-in checkpoint's cross-attention blocks, named as ELITE names them (diffusers module paths)."""
    import comfy.sd
    import comfy.utils
    from comfyui_likeness.core.layout import attention_layout
    from fixtures_photoverse import elite_checkpoints

    model = comfy.sd.load_checkpoint_guess_config(checkpoint_path, output_vae=False, output_clip=False)[0]
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}
    layout = attention_layout(model)
    blocks = {s.name: to_diffusers[f"{s.path}.attn2.to_k.weight"].split(".transformer_blocks.")[0] for s in layout.sites}
    widths = {s.name: (s.inner_dim, s.context_dim) for s in layout.sites}
    global_sd, local_sd = elite_checkpoints(blocks, widths, 1024, 768, 1024, seed=seed, dtype=torch.float16)
    os.makedirs(folder, exist_ok=True)
    torch.save(global_sd, os.path.join(folder, "global_mapper.pt"))
    torch.save(local_sd, os.path.join(folder, "local_mapper.pt"))


def write_inputs(input_dir: str):
    from PIL import Image, ImageDraw
    from skimage import data

    path = os.path.join(input_dir, "astronaut_2.png")
    if not os.path.exists(path):
        Image.fromarray(np.ascontiguousarray(np.asarray(data.astronaut())[:, ::-1])).save(path)
    path = os.path.join(input_dir, "elite_object.png")
    if not os.path.exists(path):
        coffee = Image.fromarray(np.asarray(data.coffee())).convert("RGBA")
        alpha = Image.new("L", coffee.size, 255)
        ImageDraw.Draw(alpha).ellipse([150, 20, 470, 330], fill=0)   # the cup and saucer
        coffee.putalpha(alpha)
        coffee.save(path)


def prepare(base_dir: str, comfy_dir: str):
    models = os.path.join(base_dir, "models")
    standins.ensure_clip_vision(base_dir, comfy_dir)
    path = os.path.join(models, "likeness", ADAPTER_NAME)
    if not os.path.exists(path):
        write_standin_photoverse(path, os.path.join(models, "checkpoints", CHECKPOINT))
    elite = os.path.join(models, "likeness", "elite")
    if not os.path.exists(os.path.join(elite, "local_mapper.pt")):
        write_elite_files(elite, os.path.join(models, "checkpoints", CHECKPOINT))
    write_inputs(os.path.join(base_dir, "input"))
    standins.ensure_checkpoint(base_dir, comfy_dir, "sdxl")
    standins.ensure_clip_vision(base_dir, comfy_dir, "vith")
    path = os.path.join(models, "likeness", SDXL_ADAPTER_NAME)
    if not os.path.exists(path):
        write_standin_photoverse(path, os.path.join(models, "checkpoints", SDXL), seed=33, clip_vision=VIT_H14)
