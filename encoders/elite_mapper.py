"""ELITE's mappers (Wei et al. 2023), the PhotoVerse option that ELITE's published weights load into
(docs/methods/photoverse.md, "ELITE's mappers").

Both have one pair of heads per selected CLIP layer i, with ELITE's parameter names (mapping_{i}.{0..6},
mapping_patch_{i}.{0..6}, so its checkpoints load key for key):
  cls head    mapping_i on the CLS token
  patch head  mapping_patch_i on every patch token
each  Linear(W -> h) -> LN -> LeakyReLU -> Linear(h -> h) -> LN -> LeakyReLU -> Linear(h -> d_out).
  EliteMapper (global)      token i = cls head + mean over patches of the patch head: one word per layer
                            [ELITE train_global.py `Mapper`]
  EliteLocalMapper (local)  patch token j = mean over layers i of (cls head_i + patch head_i(patch j)): one token
                            per patch [ELITE train_local.py `MapperLocal`]
W is the CLIP-vision width (1024 for ViT-L/14), h the hidden width (1024 in ELITE), d_out the text width (global)
or the cross-attention context width (local).

A plain nn.Module: pass operations=comfy.ops.manual_cast for inference (weights stored in one dtype run in the
input's dtype and device), or leave it None (torch.nn) for training.
"""
import torch

HIDDEN = 1024


def check_features(features: torch.Tensor, num_tokens: int, in_dim: int, what: str = "adapter"):
    if features.ndim != 4 or features.shape[1] < num_tokens or features.shape[-1] != in_dim:
        raise ValueError(f"the {what} expects features (batch, {num_tokens} layers, tokens, {in_dim}); "
                         f"got {tuple(features.shape)}")
    if features.shape[2] < 2:
        raise ValueError(f"the {what} needs a CLS token and at least one patch token")


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

    kind = "elite"

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int, hidden: int = HIDDEN, dtype=None, device=None,
                 operations=None):
        super().__init__()
        ops = operations or torch.nn
        self.num_tokens, self.in_dim, self.out_dim, self.hidden = int(num_tokens), int(in_dim), int(out_dim), int(hidden)
        for i in range(self.num_tokens):
            setattr(self, f"mapping_{i}", _head(in_dim, hidden, out_dim, ops, dtype, device))
            setattr(self, f"mapping_patch_{i}", _head(in_dim, hidden, out_dim, ops, dtype, device))

    def heads(self, features: torch.Tensor, i: int):
        """(cls head output (B, 1, d), patch head output (B, T-1, d)) of layer i."""
        layer = features[:, i]
        return getattr(self, f"mapping_{i}")(layer[:, :1]), getattr(self, f"mapping_patch_{i}")(layer[:, 1:])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_features(features, self.num_tokens, self.in_dim, "mapper")
        tokens = []
        for i in range(self.num_tokens):
            cls, patches = self.heads(features, i)
            tokens.append(cls + patches.mean(dim=1, keepdim=True))
        return torch.cat(tokens, dim=1)

    @staticmethod
    def shapes(num_tokens: int, in_dim: int, out_dim: int, hidden: int = HIDDEN, prefix: str = "") -> dict:
        """{parameter name: shape}, without building the module."""
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


class EliteLocalMapper(EliteMapper):
    """features (B, m, T, W) -> tokens (B, T - 1, out_dim): one token per patch, averaged over the m layers."""

    kind = "elite_local"

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_features(features, self.num_tokens, self.in_dim, "local mapper")
        total = 0
        for i in range(self.num_tokens):
            cls, patches = self.heads(features, i)
            total = total + (cls + patches)
        return total / self.num_tokens

