"""Inv-Adapter's Embedded Attention Adapter (EAA) weights as an nn.Module (docs/methods/inv-adapter.md).

Per transformer block: self-side K'_s, V'_s (width -> inner, no bias) over the reference's self-attention inputs
F_s^p, and cross-side token aggregation s -> s_c followed by K'_c, V'_c over the reference's cross-attention
inputs F_c^p. The same module serves inference (in its own ModelPatcher, called from attention contributions)
and training. Layers use the host's manual-cast ops, so weights stored in one dtype run in the model's.
"""
from dataclasses import dataclass, field

import torch

from ..core.layout import AttentionLayout, parse_site_name
from .token_aggregation import TokenAggregation

SIDES = ("self", "cross")


@dataclass(frozen=True)
class EAASpec:
    """What an EAA was built for: per-block widths and reference token counts, s_c, sides, base model."""
    blocks: dict                 # site name -> {"width": d, "inner": heads*dim_head, "tokens": s}
    s_c: int
    sides: tuple = SIDES
    base_model: str = ""         # AttentionLayout.describe() of the model it was built for
    model_name: str = ""
    context_dim: int = 0
    model_channels: int = 0
    reference_latent: tuple = (64, 64)
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_layout(cls, layout: AttentionLayout, reference_latent=(64, 64), s_c: int = 256, sides=SIDES):
        h, w = int(reference_latent[0]), int(reference_latent[1])
        blocks = {s.name: {"width": s.query_dim, "inner": s.inner_dim, "tokens": s.tokens(h, w)} for s in layout.sites}
        return cls(blocks=blocks, s_c=int(s_c), sides=tuple(sides), base_model=layout.describe(),
                   model_name=layout.model_name, context_dim=layout.context_dim,
                   model_channels=layout.model_channels, reference_latent=(h, w))

    def aggregates(self, name: str) -> bool:
        return "cross" in self.sides and self.blocks[name]["tokens"] > self.s_c

    def expected_shapes(self) -> dict:
        shapes = {}
        for name, b in self.blocks.items():
            d, inner, s = b["width"], b["inner"], b["tokens"]
            for side in self.sides:
                shapes[f"layers.{name}.{side}_k.weight"] = (inner, d)
                shapes[f"layers.{name}.{side}_v.weight"] = (inner, d)
            if self.aggregates(name):
                shapes[f"layers.{name}.aggregate.proj.weight"] = (self.s_c, s)
                shapes[f"layers.{name}.aggregate.proj.bias"] = (self.s_c,)
        return shapes

    def parameter_count(self) -> int:
        total = 0
        for shape in self.expected_shapes().values():
            n = 1
            for x in shape:
                n *= x
            total += n
        return total

    def keys(self) -> list:
        return [parse_site_name(n) for n in self.blocks]


class EAALayer(torch.nn.Module):
    def __init__(self, width, inner, tokens, s_c, sides, dtype=None, device=None, operations=None):
        super().__init__()
        for side in sides:
            setattr(self, f"{side}_k", operations.Linear(width, inner, bias=False, dtype=dtype, device=device))
            setattr(self, f"{side}_v", operations.Linear(width, inner, bias=False, dtype=dtype, device=device))
        self.aggregate = (TokenAggregation(tokens, s_c, dtype=dtype, device=device, operations=operations)
                          if "cross" in sides and tokens > s_c else None)

    def aggregate_tokens(self, features):
        return features if self.aggregate is None else self.aggregate(features)


class EmbeddedAttentionAdapter(torch.nn.Module):
    def __init__(self, spec: EAASpec, dtype=None, device=None, operations=None):
        super().__init__()
        if operations is None:
            import comfy.ops
            operations = comfy.ops.manual_cast
        self.spec = spec
        self.layers = torch.nn.ModuleDict({
            name: EAALayer(b["width"], b["inner"], b["tokens"], spec.s_c, spec.sides, dtype, device, operations)
            for name, b in spec.blocks.items()})

    def layer(self, key) -> EAALayer:
        return self.layers[f"{key[0]}_{int(key[1])}_{int(key[2])}"]

    @torch.no_grad()
    def init_random(self, seed: int = 0, scale: float = 1.0):
        """Random K'/V' (std 1/sqrt(width) * scale) and pooling aggregation: test files and smoke runs."""
        g = torch.Generator().manual_seed(seed)
        for layer in self.layers.values():
            for name, p in layer.named_parameters():
                if name.startswith("aggregate"):
                    continue
                p.copy_(torch.randn(p.shape, generator=g) * (scale / p.shape[1] ** 0.5))
            if layer.aggregate is not None:
                layer.aggregate.reset_to_pooling()
        return self

    @torch.no_grad()
    def init_from_model(self, model_patcher, layout: AttentionLayout):
        """Start every K'/V' as a copy of the block's own attn1 to_k/to_v (same-domain inputs), aggregation
        as average pooling. Reads weights once, at build time (never inside a patch)."""
        sd = model_patcher.model.diffusion_model.state_dict()
        for site in layout.sites:
            layer = self.layers[site.name]
            for side in self.spec.sides:
                getattr(layer, f"{side}_k").weight.copy_(sd[f"{site.path}.attn1.to_k.weight"])
                getattr(layer, f"{side}_v").weight.copy_(sd[f"{site.path}.attn1.to_v.weight"])
            if layer.aggregate is not None:
                layer.aggregate.reset_to_pooling()
        return self
