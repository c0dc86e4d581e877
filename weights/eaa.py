"""The EAA file: Inv-Adapter's Embedded Attention Adapter weights as safetensors.

Keys (one group per transformer block, named by its site, e.g. input_1_0 = ("input", 1, 0)):
    layers.<site>.self_k.weight    (inner, width)     K'_s
    layers.<site>.self_v.weight    (inner, width)     V'_s
    layers.<site>.cross_k.weight   (inner, width)     K'_c
    layers.<site>.cross_v.weight   (inner, width)     V'_c
    layers.<site>.aggregate.proj.weight (s_c, s)      token aggregation, only where s > s_c
    layers.<site>.aggregate.proj.bias   (s_c,)
Metadata: likeness_format "likeness.eaa", version 1, method, base_model (a readable description), model_name,
context_dim, model_channels, s_c, sides, reference_latent [h, w], blocks {site: {width, inner, tokens}}, origin
("trained" or "random"), plus any training hyper-parameters the trainer adds.
"""
import os

import torch

from ..encoders.embedded_attention_adapter import EAASpec, EmbeddedAttentionAdapter
from .safetensors_file import (WeightFileError, check_format, check_tensors, load_file, read_header, register_format,
                               save_file)

FORMAT = "likeness.eaa"
VERSION = 1
WHAT = "Inv-Adapter EAA adapter file"
register_format(FORMAT, WHAT)


def spec_metadata(spec: EAASpec) -> dict:
    return {"method": "inv_adapter", "base_model": spec.base_model, "model_name": spec.model_name,
            "context_dim": spec.context_dim, "model_channels": spec.model_channels, "s_c": spec.s_c,
            "sides": list(spec.sides), "reference_latent": list(spec.reference_latent), "blocks": spec.blocks}


def spec_from_metadata(path: str, meta: dict) -> EAASpec:
    name = os.path.basename(path)
    needed = ("blocks", "s_c", "sides", "reference_latent", "context_dim")
    missing = [k for k in needed if k not in meta]
    if missing:
        raise WeightFileError(f"'{name}' is an EAA file without {', '.join(missing)} in its metadata; it is damaged")
    blocks = meta["blocks"]
    if not isinstance(blocks, dict) or not blocks:
        raise WeightFileError(f"'{name}' lists no attention blocks in its metadata; it is damaged")
    try:
        blocks = {str(k): {f: int(v[f]) for f in ("width", "inner", "tokens")} for k, v in blocks.items()}
        return EAASpec(blocks=blocks, s_c=int(meta["s_c"]), sides=tuple(meta["sides"]),
                       base_model=str(meta.get("base_model", "")), model_name=str(meta.get("model_name", "")),
                       context_dim=int(meta["context_dim"]), model_channels=int(meta.get("model_channels", 0)),
                       reference_latent=tuple(int(x) for x in meta["reference_latent"]))
    except (KeyError, TypeError, ValueError) as e:
        raise WeightFileError(f"'{name}' has unreadable EAA metadata ({e}); it is damaged") from e


def save_eaa(path: str, adapter: EmbeddedAttentionAdapter, origin: str = "trained", extra: dict | None = None,
             dtype=torch.float16):
    meta = {**spec_metadata(adapter.spec), "origin": origin, **(extra or {})}
    tensors = {k: v.to(dtype) for k, v in adapter.state_dict().items()}
    return save_file(path, tensors, FORMAT, VERSION, meta)


def read_spec(path: str) -> EAASpec:
    """The spec of an EAA file from its header alone (no tensors read)."""
    meta, _ = read_header(path, WHAT)
    check_format(path, meta, FORMAT, (VERSION,), WHAT)
    return spec_from_metadata(path, meta)


def load_eaa(path: str, dtype=None) -> EmbeddedAttentionAdapter:
    """Load and validate an EAA file into a module on the CPU (the caller wraps it in a ModelPatcher)."""
    tensors, meta = load_file(path, FORMAT, (VERSION,), WHAT)
    spec = spec_from_metadata(path, meta)
    check_tensors(path, tensors, spec.expected_shapes(), WHAT)
    dtype = dtype or next(iter(tensors.values())).dtype
    adapter = EmbeddedAttentionAdapter(spec, dtype=dtype, device="cpu")
    adapter.load_state_dict({k: v.to(dtype) for k, v in tensors.items()})
    adapter.requires_grad_(False)
    return adapter


def check_eaa_for_model(spec: EAASpec, layout, name: str = "the adapter"):
    """Plain-word errors when an adapter does not fit the loaded model."""
    if spec.context_dim != layout.context_dim or spec.model_channels not in (0, layout.model_channels):
        raise WeightFileError(
            f"{name} was built for {spec.base_model or spec.model_name} (context {spec.context_dim}) but the model is "
            f"{layout.describe()}: load an adapter trained for this base model")
    model_blocks = {s.name: s for s in layout.sites}
    if set(spec.blocks) != set(model_blocks):
        only_adapter = sorted(set(spec.blocks) - set(model_blocks))
        only_model = sorted(set(model_blocks) - set(spec.blocks))
        raise WeightFileError(
            f"{name} was built for {spec.base_model or spec.model_name}, whose attention blocks differ from this model "
            f"({layout.describe()}): adapter-only blocks {only_adapter[:4]}, model-only blocks {only_model[:4]}")
    for block, b in spec.blocks.items():
        s = model_blocks[block]
        if (b["width"], b["inner"]) != (s.query_dim, s.inner_dim):
            raise WeightFileError(
                f"{name} has width {b['width']} (inner {b['inner']}) at block {block} but the model has "
                f"{s.query_dim} (inner {s.inner_dim}); it was built for {spec.base_model or 'another model'}")


def check_eaa_for_reference(spec: EAASpec, reference_latent, name: str = "the adapter"):
    """The cross-side token aggregation fixes the reference size the adapter accepts."""
    ref = tuple(int(x) for x in reference_latent)
    if "cross" in spec.sides and ref != tuple(spec.reference_latent):
        raise WeightFileError(
            f"{name} was trained on {spec.reference_latent[1] * 8}x{spec.reference_latent[0] * 8} references "
            f"(latent {spec.reference_latent[1]}x{spec.reference_latent[0]}) but the features come from a "
            f"{ref[1] * 8}x{ref[0] * 8} reference: run Inv-Adapter Extract with size {spec.reference_latent[0] * 8}")


def write_random_eaa(path: str, model_patcher, reference_size: int = 512, s_c: int = 256, seed: int = 0,
                     scale: float = 1.0):
    """An EAA file with random weights for the given model (tests, demos, benchmarks: not a trained adapter)."""
    from ..core.layout import attention_layout

    layout = attention_layout(model_patcher)
    spec = EAASpec.for_layout(layout, (reference_size // 8, reference_size // 8), s_c)
    adapter = EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu").init_random(seed, scale)
    return save_eaa(path, adapter, origin="random")
