"""PhotoVerse's trainable modules (docs/methods/photoverse.md): the text adapters, the image adapter, and per
cross-attention block the text branch's K/V change and the visual projections K^S/V^S.

  text adapters  one per text encoder of the base model (SD1.x/SD2.x: one; SDXL: clip_l and clip_g), each mapping
                 CLIP-vision layers [last, 4, 8, 12, 16] to words S1..S5 of that encoder's token width
  image adapter  the same design -> visual tokens f of the cross-attention context width
  per block      text_kv "lora": LoRA dW = up @ down (rank 8) on attn2 to_q (query width -> inner), to_k and to_v
                 (context -> inner); text_kv "replace": full to_k / to_v weights that replace the block's own
                 (ELITE's to_k_global / to_v_global);
                 visual_k, visual_v: Linear(context -> inner, no bias), IP-Adapter's to_k_ip/to_v_ip
The mappers are the paper's per-layer MLP by default (encoders/photoverse_mlp.py, "mlp") or ELITE's heads
(encoders/elite_mapper.py, "elite"; "elite_local" for ELITE's local mapper as the image adapter). Everything is
sized from the connected models (PhotoVerseSpec.for_models), so one code path serves SD1.5 (text 768, context 768,
ViT-L/14), SD2 (1024, 1024, ViT-H/14) and SDXL (texts 768 + 1280, context 2048, ViT-H or bigG). The same modules
serve inference (inside a ModelPatcher, built on comfy.ops.manual_cast) and training (torch.nn, the default).

Layer numbering: clip_layers counts like the HF CLIP hidden_states tuple, so 0 is the embedding output and
i >= 1 the output of encoder layer i; the last one (24 for ViT-L) is last_hidden_state before the post-LayerNorm,
which is what ELITE feeds its first mapper [ELITE train_global.py].
"""
import math
from dataclasses import dataclass, field

import torch

from .elite_mapper import HIDDEN, EliteLocalMapper, EliteMapper
from .photoverse_mlp import LayerMLPMapper

LORA_RANK = 8
MID_LAYERS = (4, 8, 12, 16)
LORA_TARGETS = ("q", "k", "v")
TEXT_MAPPERS = ("mlp", "elite")
IMAGE_MAPPERS = ("mlp", "elite", "elite_local", "none")
TEXT_KV = ("lora", "replace")
# How a face photo becomes CLIP input: "photoverse" = x_m (masked crop, centre square) for both branches;
# "elite" = ELITE's: the unmasked image (resized, not cropped) for the words, the masked one for the local tokens.
PREPROCESS = ("photoverse", "elite")
MAPPER_CLASSES = {"mlp": LayerMLPMapper, "elite": EliteMapper, "elite_local": EliteLocalMapper}

# Training-time random fusion (PhotoVerse §2.4, §3.2): u < r1 -> text only, r1 <= u < r2 -> image only, else both.
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


def _choice(name, value, options):
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)} (got {value!r})")
    return value


@dataclass(frozen=True)
class PhotoVerseSpec:
    """What a PhotoVerse adapter was built for and what it holds; stored in its file's metadata."""
    text_widths: tuple            # d_txt of each text encoder (token-embedding widths), in the CLIP's order
    context_dim: int              # d_ctx: cross-attention context width (visual tokens, K^S/V^S inputs)
    clip_vision: dict             # {"width", "layers", "image_size", "patch"} of the CLIP vision it reads
    clip_layers: tuple            # hidden-state indices, one word / visual token each, deepest first
    sites: dict                   # site name -> {"query_dim", "inner_dim", "context_dim"}
    hidden: int = HIDDEN
    lora_rank: int = LORA_RANK
    text_mapper: str = "mlp"      # TEXT_MAPPERS
    image_mapper: str = "mlp"     # IMAGE_MAPPERS
    text_kv: str = "lora"         # TEXT_KV
    preprocess: str = "photoverse"
    base_model: str = ""          # AttentionLayout.describe() of the model it was built for
    model_name: str = ""
    model_channels: int = 0
    source: str = ""              # where the weights came from (a converted checkpoint), "" for the pack's own
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        _choice("text_mapper", self.text_mapper, TEXT_MAPPERS)
        _choice("image_mapper", self.image_mapper, IMAGE_MAPPERS)
        _choice("text_kv", self.text_kv, TEXT_KV)
        _choice("preprocess", self.preprocess, PREPROCESS)
        if not self.text_widths:
            raise ValueError("a PhotoVerse adapter needs at least one text width")

    @classmethod
    def for_models(cls, layout, clip_vision: dict, text_widths=None, hidden: int = HIDDEN,
                   lora_rank: int = LORA_RANK, clip_layers=None, mapper: str = "mlp", **kw):
        """Sized from a model's attention layout and a CLIP vision signature. text_widths are the text encoders'
        token widths (concepts/photoverse_concept.py clip_text_widths reads them from a CLIP); they default to the
        context width, which is the one text encoder's width for SD1.x (768) and SD2.x (1024). mapper sets both
        the text and the image mapper ("mlp", the paper's, or "elite")."""
        layers = tuple(int(x) for x in (clip_layers or default_clip_layers(int(clip_vision["layers"]))))
        sites = {s.name: {"query_dim": s.query_dim, "inner_dim": s.inner_dim, "context_dim": s.context_dim}
                 for s in layout.sites}
        widths = tuple(int(w) for w in (text_widths or (layout.context_dim,)))
        kw = {"text_mapper": mapper, "image_mapper": mapper, **kw}
        return cls(text_widths=widths, context_dim=int(layout.context_dim),
                   clip_vision={k: int(clip_vision[k]) for k in ("width", "layers", "image_size", "patch")},
                   clip_layers=layers, sites=sites, hidden=int(hidden), lora_rank=int(lora_rank),
                   base_model=layout.describe(), model_name=layout.model_name,
                   model_channels=int(layout.model_channels), **kw)

    @property
    def num_words(self) -> int:
        return len(self.clip_layers)

    @property
    def clip_width(self) -> int:
        return int(self.clip_vision["width"])

    @property
    def has_visual(self) -> bool:
        return self.image_mapper != "none"

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per photo: one per CLIP layer, or one per patch for ELITE's local mapper."""
        if self.image_mapper == "elite_local":
            return (int(self.clip_vision["image_size"]) // int(self.clip_vision["patch"])) ** 2
        return self.num_words if self.has_visual else 0

    def expected_shapes(self) -> dict:
        m, w, h = self.num_words, self.clip_width, self.hidden
        shapes = {}
        for width in self.text_widths:
            shapes.update(MAPPER_CLASSES[self.text_mapper].shapes(m, w, width, h, f"text_adapters.{width}."))
        if self.has_visual:
            shapes.update(MAPPER_CLASSES[self.image_mapper].shapes(m, w, self.context_dim, h, "image_adapter."))
        r = self.lora_rank
        for name, s in self.sites.items():
            q, inner, ctx = s["query_dim"], s["inner_dim"], s["context_dim"]
            if self.text_kv == "lora":
                for target, in_dim in (("q", q), ("k", ctx), ("v", ctx)):
                    shapes[f"layers.{name}.lora_{target}.down.weight"] = (r, in_dim)
                    shapes[f"layers.{name}.lora_{target}.up.weight"] = (inner, r)
            else:
                shapes[f"layers.{name}.text_k.weight"] = (inner, ctx)
                shapes[f"layers.{name}.text_v.weight"] = (inner, ctx)
            if self.has_visual:
                shapes[f"layers.{name}.visual_k.weight"] = (inner, ctx)
                shapes[f"layers.{name}.visual_v.weight"] = (inner, ctx)
        return shapes

    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.expected_shapes().values())

    def to_metadata(self) -> dict:
        return {"text_widths": list(self.text_widths), "context_dim": self.context_dim,
                "clip_vision": dict(self.clip_vision), "clip_layers": list(self.clip_layers), "sites": self.sites,
                "hidden": self.hidden, "lora_rank": self.lora_rank, "text_mapper": self.text_mapper,
                "image_mapper": self.image_mapper, "text_kv": self.text_kv, "preprocess": self.preprocess,
                "base_model": self.base_model, "model_name": self.model_name, "model_channels": self.model_channels,
                "source": self.source}

    @classmethod
    def from_metadata(cls, meta: dict):
        """Raises KeyError / TypeError / ValueError on missing or malformed fields (the file reader words them).
        Version-1 files (one text width, ELITE's mappers, LoRA) carry no mapper fields."""
        sites = {str(k): {f: int(v[f]) for f in ("query_dim", "inner_dim", "context_dim")}
                 for k, v in meta["sites"].items()}
        if not sites:
            raise ValueError("no attention blocks listed")
        cv = {k: int(meta["clip_vision"][k]) for k in ("width", "layers", "image_size", "patch")}
        widths = meta["text_widths"] if "text_widths" in meta else [meta["text_width"]]
        return cls(text_widths=tuple(int(x) for x in widths), context_dim=int(meta["context_dim"]), clip_vision=cv,
                   clip_layers=tuple(int(x) for x in meta["clip_layers"]), sites=sites,
                   hidden=int(meta.get("hidden", HIDDEN)), lora_rank=int(meta.get("lora_rank", LORA_RANK)),
                   text_mapper=str(meta.get("text_mapper", "elite")), image_mapper=str(meta.get("image_mapper", "elite")),
                   text_kv=str(meta.get("text_kv", "lora")), preprocess=str(meta.get("preprocess", "photoverse")),
                   base_model=str(meta.get("base_model", "")), model_name=str(meta.get("model_name", "")),
                   model_channels=int(meta.get("model_channels", 0)), source=str(meta.get("source", "")))


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

    def __init__(self, spec: PhotoVerseSpec, site: dict, ops, dtype=None, device=None):
        super().__init__()
        q, inner, ctx = site["query_dim"], site["inner_dim"], site["context_dim"]
        if spec.text_kv == "lora":
            self.lora_q = LowRank(q, inner, spec.lora_rank, ops, dtype, device)
            self.lora_k = LowRank(ctx, inner, spec.lora_rank, ops, dtype, device)
            self.lora_v = LowRank(ctx, inner, spec.lora_rank, ops, dtype, device)
        else:
            self.text_k = ops.Linear(ctx, inner, bias=False, dtype=dtype, device=device)
            self.text_v = ops.Linear(ctx, inner, bias=False, dtype=dtype, device=device)
        if spec.has_visual:
            self.visual_k = ops.Linear(ctx, inner, bias=False, dtype=dtype, device=device)
            self.visual_v = ops.Linear(ctx, inner, bias=False, dtype=dtype, device=device)

    def lora(self, target: str) -> LowRank:
        return getattr(self, f"lora_{target}")


class PhotoVerseAdapter(torch.nn.Module):
    def __init__(self, spec: PhotoVerseSpec, dtype=None, device=None, operations=None):
        super().__init__()
        ops = operations or torch.nn
        self.spec = spec
        m, w = spec.num_words, spec.clip_width
        text = MAPPER_CLASSES[spec.text_mapper]
        self.text_adapters = torch.nn.ModuleDict({
            str(width): text(m, w, width, spec.hidden, dtype, device, ops) for width in spec.text_widths})
        if spec.has_visual:
            self.image_adapter = MAPPER_CLASSES[spec.image_mapper](m, w, spec.context_dim, spec.hidden, dtype, device, ops)
        self.layers = torch.nn.ModuleDict({
            name: PhotoVerseLayer(spec, s, ops, dtype, device) for name, s in spec.sites.items()})

    def layer(self, key) -> PhotoVerseLayer:
        return self.layers[f"{key[0]}_{int(key[1])}_{int(key[2])}"]

    def words(self, features: torch.Tensor) -> dict:
        """(B, m, T, W) multi-layer CLIP features -> {text width: (B, m, width)} pseudo-words S1..Sm per encoder."""
        return {int(width): mapper(features) for width, mapper in self.text_adapters.items()}

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, m, T, W) -> (B, n, d_ctx) visual tokens f."""
        if not self.spec.has_visual:
            raise ValueError("this PhotoVerse adapter has no image adapter (no visual branch)")
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
        """The starting point of training: K^S/V^S (and replacing text K/V) copied from each block's attn2
        to_k/to_v (IP-Adapter [IPA tutorial_train.py]), LoRA up = 0 so dW starts at 0; the mappers keep their
        default init. Reads weights once here (never inside a patch)."""
        sd = model_patcher.model.diffusion_model.state_dict()
        for site in layout.sites:
            layer = self.layers[site.name]
            to_k, to_v = sd[f"{site.path}.attn2.to_k.weight"], sd[f"{site.path}.attn2.to_v.weight"]
            if self.spec.has_visual:
                layer.visual_k.weight.copy_(to_k)
                layer.visual_v.weight.copy_(to_v)
            if self.spec.text_kv == "lora":
                for t in LORA_TARGETS:
                    torch.nn.init.zeros_(layer.lora(t).up.weight)
            else:
                layer.text_k.weight.copy_(to_k)
                layer.text_v.weight.copy_(to_v)
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
    """One random-fusion draw per sample of a training batch, shared by all layers. Returns (gamma, sigma),
    each of shape (batch,), for the trainer to hand to the fused attention."""
    u = torch.rand(batch, generator=generator)
    return fusion_scales(u, r1, r2)
