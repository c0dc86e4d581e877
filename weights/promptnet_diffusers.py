"""ProFusion's own PromptNet layout, read as users download it (docs/methods/promptnet.md).

ProFusion saves its pipeline with diffusers: a `promptnet/` folder holding config.json (`_class_name`
"PromptNetModel") and the weights, `diffusion_pytorch_model.bin` (pickled, as published) or
`diffusion_pytorch_model.safetensors`. The PromptNet Loader lists those weight files wherever such a folder sits
under models/likeness; loading one converts it to the pack's layout (weights/promptnet_file.py). A `.bin` is read
only through the host's restricted loader (comfy.utils.load_torch_file with safe_load: torch.load with
weights_only), never a plain unpickle. The converted weights are cached beside the source as
likeness_promptnet.safetensors (or a numbered name when that one belongs to another source: nothing is
overwritten) and used directly from then on.
"""
import hashlib
import json
import logging
import os

from .promptnet_file import (convert_diffusers_promptnet, load_promptnet, promptnet_meta, promptnet_metadata,
                             save_promptnet)
from .safetensors_file import WeightFileError

log = logging.getLogger("likeness")

CLASS_NAME = "PromptNetModel"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CACHE_STEM = "likeness_promptnet"


def is_promptnet_folder(folder: str) -> bool:
    """A folder whose config.json is a diffusers PromptNetModel config."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("_class_name") == CLASS_NAME
    except (OSError, ValueError, AttributeError):
        return False


def find_promptnet_folders(root: str) -> list[str]:
    """Every diffusers PromptNet folder under root (a whole pipeline folder holds one in promptnet/)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:          # a linked folder seen before (or a link loop)
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if "config.json" in files and is_promptnet_folder(folder):
            found.append(folder)
    return found


def weight_files(folder: str) -> list[str]:
    return [os.path.join(folder, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def read_weights(path: str) -> dict:
    """ProFusion's state dict: safetensors as it is, a pickled .bin through the host's weights-only loader."""
    import comfy.utils

    name = os.path.basename(path)
    try:
        state = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError, safetensors its own error type
        if path.lower().endswith(".bin"):
            raise WeightFileError(
                f"'{name}' could not be read with the host's restricted (weights-only) loader, so it is not loaded: "
                f"it may be truncated or hold more than tensors. The loader said: {e}") from e
        raise WeightFileError(f"'{name}' is not a readable safetensors file ({e})") from e
    if not isinstance(state, dict) or not state:
        raise WeightFileError(f"'{name}' holds no state dict of tensors")
    return state


def source_fingerprint(path: str, config: dict) -> str:
    """What the cache is checked against: the weight file's size and time stamp, and the config."""
    st = os.stat(path)
    config_digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    return f"{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}:{config_digest}"


def _cache_candidates(folder: str):
    yield os.path.join(folder, f"{CACHE_STEM}.safetensors")
    for i in range(2, 1000):
        yield os.path.join(folder, f"{CACHE_STEM}_{i}.safetensors")


def _matches(path: str, fingerprint: str) -> bool:
    try:
        return promptnet_metadata(path).get("converted_source") == fingerprint
    except (WeightFileError, ValueError):
        return False


def load_diffusers_promptnet(path: str, label: str | None = None):
    """(PromptNet module, metadata) from a diffusers PromptNet weight file (or its folder); converts on first
    use and caches the result beside the source."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.isdir(path):
        files = weight_files(folder)
        if not files:
            raise WeightFileError(f"'{label or path}' has no {' or '.join(WEIGHT_FILES)}")
        path = files[0]
    label = label or path
    if not is_promptnet_folder(folder):
        raise WeightFileError(f"'{label}' is not in a ProFusion PromptNet folder: its config.json (with _class_name "
                              f"\"{CLASS_NAME}\") must sit beside it")
    config = read_config(folder)
    fingerprint = source_fingerprint(path, config)
    target = None
    for candidate in _cache_candidates(folder):
        if not os.path.exists(candidate):
            target = candidate
            break
        if _matches(candidate, fingerprint):
            log.info("Likeness PromptNet Loader: '%s' uses its cached conversion %s", label, os.path.basename(candidate))
            return load_promptnet(candidate)
    how = "the host's weights-only loader" if path.lower().endswith(".bin") else "safetensors"
    state = read_weights(path)
    try:
        net = convert_diffusers_promptnet(state, config)
    except ValueError as e:
        raise WeightFileError(f"'{label}' is not a ProFusion PromptNet the pack can convert: {e}") from e
    extra = {"converted_from": "ProFusion diffusers PromptNet", "converted_source": fingerprint}
    problem = "found no free cache name beside it" if target is None else None
    if target is not None:
        try:
            save_promptnet(target, net, extra=extra)
        except OSError as e:
            problem = f"could not cache it ({e})"
    if problem:
        log.warning("Likeness PromptNet Loader: converted '%s' (read with %s) but %s; it will be converted again "
                    "next time", label, how, problem)
        return net.eval().requires_grad_(False), promptnet_meta(net, extra=extra)
    log.info("Likeness PromptNet Loader: converted ProFusion's PromptNet '%s' (read with %s) and cached it as %s",
             label, how, target)
    return load_promptnet(target)


def load_any_promptnet(path: str, label: str | None = None):
    """A PromptNet file of either layout: the pack's safetensors, or ProFusion's weights in their folder."""
    if os.path.basename(path) in WEIGHT_FILES and is_promptnet_folder(os.path.dirname(path)):
        return load_diffusers_promptnet(path, label)
    if path.lower().endswith((".bin", ".pt", ".pth", ".ckpt")):
        raise WeightFileError(f"'{label or os.path.basename(path)}' is a pickled file; the PromptNet Loader reads one only "
                              f"as ProFusion's {WEIGHT_FILES[1]} with its config.json beside it")
    return load_promptnet(path)


def promptnet_choices(roots: list[str], names: list[str]) -> list[str]:
    """The PromptNet Loader's list: the pack's files `names` (relative to a root) plus the weight files of every
    ProFusion folder under the roots; the conversion caches inside those folders are not listed a second time."""
    hidden, found = set(), set()
    for root in roots:
        for folder in find_promptnet_folders(root):
            rel = os.path.relpath(folder, root).replace(os.sep, "/")

            def relname(name):
                return name if rel == "." else f"{rel}/{name}"

            found |= {relname(os.path.basename(p)) for p in weight_files(folder)}
            hidden |= {relname(n) for n in os.listdir(folder) if n.startswith(CACHE_STEM) and n.endswith(".safetensors")}
    return sorted({n for n in names if n not in hidden} | found)
