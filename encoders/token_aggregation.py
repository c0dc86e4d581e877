"""Token aggregation of Inv-Adapter's cross-attention side (docs/methods/inv-adapter.md, INV3).

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
