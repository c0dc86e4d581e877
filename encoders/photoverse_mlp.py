"""PhotoVerse's adapter as the paper describes it (docs/methods/photoverse.md, "Adapters"; PhotoVerse §2.2).

One adapter per selected CLIP-vision layer i, each a two-layer MLP with LayerNorm + LeakyReLU after both fully
connected layers:
    mlp_i = Linear(W -> h) -> LN -> LeakyReLU -> Linear(h -> d_out) -> LN -> LeakyReLU
W is the CLIP-vision width, h the hidden width (1024, the paper's "1024-d"), d_out the target width: a text
encoder's token width for the text adapter, the cross-attention context width for the image adapter ("the same
structural design as the text adapter", §2.3).

The paper does not say which tokens of a layer the MLP reads. Here it runs on every token of the layer (CLS and
patches) and the results are averaged, giving token i: the single-head counterpart of ELITE's mapper, which adds a
CLS head and a mean-of-patches head (encoders/elite_mapper.py), so the patch tokens that carry the face's detail
reach the word.

A plain nn.Module: operations=comfy.ops.manual_cast for inference, None (torch.nn) for training.
"""
import torch

from .elite_mapper import HIDDEN, check_features


def _mlp(in_dim, hidden, out_dim, ops, dtype, device) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        ops.Linear(in_dim, hidden, dtype=dtype, device=device),
        ops.LayerNorm(hidden, dtype=dtype, device=device),
        torch.nn.LeakyReLU(),
        ops.Linear(hidden, out_dim, dtype=dtype, device=device),
        ops.LayerNorm(out_dim, dtype=dtype, device=device),
        torch.nn.LeakyReLU(),
    )


class LayerMLPMapper(torch.nn.Module):
    """features (B, m, T, W) -> tokens (B, m, out_dim); token i = mean over the T tokens of mlp_i(features[:, i])."""

    kind = "mlp"

    def __init__(self, num_tokens: int, in_dim: int, out_dim: int, hidden: int = HIDDEN, dtype=None, device=None,
                 operations=None):
        super().__init__()
        ops = operations or torch.nn
        self.num_tokens, self.in_dim, self.out_dim, self.hidden = int(num_tokens), int(in_dim), int(out_dim), int(hidden)
        for i in range(self.num_tokens):
            setattr(self, f"mlp_{i}", _mlp(in_dim, hidden, out_dim, ops, dtype, device))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        check_features(features, self.num_tokens, self.in_dim)
        return torch.cat([getattr(self, f"mlp_{i}")(features[:, i]).mean(dim=1, keepdim=True)
                          for i in range(self.num_tokens)], dim=1)

    @staticmethod
    def shapes(num_tokens: int, in_dim: int, out_dim: int, hidden: int = HIDDEN, prefix: str = "") -> dict:
        """{parameter name: shape}, without building the module."""
        out = {}
        for i in range(num_tokens):
            p = f"{prefix}mlp_{i}"
            out.update({f"{p}.0.weight": (hidden, in_dim), f"{p}.0.bias": (hidden,),
                        f"{p}.1.weight": (hidden,), f"{p}.1.bias": (hidden,),
                        f"{p}.3.weight": (out_dim, hidden), f"{p}.3.bias": (out_dim,),
                        f"{p}.4.weight": (out_dim,), f"{p}.4.bias": (out_dim,)})
        return out
