"""Files the shipped Taming Encoder workflows need in a test host.

- models/clip_vision/clip-vit-large-patch14.safetensors: the random ViT-L/14 stand-in (standins.py), which the
  host's CLIPVisionLoader accepts.
- models/likeness/taming_encoder_sd15_vitl14.safetensors: a Taming Encoder file with random weights for the
  stand-in checkpoint and ViT-L/14 features (16 object tokens, resampler depth 2). Not a trained adapter: no
  trained Taming Encoder weights exist; the trainer produces the real one.
- models/checkpoints/sd_xl_base_1.0.safetensors and models/clip_vision/clip_vision_h.safetensors: the SDXL
  checkpoint stand-in (standins.ensure_checkpoint(..., "sdxl")) and the random ViT-H/14 stand-in, under the public
  names the SDXL workflow (taming_sdxl) names.
- models/likeness/taming_encoder_sdxl_vith14.safetensors: a random Taming Encoder file for the SDXL stand-in and
  ViT-H/14 features (16 object tokens, resampler depth 1, 1280 wide).
- input/chelsea.png: scikit-image's cat photo as a user leaves it after painting the cat in ComfyUI's mask
  editor: RGBA, alpha 0 over the cat, so LoadImage's MASK (1 - alpha) marks the subject. The "painting" is a
  hand-placed polygon around the cat's head.
"""
import os

import torch

import standins

CHECKPOINT = standins.CHECKPOINT_NAME
ADAPTER_NAME = "taming_encoder_sd15_vitl14.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
VIT_H = "clip_vision_h.safetensors"
SDXL_ADAPTER_NAME = "taming_encoder_sdxl_vith14.safetensors"
PET_IMAGE = "chelsea.png"
# The cat's outline in data.chelsea() (451 x 300), as (x, y).
CAT_POLYGON = [(0, 0), (350, 0), (392, 22), (385, 60), (372, 120), (368, 190), (352, 250), (330, 300), (0, 300)]

SHRINK = {}  # the Taming nodes have no size knobs; the CLIP vision input size is the tower's own


def write_pet_image(path: str) -> str:
    import numpy as np
    from PIL import Image, ImageDraw
    from skimage import data

    rgb = np.asarray(data.chelsea())
    painted = Image.new("L", (rgb.shape[1], rgb.shape[0]), 0)
    ImageDraw.Draw(painted).polygon(CAT_POLYGON, fill=255)
    alpha = 255 - np.asarray(painted)  # the mask editor clears alpha where the user paints
    Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA").save(path)
    return path


def write_standin_taming(path: str, checkpoint_path: str, seed: int = 31, vision=None, depth: int = 2) -> str:
    """A random adapter for the stand-in checkpoint; vision: a VisionSpec (default ViT-L/14, the stand-in's)."""
    import comfy.sd
    from comfyui_likeness.encoders.taming_encoder import VisionSpec
    from comfyui_likeness.weights.taming_file import write_random_taming

    model = comfy.sd.load_checkpoint_guess_config(checkpoint_path, output_vae=False, output_clip=False)[0]
    vision = vision or VisionSpec(hidden_size=1024, tokens=257, layers=24, image_size=224)
    return write_random_taming(path, model, vision, queries=16, depth=depth, seed=seed, scale=0.5, gate=0.5,
                               dtype=torch.float16)


def prepare(base_dir: str, comfy_dir: str):
    """The painted pet photo; the model files come from standins.py (also placed here for the Taming tests)."""
    standins.ensure_clip_vision(base_dir, comfy_dir)
    standins.ensure(base_dir, comfy_dir, ADAPTER_NAME)
    pet = os.path.join(base_dir, "input", PET_IMAGE)
    if not os.path.exists(pet):
        write_pet_image(pet)
    adapter = os.path.join(base_dir, "models", "likeness", ADAPTER_NAME)
    if not os.path.exists(adapter):
        write_standin_taming(adapter, os.path.join(base_dir, "models", "checkpoints", CHECKPOINT))
    prepare_sdxl(base_dir, comfy_dir)


def prepare_sdxl(base_dir: str, comfy_dir: str):
    """The SDXL workflow's files: checkpoint and ViT-H/14 stand-ins under their public names, an SDXL adapter."""
    from comfyui_likeness.encoders.taming_encoder import VisionSpec

    standins.ensure_checkpoint(base_dir, comfy_dir, "sdxl")
    standins.ensure_clip_vision(base_dir, comfy_dir, "vith")
    adapter = os.path.join(base_dir, "models", "likeness", SDXL_ADAPTER_NAME)
    if not os.path.exists(adapter):
        write_standin_taming(adapter, os.path.join(base_dir, "models", "checkpoints", SDXL_CHECKPOINT), seed=37,
                             vision=VisionSpec(hidden_size=1280, tokens=257, layers=32, image_size=224), depth=1)
