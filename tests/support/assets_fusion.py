"""Files the Fusion Sampling workflows need: an example textual-inversion embedding (random, 2 vectors of 768)."""
import os

import torch
from safetensors.torch import save_file

SHRINK = {}


def prepare(base_dir, comfy_dir):
    path = os.path.join(base_dir, "models", "embeddings", "likeness_example_concept.safetensors")
    if not os.path.exists(path):
        g = torch.Generator().manual_seed(0)
        save_file({"emb_params": torch.randn(2, 768, generator=g) * 0.02}, path)
