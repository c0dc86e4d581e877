"""Stand-in for the Fusion Sampling workflows' textual-inversion embedding (random, 2 vectors of 768), written
under the name the shipped workflow uses (standins.py)."""
import torch
from safetensors.torch import save_file

SHRINK = {}


def write_standin_embedding(path: str) -> str:
    g = torch.Generator().manual_seed(0)
    save_file({"emb_params": torch.randn(2, 768, generator=g) * 0.02}, path)
    return path
