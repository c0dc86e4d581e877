"""Several reference photos of one subject made into one set of vectors (the `combine` input of the encode nodes).

Each photo gives n vectors of width d; x has shape (N photos, n, d). The modes, as IPAdapter users know them by
name, defined here exactly:
  average       mean over the photos: (n, d)
  concat        every photo's vectors one after the other, photo 0 first: (N * n, d)
  norm_average  per vector position, the direction of the mean of the photos' unit vectors, with the mean of
                their lengths: (n, d). Photos whose vectors are larger do not dominate, and the result keeps the
                length the model saw in training. (IPAdapter_plus's "norm average" divides each coordinate by its
                norm across the photos, which for one photo turns every coordinate into +-1; here one photo is
                returned unchanged.)
One photo gives that photo's vectors in every mode.
"""
import torch

COMBINE_MODES = ("average", "concat", "norm_average")
EPS = 1e-12


def check_mode(mode: str) -> str:
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)} (got {mode!r})")
    return mode


def combine_photos(x: torch.Tensor, mode: str) -> torch.Tensor:
    """(N, n, d) per-photo vectors -> the combined vectors ((n, d), or (N * n, d) for concat)."""
    check_mode(mode)
    if x.ndim != 3 or x.shape[0] < 1:
        raise ValueError(f"combine expects (photos, vectors, width); got {tuple(x.shape)}")
    if mode == "average":
        return x.mean(0)
    if mode == "concat":
        return x.reshape(-1, x.shape[-1])
    lengths = x.norm(dim=-1, keepdim=True)
    direction = (x / lengths.clamp_min(EPS)).mean(0)
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(EPS) * lengths.mean(0)
