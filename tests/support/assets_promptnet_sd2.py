"""Files the multi-photo ProFusion workflow needs, under the names users have: SD2.1-base
(v2-1_512-ema-pruned.safetensors; ProFusion's published PromptNet is for SD2-base), a ViT-H/14 CLIP vision
(clip_vision_h.safetensors; here the ViT-L/14-layout stand-in), a PromptNet under the name docs/methods/promptnet.md
gives the converted ProFusion weights (random weights on the stand-in's layout), and a second photo of the subject."""
import os

import standins

CHECKPOINT = "v2-1_512-ema-pruned.safetensors"
CLIP_VISION = "clip_vision_h.safetensors"
PROMPTNET = "profusion_promptnet_sd2.safetensors"
SECOND_PHOTO = "astronaut_2.png"


def prepare(base_dir, comfy_dir):
    from comfyui_likeness.weights.promptnet_file import save_promptnet
    from fixtures_promptnet import random_standin_promptnet

    standins.place_as(base_dir, "checkpoints", standins.ensure_checkpoint(base_dir, comfy_dir, "sd2"), CHECKPOINT)
    standins.place_as(base_dir, "clip_vision", standins.ensure_clip_vision(base_dir, comfy_dir), CLIP_VISION)
    path = os.path.join(base_dir, "models", "likeness", PROMPTNET)
    if not os.path.exists(path):
        save_promptnet(path, random_standin_promptnet(seed=2, family="sd2"), base_model="SD2.x (test stand-in)")
    photo = os.path.join(base_dir, "input", SECOND_PHOTO)
    if not os.path.exists(photo):
        import numpy as np
        from PIL import Image
        from skimage import data

        # the same subject, another framing: a mirrored, tighter crop of the astronaut photo
        Image.fromarray(np.ascontiguousarray(data.astronaut()[20:400, 60:440][:, ::-1])).save(photo)
