"""The Taming Encoder adapter file (safetensors) and its validation.

Keys:
    projection.*                      the ObjectProjection (resampler or per-token linear)
    null_tokens         (1, N, C)     the null tokens: the projection of the fixed phi (eq. 4), or the learned ones
    layers.<site>.to_k.weight (inner, C)   added K of the attn2 block <site> (e.g. input_1_0 = ("input", 1, 0))
    layers.<site>.to_v.weight (inner, C)
    layers.<site>.gate        (1,)         tanh(gate) scales the added attention (0 at the start of training)
Metadata: likeness_format "likeness.taming", version 1, method, base_model (readable), model_name, context_dim,
model_channels, blocks {site: {inner, heads}}, vision {hidden_size, tokens, layers, image_size}, projection
{queries, depth, heads, dim_head, ff_mult}, null_embedding ("fixed": null_tokens is the projection of all-zero
CLIP tokens, recomputed from the projection on load; "learned": null_tokens is itself trained; files written before
the field existed hold learned ones), origin ("trained" or "random"), optional tuned_unet_digest (the paper tunes
the whole UNet: the digest of the UNet the adapter was trained with) and training hyper-parameters.
"""
import os

import torch

from ..encoders.taming_encoder import NULL_MODES, TamingEncoder, TamingSpec, VisionSpec
from .safetensors_file import (WeightFileError, check_format, check_tensors, load_file, read_header,
                               register_format, save_file)

FORMAT = "likeness.taming"
VERSION = 1
WHAT = "Taming Encoder adapter file"
register_format(FORMAT, WHAT)

_SPEC_EXTRA = ("tuned_unet_digest",)


class TamingAdapter:
    """A loaded adapter (the LIKENESS_TAMING type): the module, the ModelPatcher the host loads and offloads it
    with (together with the UNet), and where it came from."""

    def __init__(self, module: TamingEncoder, name: str = "adapter", meta: dict | None = None):
        import comfy.model_management
        import comfy.model_patcher

        self.module, self.name, self.meta = module, name, dict(meta or {})
        self.patcher = comfy.model_patcher.ModelPatcher(
            module, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())

    def __repr__(self):
        return f"TamingAdapter({self.name}: {self.module.spec.base_model}, {self.module.spec.vision.name})"


def spec_metadata(spec: TamingSpec) -> dict:
    meta = {"method": "taming_encoder", "base_model": spec.base_model, "model_name": spec.model_name,
            "context_dim": spec.context_dim, "model_channels": spec.model_channels, "blocks": spec.blocks,
            "vision": spec.vision.to_dict(),
            "projection": {"queries": spec.queries, "depth": spec.depth, "heads": spec.heads,
                           "dim_head": spec.dim_head, "ff_mult": spec.ff_mult},
            "null_embedding": spec.null}
    meta.update({k: spec.extra[k] for k in _SPEC_EXTRA if k in spec.extra})
    return meta


def spec_from_metadata(path: str, meta: dict) -> TamingSpec:
    name = os.path.basename(path)
    missing = [k for k in ("blocks", "context_dim", "vision", "projection") if k not in meta]
    if missing:
        raise WeightFileError(f"'{name}' is a Taming Encoder file without {', '.join(missing)} in its metadata; "
                              "it is damaged")
    try:
        blocks = {str(k): {"inner": int(v["inner"]), "heads": int(v["heads"])} for k, v in meta["blocks"].items()}
        if not blocks:
            raise ValueError("no attention blocks listed")
        proj = meta["projection"]
        null = str(meta.get("null_embedding", "learned"))  # files from before the field: a learned phi
        if null not in NULL_MODES:
            raise ValueError(f"null_embedding {null!r} is neither {' nor '.join(NULL_MODES)}")
        return TamingSpec(
            blocks=blocks, context_dim=int(meta["context_dim"]), vision=VisionSpec.from_dict(meta["vision"]),
            queries=int(proj["queries"]), depth=int(proj["depth"]), heads=int(proj["heads"]),
            dim_head=int(proj["dim_head"]), ff_mult=int(proj["ff_mult"]), base_model=str(meta.get("base_model", "")),
            model_name=str(meta.get("model_name", "")), model_channels=int(meta.get("model_channels", 0)), null=null,
            extra={k: meta[k] for k in _SPEC_EXTRA if k in meta})
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise WeightFileError(f"'{name}' has unreadable Taming Encoder metadata ({e}); it is damaged") from e


def save_taming(path: str, module: TamingEncoder, origin: str = "trained", extra: dict | None = None,
                dtype=torch.float16):
    meta = {**spec_metadata(module.spec), "origin": origin, **(extra or {})}
    module.refresh_null()  # fixed phi: the file holds the projection it gives with these weights
    tensors = {k: v.detach().to(dtype) for k, v in module.state_dict().items()}
    return save_file(path, tensors, FORMAT, VERSION, meta)


def read_spec(path: str) -> TamingSpec:
    """The spec of a Taming Encoder file from its header alone (no tensors read)."""
    meta, _ = read_header(path, WHAT)
    check_format(path, meta, FORMAT, (VERSION,), WHAT)
    return spec_from_metadata(path, meta)


def load_taming_module(path: str, dtype=None) -> tuple[TamingEncoder, dict]:
    """Load and validate a Taming Encoder file into a module on the CPU (frozen)."""
    tensors, meta = load_file(path, FORMAT, (VERSION,), WHAT)
    spec = spec_from_metadata(path, meta)
    check_tensors(path, tensors, spec.expected_shapes(), WHAT)
    dtype = dtype or next(iter(tensors.values())).dtype
    module = TamingEncoder(spec, dtype=dtype, device="cpu")
    module.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    module.requires_grad_(False)
    module.eval()
    return module, meta


def load_taming(path: str, dtype=None) -> TamingAdapter:
    module, meta = load_taming_module(path, dtype)
    return TamingAdapter(module, os.path.basename(path), meta)


def check_taming_for_model(spec: TamingSpec, layout, name: str = "the adapter"):
    """Plain-word errors when an adapter does not fit the loaded model."""
    built_for = spec.base_model or f"{spec.model_name or 'a model'} (context {spec.context_dim})"
    if spec.context_dim != layout.context_dim:
        raise WeightFileError(
            f"{name} was trained for {built_for} but the model is {layout.describe()}: load a Taming Encoder "
            "trained for this base model")
    model_blocks = {s.name: s for s in layout.sites}
    if set(spec.blocks) != set(model_blocks):
        only_adapter = sorted(set(spec.blocks) - set(model_blocks))
        only_model = sorted(set(model_blocks) - set(spec.blocks))
        raise WeightFileError(
            f"{name} was trained for {built_for}, whose attention blocks differ from this model "
            f"({layout.describe()}): adapter-only blocks {only_adapter[:4]}, model-only blocks {only_model[:4]}")
    for block, b in spec.blocks.items():
        s = model_blocks[block]
        if b["inner"] != s.inner_dim:
            raise WeightFileError(
                f"{name} has attention width {b['inner']} at block {block} but the model has {s.inner_dim}; "
                f"it was trained for {built_for}")


def check_taming_for_vision(spec: TamingSpec, vision: VisionSpec, name: str = "the adapter"):
    """The projection is sized from the CLIP vision model it was trained with: the embedding must come from it."""
    if not spec.vision.matches(vision):
        raise WeightFileError(
            f"{name} was trained on {spec.vision.describe()} features but the object embedding comes from "
            f"{vision.describe()}: encode the subject with the CLIP vision model the adapter was trained with")


def write_random_taming(path: str, model_patcher, vision: VisionSpec, queries: int = 16, depth: int = 2,
                        seed: int = 0, scale: float = 1.0, gate: float = 1.0, dtype=torch.float16, null: str = "fixed"):
    """A Taming Encoder file with random weights for the given model and CLIP vision shape (tests, demos,
    benchmarks: not a trained adapter)."""
    from ..core.layout import attention_layout

    spec = TamingSpec.for_layout(attention_layout(model_patcher), vision, queries=queries, depth=depth, null=null)
    module = TamingEncoder(spec, dtype=torch.float32, device="cpu").init_random(seed, scale, gate)
    return save_taming(path, module, origin="random", dtype=dtype)
