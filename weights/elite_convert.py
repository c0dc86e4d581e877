"""ELITE's published weights as a PhotoVerse adapter (docs/methods/photoverse.md, "ELITE's weights").

ELITE (Wei et al. 2023, csyxwei/ELITE) publishes two PyTorch state dicts, trained with Stable Diffusion 1.4 and
CLIP ViT-L/14 on Open Images objects (no face training):
  global_mapper.pt  mapping_{i}.*, mapping_patch_{i}.* (i < 5)    the global mapper: 5 words of the text width
                    <attn2 module>_to_k.weight, _to_v.weight      to_k_global / to_v_global of every cross-attention,
                                                                  used for the text context instead of to_k / to_v
  local_mapper.pt   mapping_{i}.*, mapping_patch_{i}.*            the local mapper: one token per CLIP patch
                    <attn2 module>_to_k.weight, _to_v.weight      to_k_local / to_v_local over those tokens
<attn2 module> is the diffusers module path with dots as underscores, e.g.
down_blocks_0_attentions_0_transformer_blocks_0_attn2 [ELITE train_global.py, train_local.py].

They map onto PhotoVerse's structure: the global mapper is the text adapter (text_mapper "elite"), to_k_global /
to_v_global replace the blocks' text K/V as weight patches in place of the LoRA (text_kv "replace"), and the
local mapper with to_k_local / to_v_local is the visual branch (image_mapper "elite_local", its K^S / V^S).
ELITE also weights the local attention by the normalised attention map of the word w0; PhotoVerse's visual branch
has no such gate, so it is not reproduced (visual_scale and attn_mask are the controls instead).

The files are read as users download them, through the host's restricted weights-only loader
(comfy.utils.load_torch_file(safe_load=True), never a plain unpickle), converted once, and cached as a PhotoVerse
safetensors file named by the sources' content hashes and the model layout; an existing cache file is reused,
never overwritten.
"""
import hashlib
import json
import logging
import os

import torch

from ..encoders.elite_mapper import EliteMapper
from ..encoders.photoverse import PhotoVerseAdapter, PhotoVerseSpec, default_clip_layers
from .photoverse import read_spec, save_photoverse
from .safetensors_file import WeightFileError, check_tensors

log = logging.getLogger("likeness")

WHAT_IT_IS = ("ELITE's published encoder (Wei et al. 2023): trained on Open Images objects with Stable Diffusion 1.4 "
              "and CLIP ViT-L/14, no face training")


def read_elite_checkpoint(path: str, what: str = "ELITE mapper") -> dict:
    """A state dict from an ELITE .pt file through the host's weights-only loader; plain errors otherwise."""
    import comfy.utils

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise WeightFileError(f"the {what} '{path}' does not exist")
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or ValueError depending on what is wrong
        raise WeightFileError(
            f"'{name}' could not be read as a PyTorch weights file with the safe (weights-only) loader: {e}. It is "
            f"damaged, still downloading, or not one of ELITE's global_mapper.pt / local_mapper.pt") from e
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise WeightFileError(f"'{name}' holds no plain tensor state dict; it is not {what} file from ELITE")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def mapper_dims(sd: dict, name: str) -> tuple:
    """(layers, CLIP width, hidden width, output width) of an ELITE mapper state dict."""
    layers = 0
    while f"mapping_{layers}.0.weight" in sd:
        layers += 1
    if layers == 0 or "mapping_0.6.weight" not in sd:
        raise WeightFileError(f"'{name}' has no mapping_0.* weights: it is not an ELITE mapper (global_mapper.pt or "
                              "local_mapper.pt)")
    hidden, clip_width = (int(x) for x in sd["mapping_0.0.weight"].shape)
    return layers, clip_width, hidden, int(sd["mapping_0.6.weight"].shape[0])


def elite_module_names(model_patcher, layout) -> dict:
    """{site name: ELITE's key prefix of that block's attn2}, from the host's diffusers <-> ComfyUI key map of the
    connected model (comfy.utils.unet_to_diffusers)."""
    import comfy.utils

    config = model_patcher.model.model_config.unet_config
    to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(config).items()}
    names = {}
    for site in layout.sites:
        key = to_diffusers.get(f"{site.path}.attn2.to_k.weight")
        if key is None:
            raise WeightFileError(f"the model's block {site.name} has no diffusers name; ELITE's weights are for "
                                  "Stable Diffusion 1.x UNets")
        names[site.name] = key[:-len(".to_k.weight")].replace(".", "_")
    return names


def _take(sd: dict, keys: dict, name: str) -> dict:
    """{our key: tensor} from {our key: ELITE key}; names missing and leftover ELITE keys."""
    missing = [k for k in keys.values() if k not in sd]
    leftover = sorted(set(sd) - set(keys.values()))
    if missing or leftover:
        detail = []
        if missing:
            detail.append(f"{len(missing)} weights the model needs are missing (e.g. {', '.join(missing[:2])})")
        if leftover:
            detail.append(f"{len(leftover)} weights belong to no block of this model (e.g. {', '.join(leftover[:2])})")
        raise WeightFileError(f"'{name}' does not fit this model: {'; '.join(detail)}. ELITE's weights are for "
                              "Stable Diffusion 1.x (SD1.4 / SD1.5)")
    return {ours: sd[theirs] for ours, theirs in keys.items()}


def elite_adapter(global_sd: dict, local_sd: dict | None, model_patcher, clip_vision_signature: dict, source: str,
                  names=("global", "local")):
    """A PhotoVerseAdapter holding ELITE's global (and local) mapper for the connected model and CLIP vision."""
    from ..core.layout import attention_layout
    from ..encoders.photoverse import describe_clip_vision

    layout = attention_layout(model_patcher)
    layers, clip_width, hidden, text_width = mapper_dims(global_sd, names[0])
    clip_layers = default_clip_layers(int(clip_vision_signature["layers"]))
    if layers != len(clip_layers):
        raise WeightFileError(f"'{names[0]}' has {layers} mapping heads; ELITE's mappers read 5 CLIP layers")
    if clip_width != int(clip_vision_signature["width"]):
        raise WeightFileError(f"'{names[0]}' reads {clip_width}-wide CLIP features but the connected CLIP vision is "
                              f"{describe_clip_vision(clip_vision_signature)}; ELITE's weights need CLIP ViT-L/14")
    if text_width != layout.context_dim:
        raise WeightFileError(f"'{names[0]}' makes {text_width}-wide words but the model's cross-attention context is "
                              f"{layout.context_dim} ({layout.describe()}); ELITE's weights are for SD1.x (768)")
    if local_sd is not None and mapper_dims(local_sd, names[1]) != (layers, clip_width, hidden, layout.context_dim):
        raise WeightFileError(f"'{names[1]}' is not the local mapper of the same ELITE model as '{names[0]}' "
                              f"(its sizes are {mapper_dims(local_sd, names[1])})")
    spec = PhotoVerseSpec.for_models(layout, clip_vision_signature, text_widths=(text_width,), hidden=hidden, lora_rank=0,
                                     clip_layers=clip_layers, mapper="elite", text_kv="replace", preprocess="elite",
                                     image_mapper="elite_local" if local_sd is not None else "none", source=source)
    blocks = elite_module_names(model_patcher, layout)
    mapper_keys = EliteMapper.shapes(layers, clip_width, text_width, hidden)
    keys = {f"text_adapters.{text_width}.{k}": k for k in mapper_keys}
    for site, prefix in blocks.items():
        keys.update({f"layers.{site}.text_k.weight": f"{prefix}_to_k.weight",
                     f"layers.{site}.text_v.weight": f"{prefix}_to_v.weight"})
    state = _take(global_sd, keys, names[0])
    if local_sd is not None:
        keys = {f"image_adapter.{k}": k for k in mapper_keys}
        for site, prefix in blocks.items():
            keys.update({f"layers.{site}.visual_k.weight": f"{prefix}_to_k.weight",
                         f"layers.{site}.visual_v.weight": f"{prefix}_to_v.weight"})
        state.update(_take(local_sd, keys, names[1]))
    check_tensors(" + ".join(n for n in names if n), state, spec.expected_shapes(), "set of ELITE weights")
    adapter = PhotoVerseAdapter(spec, dtype=torch.float32, device="cpu")
    adapter.load_state_dict({k: v.float() for k, v in state.items()})
    return adapter.requires_grad_(False)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_elite(global_path: str, local_path: str | None, model_patcher, clip_vision_signature: dict,
                  cache_dir: str) -> str:
    """The path of the PhotoVerse file holding ELITE's weights for this model and CLIP vision: the cached
    conversion when one exists (never rewritten), else a new one written to cache_dir."""
    from ..core.layout import attention_layout

    sources = {"global": _sha256(global_path) if os.path.isfile(global_path) else ""}
    if local_path:
        sources["local"] = _sha256(local_path) if os.path.isfile(local_path) else ""
    target = {"model": attention_layout(model_patcher).signature(), "clip_vision": clip_vision_signature}
    layout_hash = hashlib.sha256(json.dumps(target, sort_keys=True).encode())
    name = "elite_" + "_".join(v[:12] for v in sources.values() if v) + f"_{layout_hash.hexdigest()[:8]}.safetensors"
    path = os.path.join(cache_dir, name)
    if all(sources.values()) and os.path.exists(path):
        try:
            read_spec(path)
        except WeightFileError as e:
            raise WeightFileError(f"the cached conversion '{path}' is damaged ({e}); delete it and run again") from e
        log.info("Likeness: ELITE weights from the cached conversion %s", path)
        return path
    global_sd = read_elite_checkpoint(global_path, "ELITE global mapper")
    local_sd = read_elite_checkpoint(local_path, "ELITE local mapper") if local_path else None
    files = [os.path.basename(global_path)] + ([os.path.basename(local_path)] if local_path else [])
    source = f"ELITE {' + '.join(files)} (objects, SD1.4, CLIP ViT-L/14, no face training)"
    adapter = elite_adapter(global_sd, local_sd, model_patcher, clip_vision_signature, source,
                            tuple(files) + ("",) * (2 - len(files)))
    save_photoverse(path, adapter, origin="converted",
                    extra={"converted_from": {k: f"sha256:{v}" for k, v in sources.items()}, "what": WHAT_IT_IS})
    log.info("Likeness: converted %s to %s", " + ".join(files), path)
    return path
