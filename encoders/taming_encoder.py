"""The Taming Encoder's trainable modules (Taming Encoder (Jia et al. 2023); docs/methods/taming-encoder.md), one nn.Module for inference and
training.

- ObjectProjection: frozen CLIP-vision tokens of the masked subject (B, T, W) -> object tokens (B, N, context).
  queries > 0: a Perceiver resampler (N = queries learned latents that attend to the CLIP tokens, the choice
  named after IP-Adapter-Plus); queries = 0: every CLIP token through Linear + LayerNorm (N = T).
- TamingLayer, one per attn2 site: the added cross-attention's own K/V (context -> heads*dim_head, no bias,
  initialised from the block's attn2 to_k/to_v) and a zero-initialised scalar gate g; the site's output
  becomes Attn(Q, K_text, V_text) + weight * tanh(g) * Attn(Q, K_o(o), V_o(o)), before to_out.
- the null embedding phi that general-domain training samples get instead of o (object-embedding dropping, seed
  003 §3.4 eq. 4) and that CFG's unconditional pass attends to. Eq. 4 puts phi where o = f_o(x * m) goes, and
  calls it fixed: with null = "fixed" (the default) phi is a constant in the object-embedding space (all-zero
  CLIP tokens), so the null tokens the attention sees are the projection of that constant, recomputed from the
  current projection (the file keeps a copy in null_tokens); with null = "learned" the null tokens are a free
  parameter (the pack's first design, kept as an option; files without the field are read as learned).
  Either way it has N tokens, the same as the object tokens, so cond and uncond rows share one attention call.
Layers use the host's manual-cast ops by default, so weights stored in one dtype run in the model's.
"""
import math
from dataclasses import dataclass, field

import torch

from ..core.layout import AttentionLayout

# Known CLIP vision towers, told apart by (hidden width, layers); the host loads all of them as CLIP_VISION.
VISION_NAMES = {(1024, 24): "ViT-L/14", (1280, 32): "ViT-H/14", (1664, 48): "ViT-bigG/14"}
NULL_MODES = ("fixed", "learned")
RESAMPLER_MAX_WIDTH = 1280   # IP-Adapter-Plus: 768 wide for SD1.5, 1280 (not the 2048 context) for SDXL


@dataclass(frozen=True)
class VisionSpec:
    """What a CLIP vision tower gives the encoder: penultimate hidden states, tokens x hidden_size."""
    hidden_size: int
    tokens: int
    layers: int = 0          # 0 when unknown
    image_size: int = 224

    @property
    def name(self) -> str:
        return VISION_NAMES.get((self.hidden_size, self.layers), "a CLIP vision model")

    def describe(self) -> str:
        layers = f", {self.layers} layers" if self.layers else ""
        return f"{self.name} ({self.hidden_size} wide{layers}, {self.tokens} tokens)"

    def matches(self, other: "VisionSpec") -> bool:
        if (self.hidden_size, self.tokens) != (other.hidden_size, other.tokens):
            return False
        return not (self.layers and other.layers and self.layers != other.layers)

    def to_dict(self) -> dict:
        return {"hidden_size": self.hidden_size, "tokens": self.tokens, "layers": self.layers,
                "image_size": self.image_size}

    @classmethod
    def from_dict(cls, d: dict) -> "VisionSpec":
        return cls(int(d["hidden_size"]), int(d["tokens"]), int(d.get("layers", 0)), int(d.get("image_size", 224)))

    @classmethod
    def of_clip_vision(cls, clip_vision) -> "VisionSpec":
        """Read the tower's shape from a host ClipVisionModel without running it (build time, not in a patch)."""
        model = getattr(clip_vision, "model", None)
        if model is None or not hasattr(clip_vision, "encode_image"):
            raise ValueError("clip_vision must be a CLIP_VISION model (Load CLIP Vision)")
        vm = getattr(model, "vision_model", None)
        if vm is None:
            raise ValueError(f"clip_vision is a {type(model).__name__}, not a CLIP vision transformer; the Taming "
                             "Encoder needs a CLIP or SigLIP vision model (ViT-L/14, ViT-H/14, ...)")
        emb = vm.embeddings
        hidden = int(emb.patch_embedding.out_channels)
        tokens = int(emb.position_embedding.num_embeddings)
        return cls(hidden, tokens, len(vm.encoder.layers), int(getattr(clip_vision, "image_size", 224)))


@dataclass(frozen=True)
class TamingSpec:
    """What a Taming Encoder adapter was built for and how its projection is shaped."""
    blocks: dict                 # attn2 site name -> {"inner": heads*dim_head, "heads": heads}
    context_dim: int
    vision: VisionSpec
    queries: int = 16            # object tokens N (0: every CLIP token, N = vision.tokens)
    depth: int = 4               # resampler blocks
    heads: int = 12              # resampler heads
    dim_head: int = 64
    ff_mult: int = 4
    base_model: str = ""         # AttentionLayout.describe() of the model it was built for
    model_name: str = ""
    model_channels: int = 0
    null: str = "learned"        # "fixed" (eq. 4; what for_layout builds) or "learned"; old files are learned
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.null not in NULL_MODES:
            raise ValueError(f"null embedding must be one of {', '.join(NULL_MODES)} (got {self.null!r})")

    @property
    def tokens(self) -> int:
        return self.queries if self.queries > 0 else self.vision.tokens

    @property
    def width(self) -> int:
        """The resampler's working width (heads * dim_head)."""
        return self.heads * self.dim_head

    @classmethod
    def for_layout(cls, layout: AttentionLayout, vision: VisionSpec, queries: int = 16, depth: int = 4,
                   heads: int | None = None, dim_head: int | None = None, ff_mult: int = 4, null: str = "fixed"):
        """Sized from the model (attn2 sites, context width) and the connected CLIP vision (its width, tokens).
        The resampler works at the context width, at most 1280, with 64-wide heads, as IP-Adapter-Plus does
        (SD1.5: 768 = 12 x 64; SDXL: 1280 = 20 x 64, then projected to the 2048-wide context)."""
        width = min(layout.context_dim, RESAMPLER_MAX_WIDTH)
        if heads is None:
            heads = max(1, width // 64)
        if dim_head is None:
            dim_head = max(1, width // heads)
        blocks = {s.name: {"inner": s.inner_dim, "heads": s.heads} for s in layout.sites}
        return cls(blocks=blocks, context_dim=layout.context_dim, vision=vision, queries=int(queries),
                   depth=int(depth) if queries > 0 else 0, heads=int(heads), dim_head=int(dim_head),
                   ff_mult=int(ff_mult), base_model=layout.describe(), model_name=layout.model_name,
                   model_channels=layout.model_channels, null=null)

    def expected_shapes(self) -> dict:
        """{state_dict key: shape} of the module this spec builds (built on the meta device, nothing allocated)."""
        module = TamingEncoder(self, device="meta", operations=_plain_ops())
        return {k: tuple(v.shape) for k, v in module.state_dict().items()}

    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.expected_shapes().values())


def _plain_ops():
    class Ops:
        Linear = torch.nn.Linear
        LayerNorm = torch.nn.LayerNorm
    return Ops


def _default_ops(operations):
    if operations is not None:
        return operations
    import comfy.ops
    return comfy.ops.manual_cast


def _cast(p, like):
    return p.to(device=like.device, dtype=like.dtype)


def multi_head_attention(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head; (B, Tq, H*d), (B, Tk, H*d) -> (B, Tq, H*d), torch SDPA (autograd-safe)."""
    b, tq, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, tq, heads, d).transpose(1, 2)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.reshape(b, v.shape[1], heads, d).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)
    return out.transpose(1, 2).reshape(b, tq, inner)


class ResamplerBlock(torch.nn.Module):
    """Latents attend to [CLIP tokens; latents] (Perceiver style), then a GELU feed-forward; both residual."""

    def __init__(self, width, heads, dim_head, ff_mult, dtype=None, device=None, operations=None):
        super().__init__()
        ops = operations
        inner = heads * dim_head
        self.heads = heads
        self.norm_tokens = ops.LayerNorm(width, dtype=dtype, device=device)
        self.norm_latents = ops.LayerNorm(width, dtype=dtype, device=device)
        self.to_q = ops.Linear(width, inner, bias=False, dtype=dtype, device=device)
        self.to_k = ops.Linear(width, inner, bias=False, dtype=dtype, device=device)
        self.to_v = ops.Linear(width, inner, bias=False, dtype=dtype, device=device)
        self.to_out = ops.Linear(inner, width, bias=False, dtype=dtype, device=device)
        self.norm_ff = ops.LayerNorm(width, dtype=dtype, device=device)
        self.ff_in = ops.Linear(width, width * ff_mult, bias=False, dtype=dtype, device=device)
        self.ff_out = ops.Linear(width * ff_mult, width, bias=False, dtype=dtype, device=device)

    def forward(self, tokens, latents):
        t, lat = self.norm_tokens(tokens), self.norm_latents(latents)
        both = torch.cat([t, lat], dim=1)
        attended = multi_head_attention(self.to_q(lat), self.to_k(both), self.to_v(both), self.heads)
        latents = latents + self.to_out(attended)
        return latents + self.ff_out(torch.nn.functional.gelu(self.ff_in(self.norm_ff(latents))))


class ObjectProjection(torch.nn.Module):
    """CLIP-vision tokens (B, T, W) -> object tokens (B, N, context)."""

    def __init__(self, spec: TamingSpec, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _default_ops(operations)
        self.queries = spec.queries
        if spec.queries > 0:
            width = spec.width
            self.proj_in = ops.Linear(spec.vision.hidden_size, width, dtype=dtype, device=device)
            self.latents = torch.nn.Parameter(torch.empty(1, spec.queries, width, dtype=dtype, device=device))
            self.blocks = torch.nn.ModuleList([
                ResamplerBlock(width, spec.heads, spec.dim_head, spec.ff_mult, dtype, device, ops)
                for _ in range(spec.depth)])
            self.proj_out = ops.Linear(width, spec.context_dim, dtype=dtype, device=device)
        else:
            self.proj_out = ops.Linear(spec.vision.hidden_size, spec.context_dim, dtype=dtype, device=device)
        self.norm_out = ops.LayerNorm(spec.context_dim, dtype=dtype, device=device)

    def forward(self, features):
        if self.queries > 0:
            x = self.proj_in(features)
            latents = _cast(self.latents, x).expand(x.shape[0], -1, -1)
            for block in self.blocks:
                latents = block(x, latents)
            return self.norm_out(self.proj_out(latents))
        return self.norm_out(self.proj_out(features))


class TamingLayer(torch.nn.Module):
    """The added cross-attention of one attn2 site: its own K/V and a scalar gate (tanh(gate) scales the term)."""

    def __init__(self, context_dim, inner, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _default_ops(operations)
        self.to_k = ops.Linear(context_dim, inner, bias=False, dtype=dtype, device=device)
        self.to_v = ops.Linear(context_dim, inner, bias=False, dtype=dtype, device=device)
        self.gate = torch.nn.Parameter(torch.zeros(1, dtype=dtype, device=device))

    def gate_value(self, like):
        return torch.tanh(_cast(self.gate, like))


class TamingEncoder(torch.nn.Module):
    """Projection + null embedding + one TamingLayer per attn2 site (keys: layers.<site name>)."""

    def __init__(self, spec: TamingSpec, dtype=None, device=None, operations=None):
        super().__init__()
        ops = _default_ops(operations)
        self.spec = spec
        self.projection = ObjectProjection(spec, dtype, device, ops)
        null = torch.empty(1, spec.tokens, spec.context_dim, dtype=dtype, device=device)
        if spec.null == "learned":
            self.null_tokens = torch.nn.Parameter(null)
        else:  # a record of projection(phi) for the file; null_embedding() recomputes it from the projection
            self.register_buffer("null_tokens", null)
        self.layers = torch.nn.ModuleDict({
            name: TamingLayer(spec.context_dim, b["inner"], dtype, device, ops) for name, b in spec.blocks.items()})

    def layer(self, key) -> TamingLayer:
        return self.layers[f"{key[0]}_{int(key[1])}_{int(key[2])}"]

    def project(self, features):
        """CLIP tokens (B, T, W) -> object tokens (B, N, context), in the features' dtype and device."""
        if features.ndim != 3 or features.shape[-1] != self.spec.vision.hidden_size:
            raise ValueError("the projection expects CLIP-vision tokens (batch, tokens, "
                             f"{self.spec.vision.hidden_size}); got {tuple(features.shape)}")
        return self.projection(features)

    def null_features(self, like=None):
        """phi of eq. 4 in the object-embedding space: all-zero CLIP tokens (1, T, W) (fixed mode)."""
        p = next(self.projection.parameters())
        like = p if like is None else like
        dtype = like.dtype if like.dtype.is_floating_point else torch.float32
        return torch.zeros(1, self.spec.vision.tokens, self.spec.vision.hidden_size, dtype=dtype, device=like.device)

    def null_embedding(self, batch: int = 1, like=None):
        """The null tokens (batch, N, context): the projection of the fixed phi, or the learned parameter. In
        fixed mode gradients reach the projection through it, as phi enters the network where o does."""
        if self.spec.null == "fixed":
            null = self.project(self.null_features(like))
            null = null if like is None else _cast(null, like)
        else:
            null = self.null_tokens if like is None else _cast(self.null_tokens, like)
        return null.expand(batch, -1, -1)

    @torch.no_grad()
    def refresh_null(self):
        """Fixed mode: store the projection of phi in null_tokens (what the file holds); learned: nothing to do."""
        if self.spec.null == "fixed":
            self.null_tokens.copy_(self.project(self.null_features()).to(self.null_tokens.dtype))
        return self

    # --- initialisation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def init_projection(self, seed: int = 0):
        """Default initialisation of the projection (Linear: std 1/sqrt(fan_in), LayerNorm: identity, latents:
        std 1/sqrt(width)). The host's ops leave weights uninitialised, so every tensor is set here."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.projection.named_parameters():
            if name == "latents":
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[1] ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        return self

    @torch.no_grad()
    def init_null_from_projection(self):
        """The null tokens start as the projection of all-zero CLIP tokens; in
        learned mode they are free from there on, in fixed mode they stay that projection."""
        self.null_tokens.copy_(self.project(self.null_features()))
        return self

    @torch.no_grad()
    def init_from_model(self, model_patcher, layout: AttentionLayout, seed: int = 0):
        """Training start: K/V copies of each block's attn2 to_k/to_v, gates 0 (the model starts exactly as
        the base model), default projection, null tokens = projection of zeros. Reads the base weights once."""
        sd = model_patcher.model.diffusion_model.state_dict()
        for site in layout.sites:
            layer = self.layers[site.name]
            layer.to_k.weight.copy_(sd[f"{site.path}.attn2.to_k.weight"])
            layer.to_v.weight.copy_(sd[f"{site.path}.attn2.to_v.weight"])
            layer.gate.zero_()
        self.init_projection(seed)
        return self.init_null_from_projection()

    @torch.no_grad()
    def init_random(self, seed: int = 0, scale: float = 1.0, gate: float = 1.0):
        """Random weights for test files and smoke runs (not a trained adapter): K/V std scale/sqrt(context),
        every gate = `gate`, random null tokens when they are learned (else the projection of phi)."""
        g = torch.Generator().manual_seed(seed + 1)
        self.init_projection(seed)
        for layer in self.layers.values():
            for lin in (layer.to_k, layer.to_v):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * (scale / lin.weight.shape[1] ** 0.5))
            layer.gate.fill_(gate)
        if self.spec.null == "learned":
            self.null_tokens.copy_(torch.randn(self.null_tokens.shape, generator=g))
            return self
        return self.refresh_null()
