"""Token aggregation of Inv-Adapter's cross-attention side (docs/methods/inv-adapter.md).

F'[:, j, :] = sum_i A[j, i] F[:, i, :] + b[j]: a learned linear map along the token axis, s -> s_c, one per layer
because s differs between layers. Initialised as average pooling (spatial windows when both token counts are
square grids that divide, contiguous raster runs otherwise), so an untrained aggregator already gives a
meaningful summary of the reference. Layers with s <= s_c use no aggregation (identity).
"""
import math

import torch
import torch.nn.functional as F


def _square_side(n: int):
    side = int(round(math.sqrt(n)))
    return side if side * side == n else None


def pooling_matrix(tokens: int, out_tokens: int) -> torch.Tensor:
    """(out_tokens, tokens) averaging matrix; each row sums to one."""
    if out_tokens >= tokens:
        raise ValueError(f"aggregation must reduce tokens ({tokens} -> {out_tokens})")
    eye = torch.eye(tokens, dtype=torch.float64)
    side, out_side = _square_side(tokens), _square_side(out_tokens)
    if side and out_side and side % out_side == 0:
        pooled = F.adaptive_avg_pool2d(eye.reshape(tokens, 1, side, side), out_side).reshape(tokens, out_tokens)
    else:
        pooled = F.adaptive_avg_pool1d(eye[None], out_tokens)[0]
    return pooled.t().contiguous().float()


class TokenAggregation(torch.nn.Module):
    """(batch, tokens, width) -> (batch, out_tokens, width)."""

    def __init__(self, tokens: int, out_tokens: int, dtype=None, device=None, operations=None):
        super().__init__()
        if operations is None:
            import comfy.ops
            operations = comfy.ops.manual_cast
        self.tokens, self.out_tokens = int(tokens), int(out_tokens)
        self.proj = operations.Linear(self.tokens, self.out_tokens, bias=True, dtype=dtype, device=device)

    @torch.no_grad()
    def reset_to_pooling(self):
        self.proj.weight.copy_(pooling_matrix(self.tokens, self.out_tokens))
        self.proj.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.tokens:
            raise ValueError(f"token aggregation expects {self.tokens} reference tokens, got {features.shape[1]}")
        return self.proj(features.transpose(1, 2)).transpose(1, 2)


# --- several reference photos and the fast mode (docs/methods/inv-adapter.md) ----------------------------------------

COMBINE_MODES = ("concat", "average", "norm average")


def combine_photos(features: torch.Tensor, mode: str) -> torch.Tensor:
    """(photos, tokens, width) -> (1, tokens', width): one reference token set from several photos.

    concat:       every photo's tokens side by side (photos * tokens): attention over all of them
    average:      the per-token mean over photos (the tokens of one photo; the faces are aligned by Face Crop)
    norm average: the mean of the per-token unit vectors, rescaled to the mean per-token norm, so photos that
                  disagree do not shrink the average towards zero
    """
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)} (got {mode!r})")
    n, s, d = features.shape
    if n == 1:
        return features
    if mode == "concat":
        return features.reshape(1, n * s, d)
    if mode == "average":
        return features.mean(0, keepdim=True)
    norms = features.norm(dim=-1, keepdim=True)
    unit = features / norms.clamp_min(torch.finfo(features.dtype).tiny)
    direction = unit.mean(0, keepdim=True)
    return direction / direction.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny) \
        * norms.mean(0, keepdim=True)


def pool_grid(features: torch.Tensor, grid: tuple, factor: int) -> torch.Tensor:
    """(batch, h*w, width) tokens of an h x w grid -> (batch, ceil(h/f)*ceil(w/f), width), f x f averages."""
    if factor <= 1:
        return features
    h, w = int(grid[0]), int(grid[1])
    b, s, d = features.shape
    if h * w != s:
        raise ValueError(f"the reference has {s} tokens, not the {h}x{w} grid expected at this block")
    x = features.transpose(1, 2).reshape(b, d, h, w)
    x = F.avg_pool2d(x, factor, stride=factor, ceil_mode=True)
    return x.reshape(b, d, -1).transpose(1, 2)
