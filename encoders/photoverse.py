"""PhotoVerse's trainable modules (docs/methods/photoverse.md): the text adapter, the image adapter, and per
cross-attention block the LoRA on to_q/to_k/to_v and the visual projections K^S/V^S.

  text adapter   EliteMapper: CLIP-vision layers [last, 4, 8, 12, 16] -> words S1..S5 of the text-encoder width
  image adapter  EliteMapper of the same design -> visual tokens f of the cross-attention context width (PV3)
  per block      LoRA dW = up @ down (rank 8) on attn2 to_q (query width -> inner), to_k and to_v
                 (context -> inner); visual_k, visual_v: Linear(context -> inner, no bias), IP-Adapter's
                 to_k_ip/to_v_ip [IPA attention_processor.py]
Everything is sized from the connected models (PhotoVerseSpec.for_models), so one code path serves SD1.5
(text 768, context 768, ViT-L/14) and SD2 (1024, 1024, ViT-H/14). The same modules serve inference (inside a
ModelPatcher, built on comfy.ops.manual_cast) and training (torch.nn, the default).

Layer numbering: clip_layers counts like the HF CLIP hidden_states tuple, so 0 is the embedding output and
i >= 1 the output of encoder layer i; the last one (24 for ViT-L) is last_hidden_state before the post-LayerNorm,
which is what ELITE feeds its first mapper [ELITE train_global.py].
"""
import math
from dataclasses import dataclass, field

import torch

from .elite_mapper import HIDDEN, EliteMapper, mapper_shapes

LORA_RANK = 8
MID_LAYERS = (4, 8, 12, 16)
LORA_TARGETS = ("q", "k", "v")

# Training-time random fusion [PV-n1 2.4, 3.2]: u < r1 -> text only, r1 <= u < r2 -> image only, else both.
R1, R2 = 1.0 / 3.0, 2.0 / 3.0
FUSION_MODES = ((2.0, 0.0), (0.0, 2.0), (1.0, 1.0))


def default_clip_layers(depth: int) -> tuple:
    """[last, 4, 8, 12, 16] in hidden-state numbering (ELITE's choice; S1 comes from the deepest layer)."""
    if depth < max(MID_LAYERS):
        raise ValueError(f"PhotoVerse reads CLIP-vision layers 4, 8, 12 and 16; this CLIP vision has only {depth} layers")
    return (int(depth),) + MID_LAYERS


def describe_clip_vision(sig: dict) -> str:
    known = {(1024, 24, 224): "ViT-L/14", (1024, 24, 336): "ViT-L/14-336", (1280, 32, 224): "ViT-H/14",
             (1664, 48, 224): "ViT-bigG/14"}
    name = known.get((sig.get("width"), sig.get("layers"), sig.get("image_size")))
    detail = f"width {sig.get('width')}, {sig.get('layers')} layers, {sig.get('image_size')}px"
    return f"{name} ({detail})" if name else f"a CLIP vision model ({detail})"


@dataclass(frozen=True)
class PhotoVerseSpec:
    """What a PhotoVerse adapter was built for; stored in its file's metadata."""
    text_width: int               # d_txt: width of the words (the text encoder's token embedding)
    context_dim: int              # d_ctx: cross-attention context width (visual tokens, K^S/V^S inputs)
    clip_vision: dict             # {"width", "layers", "image_size", "patch"} of the CLIP vision it reads
    clip_layers: tuple            # hidden-state indices, one word / visual token each, deepest first
    sites: dict                   # site name -> {"query_dim", "inner_dim", "context_dim"}
    hidden: int = HIDDEN
    lora_rank: int = LORA_RANK
    base_model: str = ""          # AttentionLayout.describe() of the model it was built for
    model_name: str = ""
    model_channels: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def for_models(cls, layout, clip_vision: dict, text_width: int | None = None, hidden: int = HIDDEN,
                   lora_rank: int = LORA_RANK, clip_layers=None):
        """Sized from a model's attention layout and a CLIP vision signature. text_width defaults to the context
        width, which is the text encoder's width for SD1.x (768) and SD2.x (1024)."""
        layers = tuple(int(x) for x in (clip_layers or default_clip_layers(int(clip_vision["layers"]))))
        sites = {s.name: {"query_dim": s.query_dim, "inner_dim": s.inner_dim, "context_dim": s.context_dim}
                 for s in layout.sites}
        return cls(text_width=int(text_width or layout.context_dim), context_dim=int(layout.context_dim),
                   clip_vision={k: int(clip_vision[k]) for k in ("width", "layers", "image_size", "patch")},
                   clip_layers=layers, sites=sites, hidden=int(hidden), lora_rank=int(lora_rank),
                   base_model=layout.describe(), model_name=layout.model_name,
                   model_channels=int(layout.model_channels))

    @property
    def num_words(self) -> int:
        return len(self.clip_layers)

    @property
    def clip_width(self) -> int:
        return int(self.clip_vision["width"])

    def expected_shapes(self) -> dict:
        m, w, h = self.num_words, self.clip_width, self.hidden
        shapes = {**mapper_shapes(m, w, self.text_width, h, "text_adapter."),
                  **mapper_shapes(m, w, self.context_dim, h, "image_adapter.")}
        r = self.lora_rank
        for name, s in self.sites.items():
            q, inner, ctx = s["query_dim"], s["inner_dim"], s["context_dim"]
            for target, in_dim in (("q", q), ("k", ctx), ("v", ctx)):
                shapes[f"layers.{name}.lora_{target}.down.weight"] = (r, in_dim)
                shapes[f"layers.{name}.lora_{target}.up.weight"] = (inner, r)
            shapes[f"layers.{name}.visual_k.weight"] = (inner, ctx)
            shapes[f"layers.{name}.visual_v.weight"] = (inner, ctx)
        return shapes

    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.expected_shapes().values())

    def to_metadata(self) -> dict:
        return {"text_width": self.text_width, "context_dim": self.context_dim, "clip_vision": dict(self.clip_vision),
                "clip_layers": list(self.clip_layers), "sites": self.sites, "hidden": self.hidden,
                "lora_rank": self.lora_rank, "base_model": self.base_model, "model_name": self.model_name,
                "model_channels": self.model_channels}

    @classmethod
    def from_metadata(cls, meta: dict):
        """Raises KeyError / TypeError / ValueError on missing or malformed fields (the file reader words them)."""
        sites = {str(k): {f: int(v[f]) for f in ("query_dim", "inner_dim", "context_dim")}
                 for k, v in meta["sites"].items()}
        if not sites:
            raise ValueError("no attention blocks listed")
        cv = {k: int(meta["clip_vision"][k]) for k in ("width", "layers", "image_size", "patch")}
        return cls(text_width=int(meta["text_width"]), context_dim=int(meta["context_dim"]), clip_vision=cv,
                   clip_layers=tuple(int(x) for x in meta["clip_layers"]), sites=sites,
                   hidden=int(meta.get("hidden", HIDDEN)), lora_rank=int(meta.get("lora_rank", LORA_RANK)),
                   base_model=str(meta.get("base_model", "")), model_name=str(meta.get("model_name", "")),
                   model_channels=int(meta.get("model_channels", 0)))


class LowRank(torch.nn.Module):
    """A LoRA pair: forward(x) = up(down(x)); delta() = up.weight @ down.weight, the weight update dW."""

    def __init__(self, in_dim, out_dim, rank, ops, dtype=None, device=None):
        super().__init__()
        self.down = ops.Linear(in_dim, rank, bias=False, dtype=dtype, device=device)
        self.up = ops.Linear(rank, out_dim, bias=False, dtype=dtype, device=device)

    def forward(self, x):
        return self.up(self.down(x))

    def delta(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight


class PhotoVerseLayer(torch.nn.Module):
    """What PhotoVerse adds to one cross-attention block."""

    def __init__(self, query_dim, inner_dim, context_dim, rank, ops, dtype=None, device=None):
        super().__init__()
        self.lora_q = LowRank(query_dim, inner_dim, rank, ops, dtype, device)
        self.lora_k = LowRank(context_dim, inner_dim, rank, ops, dtype, device)
        self.lora_v = LowRank(context_dim, inner_dim, rank, ops, dtype, device)
        self.visual_k = ops.Linear(context_dim, inner_dim, bias=False, dtype=dtype, device=device)
        self.visual_v = ops.Linear(context_dim, inner_dim, bias=False, dtype=dtype, device=device)

    def lora(self, target: str) -> LowRank:
        return getattr(self, f"lora_{target}")


class PhotoVerseAdapter(torch.nn.Module):
    def __init__(self, spec: PhotoVerseSpec, dtype=None, device=None, operations=None):
        super().__init__()
        ops = operations or torch.nn
        self.spec = spec
        m, w = spec.num_words, spec.clip_width
        self.text_adapter = EliteMapper(m, w, spec.text_width, spec.hidden, dtype, device, ops)
        self.image_adapter = EliteMapper(m, w, spec.context_dim, spec.hidden, dtype, device, ops)
        self.layers = torch.nn.ModuleDict({
            name: PhotoVerseLayer(s["query_dim"], s["inner_dim"], s["context_dim"], spec.lora_rank, ops, dtype, device)
            for name, s in spec.sites.items()})

    def layer(self, key) -> PhotoVerseLayer:
        return self.layers[f"{key[0]}_{int(key[1])}_{int(key[2])}"]

    def words(self, features: torch.Tensor) -> torch.Tensor:
        """(B, m, T, W) multi-layer CLIP features -> (B, m, d_txt) pseudo-words S1..Sm."""
        return self.text_adapter(features)

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, m, T, W) -> (B, m, d_ctx) visual tokens f."""
        return self.image_adapter(features)

    @torch.no_grad()
    def init_random(self, seed: int = 0, scale: float = 1.0):
        """Random weights (std scale/sqrt(fan_in), LayerNorms identity): test files, demos, benchmarks."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (scale / p.shape[1] ** 0.5))
        return self

    @torch.no_grad()
    def init_for_training(self, model_patcher, layout):
        """The starting point of training: K^S/V^S copied from each block's attn2 to_k/to_v (IP-Adapter
        [IPA tutorial_train.py]), LoRA up = 0 so dW starts at 0; the mappers keep their default init.
        Reads weights once here (never inside a patch)."""
        sd = model_patcher.model.diffusion_model.state_dict()
        for site in layout.sites:
            layer = self.layers[site.name]
            layer.visual_k.weight.copy_(sd[f"{site.path}.attn2.to_k.weight"])
            layer.visual_v.weight.copy_(sd[f"{site.path}.attn2.to_v.weight"])
            for t in LORA_TARGETS:
                torch.nn.init.zeros_(layer.lora(t).up.weight)
        return self


def fusion_scales(u: torch.Tensor, r1: float = R1, r2: float = R2) -> tuple:
    """(gamma_T, sigma_V) for uniform draws u: (2, 0) if u < r1, (0, 2) if r1 <= u < r2, else (1, 1)."""
    if not 0.0 <= r1 <= r2 <= 1.0:
        raise ValueError(f"the fusion thresholds must satisfy 0 <= r1 <= r2 <= 1 (got r1={r1}, r2={r2})")
    u = torch.as_tensor(u, dtype=torch.float32)
    text_only, image_only = u < r1, (u >= r1) & (u < r2)
    gamma = torch.where(text_only, 2.0, torch.where(image_only, 0.0, 1.0))
    sigma = torch.where(text_only, 0.0, torch.where(image_only, 2.0, 1.0))
    return gamma, sigma


def draw_fusion_scales(batch: int, generator: torch.Generator | None = None, r1: float = R1, r2: float = R2):
    """One random-fusion draw per sample of a training batch, shared by all layers (PV5). Returns (gamma, sigma),
    each of shape (batch,), for the trainer to hand to the fused attention."""
    u = torch.rand(batch, generator=generator)
    return fusion_scales(u, r1, r2)
