"""Files the multi-photo ProFusion workflow needs, under the names users have: SD2.1-base
(v2-1_512-ema-pruned.safetensors; ProFusion's published PromptNet is for SD2-base), a ViT-H/14 CLIP vision
(clip_vision_h.safetensors), ProFusion's PromptNet download (standins.py places all three), and a second photo of
the subject."""
import os

import standins

CHECKPOINT = "v2-1_512-ema-pruned.safetensors"
CLIP_VISION = "clip_vision_h.safetensors"
SECOND_PHOTO = "astronaut_2.png"


def prepare(base_dir, comfy_dir):
    standins.ensure_checkpoint(base_dir, comfy_dir, "sd2")
    standins.ensure_clip_vision(base_dir, comfy_dir, "vith")
    photo = os.path.join(base_dir, "input", SECOND_PHOTO)
    if not os.path.exists(photo):
        import numpy as np
        from PIL import Image
        from skimage import data

        # the same subject, another framing: a mirrored, tighter crop of the astronaut photo
        Image.fromarray(np.ascontiguousarray(data.astronaut()[20:400, 60:440][:, ::-1])).save(photo)
