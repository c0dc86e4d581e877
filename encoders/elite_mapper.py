"""ELITE-style multi-layer mapper: CLIP-vision hidden states of m layers -> m tokens (docs/methods/photoverse.md, R.1).

One pair of heads per selected CLIP layer, following ELITE's global mapper [ELITE train_global.py `Mapper`] and the
PhotoVerse port [PV-unoff models/adapters.py]:
  cls head    on the CLS token
  patch head  on every patch token, then the mean over patches
each  Linear(W -> h) -> LN -> LeakyReLU -> Linear(h -> h) -> LN -> LeakyReLU -> Linear(h -> d_out),
and the two head outputs are added, giving token i. W is the CLIP-vision width (1024 for ViT-L/14), h the
hidden width (1024 in ELITE and the port), d_out the text-encoder width (text adapter) or the cross-attention
context width (image adapter). Parameter names follow ELITE's checkpoints (mapping_{i}.{0..6},
mapping_patch_{i}.{0..6}) so its layout is recognisable.

A plain nn.Module: pass operations=comfy.ops.manual_cast for inference (weights stored in one dtype run in the
input's dtype and device), or leave it None (torch.nn) for training.
"""
import torch

HIDDEN = 1024


def _head(in_dim: int, hidden: int, out_dim: int, ops, dtype, device) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        ops.Linear(in_dim, hidden, dtype=dtype, device=device),
        ops.LayerNorm(hidden, dtype=dtype, device=device),
        torch.nn.LeakyReLU(),
        ops.Linear(hidden, hidden, dtype=dtype, device=device),
        ops.LayerNorm(hidden, dtype=dtype, device=device),
        torch.nn.LeakyReLU(),
        ops.Linear(hidden, out_dim, dtype=dtype, device=device),
    )


class EliteMapper(torch.nn.Module):
    """features (B, m, T, W) -> tokens (B, m, out_dim); token i comes from features[:, i] (CLS first)."""

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int, hidden: int = HIDDEN, dtype=None, device=None,
                 operations=None):
        super().__init__()
        ops = operations or torch.nn
        self.num_tokens, self.in_dim, self.out_dim, self.hidden = int(num_tokens), int(in_dim), int(out_dim), int(hidden)
        for i in range(self.num_tokens):
            setattr(self, f"mapping_{i}", _head(in_dim, hidden, out_dim, ops, dtype, device))
            setattr(self, f"mapping_patch_{i}", _head(in_dim, hidden, out_dim, ops, dtype, device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4 or features.shape[1] < self.num_tokens or features.shape[-1] != self.in_dim:
            raise ValueError(f"the mapper expects features (batch, {self.num_tokens} layers, tokens, {self.in_dim}); "
                             f"got {tuple(features.shape)}")
        if features.shape[2] < 2:
            raise ValueError("the mapper needs a CLS token and at least one patch token")
        tokens = []
        for i in range(self.num_tokens):
            layer = features[:, i]
            cls = getattr(self, f"mapping_{i}")(layer[:, :1])
            patches = getattr(self, f"mapping_patch_{i}")(layer[:, 1:]).mean(dim=1, keepdim=True)
            tokens.append(cls + patches)
        return torch.cat(tokens, dim=1)

    def expected_shapes(self, prefix: str = "") -> dict:
        return mapper_shapes(self.num_tokens, self.in_dim, self.out_dim, self.hidden, prefix)


def mapper_shapes(num_tokens: int, in_dim: int, out_dim: int, hidden: int = HIDDEN, prefix: str = "") -> dict:
    """{parameter name: shape} of an EliteMapper, without building it."""
    shapes = {}
    for i in range(num_tokens):
        for head in (f"mapping_{i}", f"mapping_patch_{i}"):
            for idx, (i_dim, o_dim) in ((0, (in_dim, hidden)), (3, (hidden, hidden)), (6, (hidden, out_dim))):
                shapes[f"{prefix}{head}.{idx}.weight"] = (o_dim, i_dim)
                shapes[f"{prefix}{head}.{idx}.bias"] = (o_dim,)
            for idx in (1, 4):
                shapes[f"{prefix}{head}.{idx}.weight"] = (hidden,)
                shapes[f"{prefix}{head}.{idx}.bias"] = (hidden,)
    return shapes
