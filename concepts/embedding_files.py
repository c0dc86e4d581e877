"""Textual-inversion embedding files as concepts (safetensors only; pickled .pt/.bin files are never loaded).

Layouts seen in the wild, all handled by width (the prompt node checks the width against the CLIP):
  A1111 / ComfyUI      {"emb_params": (n, 768)}
  SDXL                 {"clip_l": (n, 768), "clip_g": (n, 1280)}
  diffusers            {"<token>": (768,)}  (one vector per key)
"""
import os

from safetensors import safe_open

from .concept import TOKEN_SPACE, LikenessConcept


def load_embedding_concept(path: str) -> LikenessConcept:
    name = os.path.basename(path)
    if not path.lower().endswith((".safetensors", ".sft")):
        raise ValueError(f"'{name}' is not a .safetensors file; this pack never loads pickled embeddings (.pt/.bin)")
    if not os.path.isfile(path):
        raise ValueError(f"embedding file '{path}' does not exist")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated or foreign files
        raise ValueError(f"'{name}' could not be read as safetensors ({e}); the file may be truncated or not an embedding") from e
    by_width: dict[int, list] = {}
    for key in sorted(tensors):
        t = tensors[key].float()
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2:
            continue
        by_width.setdefault(int(t.shape[-1]), []).append(t)
    if not by_width:
        raise ValueError(f"'{name}' holds no embedding vectors (expected tensors of shape (n, width))")
    import torch

    vectors = {w: torch.cat(ts, 0) for w, ts in by_width.items()}
    counts = {v.shape[0] for v in vectors.values()}
    if len(counts) > 1:
        raise ValueError(f"'{name}' has a different number of vectors per encoder ({sorted(counts)}); it cannot be aligned")
    return LikenessConcept(vectors=vectors, space=TOKEN_SPACE, source=name)
