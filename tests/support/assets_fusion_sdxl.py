"""Files the SDXL Fusion Sampling workflow needs: the SDXL stand-in checkpoint under the public SDXL base file name,
and an example SDXL textual-inversion embedding (clip_l and clip_g vectors, random, 2 of each)."""
import os

import torch
from safetensors.torch import save_file

import standins

CHECKPOINT = "sd_xl_base_1.0.safetensors"
EMBEDDING = "subject_embedding_sdxl.safetensors"


def prepare(base_dir, comfy_dir):
    standins.ensure_checkpoint(base_dir, comfy_dir, "sdxl")
    path = os.path.join(base_dir, "models", "embeddings", EMBEDDING)
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(1)
        save_file({"clip_l": torch.randn(2, 768, generator=g) * 0.02, "clip_g": torch.randn(2, 1280, generator=g) * 0.02},
                  path)
