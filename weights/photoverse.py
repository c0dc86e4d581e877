"""The PhotoVerse adapter file: text adapter, image adapter, per-block LoRA and visual K/V as safetensors.

Keys (site names as in core/layout.py, e.g. input_1_0 = ("input", 1, 0)):
    text_adapter.mapping_{i}.{0,1,3,4,6}.{weight,bias}        CLS head of CLIP layer i (ELITE's key layout)
    text_adapter.mapping_patch_{i}.{0,1,3,4,6}.{weight,bias}  patch head of CLIP layer i
    image_adapter.<same>                                      the image adapter
    layers.<site>.lora_{q,k,v}.down.weight  (rank, in)        LoRA A on attn2 to_q / to_k / to_v
    layers.<site>.lora_{q,k,v}.up.weight    (inner, rank)     LoRA B; dW = alpha * B @ A (alpha a direct multiplier, PV4)
    layers.<site>.visual_k.weight           (inner, context)  K^S
    layers.<site>.visual_v.weight           (inner, context)  V^S
Metadata: likeness_format "likeness.photoverse", version 1, method "photoverse", the PhotoVerseSpec fields
(text_width, context_dim, clip_vision {width, layers, image_size, patch}, clip_layers, sites, hidden, lora_rank,
base_model, model_name, model_channels) and origin ("trained" or "random"), plus any training hyper-parameters.

An adapter's identity (digest) is a hash of its spec and a strided sample of every tensor: concepts carry it, so
PhotoVerse Apply can tell a concept made with another adapter.
"""
import hashlib
import json
import os

import torch

from ..encoders.photoverse import PhotoVerseAdapter, PhotoVerseSpec, describe_clip_vision
from .safetensors_file import (WeightFileError, check_format, check_tensors, load_file, read_header,
                               register_format, save_file)

FORMAT = "likeness.photoverse"
VERSION = 1
WHAT = "PhotoVerse adapter file"
register_format(FORMAT, WHAT)


def adapter_digest(spec: PhotoVerseSpec, tensors: dict, samples: int = 2048) -> str:
    h = hashlib.sha256(json.dumps(spec.to_metadata(), sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].detach().reshape(-1)
        step = max(1, t.numel() // samples)
        h.update(k.encode())
        h.update(t[::step][:samples].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]


class LoadedPhotoVerse:
    """LIKENESS_PHOTOVERSE: an adapter module (on the CPU, weights in their file dtype, manual-cast layers), its
    spec, its identity and a ModelPatcher so the host loads and offloads it with the UNet."""

    def __init__(self, module: PhotoVerseAdapter, name: str, digest: str | None = None, origin: str = ""):
        self.module, self.spec, self.name, self.origin = module, module.spec, name, origin
        self.digest = digest or adapter_digest(module.spec, module.state_dict())
        self._patcher = None

    @property
    def patcher(self):
        if self._patcher is None:
            import comfy.model_management
            import comfy.model_patcher

            self._patcher = comfy.model_patcher.ModelPatcher(
                self.module, load_device=comfy.model_management.get_torch_device(),
                offload_device=comfy.model_management.unet_offload_device())
        return self._patcher

    def __repr__(self):
        return f"PhotoVerse adapter '{self.name}' ({self.spec.base_model}, {describe_clip_vision(self.spec.clip_vision)})"


def spec_from_metadata(path: str, meta: dict) -> PhotoVerseSpec:
    try:
        return PhotoVerseSpec.from_metadata(meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise WeightFileError(f"'{os.path.basename(path)}' has unreadable PhotoVerse metadata (problem with {e}); "
                              "the file is damaged or was written by another tool") from e


def save_photoverse(path: str, adapter: PhotoVerseAdapter, origin: str = "trained", extra: dict | None = None,
                    dtype=torch.float16) -> str:
    meta = {"method": "photoverse", **adapter.spec.to_metadata(), "origin": origin, **(extra or {})}
    tensors = {k: v.detach().to(dtype) for k, v in adapter.state_dict().items()}
    return save_file(path, tensors, FORMAT, VERSION, meta)


def read_spec(path: str) -> PhotoVerseSpec:
    """The spec of a PhotoVerse file from its header alone (no tensors read)."""
    meta, _ = read_header(path, WHAT)
    check_format(path, meta, FORMAT, (VERSION,), WHAT)
    return spec_from_metadata(path, meta)


def load_photoverse(path: str) -> LoadedPhotoVerse:
    """Load and validate a PhotoVerse file into manual-cast modules on the CPU."""
    import comfy.ops

    tensors, meta = load_file(path, FORMAT, (VERSION,), WHAT)
    spec = spec_from_metadata(path, meta)
    check_tensors(path, tensors, spec.expected_shapes(), WHAT)
    dtypes = {v.dtype for v in tensors.values()}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        raise WeightFileError(f"'{os.path.basename(path)}' mixes tensor types ({sorted(str(d) for d in dtypes)}); "
                              "a PhotoVerse file stores every tensor in one floating-point type")
    module = PhotoVerseAdapter(spec, dtype=next(iter(dtypes)), device="cpu", operations=comfy.ops.manual_cast)
    module.load_state_dict(tensors)
    module.requires_grad_(False).eval()
    return LoadedPhotoVerse(module, os.path.basename(path), adapter_digest(spec, tensors),
                            origin=str(meta.get("origin", "")))


def _model_words(spec: PhotoVerseSpec) -> str:
    return f"{spec.base_model or spec.model_name or 'another model'}"


def check_for_model(spec: PhotoVerseSpec, layout, name: str = "the adapter"):
    """Plain-word errors when an adapter does not fit the loaded model (base model, context width, blocks)."""
    if spec.context_dim != layout.context_dim:
        raise WeightFileError(
            f"the PhotoVerse adapter '{name}' was trained for {_model_words(spec)} (context {spec.context_dim}) but "
            f"the model is {layout.describe()}: load a PhotoVerse adapter trained for this base model")
    model_sites = {s.name: s for s in layout.sites}
    if set(spec.sites) != set(model_sites):
        only_adapter = sorted(set(spec.sites) - set(model_sites))
        only_model = sorted(set(model_sites) - set(spec.sites))
        raise WeightFileError(
            f"the PhotoVerse adapter '{name}' was trained for {_model_words(spec)}, whose cross-attention blocks differ "
            f"from this model ({layout.describe()}): blocks only in the adapter {only_adapter[:4]}, only in the "
            f"model {only_model[:4]}")
    for site_name, s in spec.sites.items():
        m = model_sites[site_name]
        if (s["query_dim"], s["inner_dim"], s["context_dim"]) != (m.query_dim, m.inner_dim, m.context_dim):
            raise WeightFileError(
                f"the PhotoVerse adapter '{name}' has width {s['query_dim']} (inner {s['inner_dim']}) at block "
                f"{site_name} but the model has {m.query_dim} (inner {m.inner_dim}); it was trained for "
                f"{_model_words(spec)}, not {layout.describe()}")


def check_for_clip_vision(spec: PhotoVerseSpec, signature: dict, name: str = "the adapter"):
    mismatch = [k for k in ("width", "layers", "image_size", "patch") if int(spec.clip_vision[k]) != int(signature[k])]
    if mismatch:
        raise WeightFileError(
            f"the PhotoVerse adapter '{name}' reads features of {describe_clip_vision(spec.clip_vision)} but the "
            f"connected CLIP vision is {describe_clip_vision(signature)}: load the CLIP vision it was trained with "
            f"(ViT-L/14 for SD1.5, ViT-H/14 for SD2)")
    if max(spec.clip_layers) > signature["layers"] or min(spec.clip_layers) < 1:
        raise WeightFileError(f"the PhotoVerse adapter '{name}' reads CLIP layers {list(spec.clip_layers)}, which this "
                              f"CLIP vision ({signature['layers']} layers) does not have")


def new_adapter_for(model_patcher, clip_vision_signature: dict, text_width: int | None = None, hidden: int | None = None,
                    dtype=torch.float32) -> PhotoVerseAdapter:
    """An adapter sized for a model and a CLIP vision (weights uninitialised for manual-cast, torch default else)."""
    from ..core.layout import attention_layout
    from ..encoders.elite_mapper import HIDDEN

    spec = PhotoVerseSpec.for_models(attention_layout(model_patcher), clip_vision_signature, text_width=text_width,
                                     hidden=hidden or HIDDEN)
    return PhotoVerseAdapter(spec, dtype=dtype, device="cpu")


def write_random_photoverse(path: str, model_patcher, clip_vision_signature: dict, seed: int = 0, scale: float = 1.0,
                            text_width: int | None = None, hidden: int | None = None) -> str:
    """A PhotoVerse file with random weights for the given model and CLIP vision (tests, demos, benchmarks: not a
    trained adapter)."""
    adapter = new_adapter_for(model_patcher, clip_vision_signature, text_width, hidden).init_random(seed, scale)
    return save_photoverse(path, adapter, origin="random")
