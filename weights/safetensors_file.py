"""Load, validate and save the pack's weight and feature files: safetensors only, never pickle.

Every file the pack writes carries metadata: "likeness_format" (what the file is), "likeness_format_version" and
method-specific fields; dicts and lists are stored as JSON, other scalars as strings. Reading checks, in this order, that the file exists,
is a complete safetensors file, is the expected kind of Likeness file and version, and (check_tensors) that its
keys and shapes are what the reader expects. Every failure is a WeightFileError whose message names the file
and says what is wrong in plain words.
"""
import json
import os

import torch

FORMAT_KEY = "likeness_format"
VERSION_KEY = "likeness_format_version"

# What each format is called in messages; methods add theirs with register_format().
FORMAT_NAMES = {}


class WeightFileError(ValueError):
    pass


def register_format(fmt: str, description: str):
    FORMAT_NAMES[fmt] = description


def describe_format(fmt: str) -> str:
    return FORMAT_NAMES.get(fmt, f"'{fmt}' file")


def a(noun: str) -> str:
    """The noun with its indefinite article ("an Inv-Adapter file", "a PhotoVerse file")."""
    return ("an " if noun[:1].lower() in "aeiou" else "a ") + noun


def _name(path: str) -> str:
    return os.path.basename(path)


def read_header(path: str, what: str = "file") -> tuple[dict, dict]:
    """(metadata with JSON values decoded, {key: (dtype, shape)}) without reading the tensors."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise WeightFileError(f"the {what} '{path}' does not exist")
    if os.path.getsize(path) < 8:
        raise WeightFileError(f"'{_name(path)}' is empty or truncated ({os.path.getsize(path)} bytes); it is not {a('usable ' + what)}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            shapes = {}
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    except Exception as e:  # safetensors raises its own error type for every header problem
        raise WeightFileError(
            f"'{_name(path)}' is not a readable safetensors file (it may be truncated, still downloading, or a "
            f"different format such as a pickle .ckpt/.pt). The reader said: {e}") from e
    return decode_metadata(raw), shapes


def decode_metadata(raw: dict) -> dict:
    """Structured values (dicts, lists) come back decoded; scalars stay strings (callers convert them)."""
    out = {}
    for k, v in raw.items():
        out[k] = v
        if isinstance(v, str) and v[:1] in ("{", "["):
            try:
                out[k] = json.loads(v)
            except json.JSONDecodeError:
                pass
    return out


def encode_metadata(meta: dict) -> dict:
    """Strings as they are, dicts and lists as JSON, other scalars as their str()."""
    return {k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple))
                else str(v)) for k, v in meta.items()}


def check_format(path: str, meta: dict, fmt: str, versions: tuple, what: str):
    found = meta.get(FORMAT_KEY)
    if found is None:
        raise WeightFileError(
            f"'{_name(path)}' is a safetensors file but not {a(what)} written by ComfyUI-Likeness (it has no "
            f"'{FORMAT_KEY}' metadata); it may belong to another model or pack")
    if found != fmt:
        raise WeightFileError(f"'{_name(path)}' is {a(describe_format(found))}, not {a(what)}")
    version = str(meta.get(VERSION_KEY, ""))
    if version not in {str(v) for v in versions}:
        raise WeightFileError(
            f"'{_name(path)}' is {a(what)} of format version {version or 'unknown'}; this version of the pack reads "
            f"version {', '.join(str(v) for v in versions)}. Update the pack or re-create the file")


def load_file(path: str, fmt: str, versions=(1,), what: str = "file", device="cpu") -> tuple[dict, dict]:
    """Read a whole Likeness file: (tensors, metadata). Validates the container, format and version."""
    from safetensors import safe_open

    meta, _ = read_header(path, what)
    check_format(path, meta, fmt, versions, what)
    tensors = {}
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    except Exception as e:
        raise WeightFileError(f"'{_name(path)}' could not be read completely ({e}); the file is probably truncated") from e
    return tensors, meta


def check_tensors(path: str, tensors: dict, expected: dict, what: str = "file", allow_extra: bool = False):
    """expected: {key: shape}. Names missing keys, unexpected keys and wrong shapes (a few of each)."""
    missing = [k for k in expected if k not in tensors]
    extra = [] if allow_extra else [k for k in tensors if k not in expected]
    wrong = [(k, tuple(tensors[k].shape), tuple(expected[k])) for k in expected
             if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors are missing (e.g. {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} tensors are not expected (e.g. {', '.join(extra[:3])})")
    if wrong:
        problems.append("wrong shapes: " + "; ".join(f"{k} is {list(a)}, expected {list(b)}" for k, a, b in wrong[:3]))
    if problems:
        raise WeightFileError(f"'{_name(path)}' does not match its own description as {a(what)}: " + ", ".join(problems)
                              + ". The file is damaged or was edited by hand")


def save_file(path: str, tensors: dict, fmt: str, version: int, metadata: dict | None = None):
    """Write a Likeness file atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file as st_save

    meta = {FORMAT_KEY: fmt, VERSION_KEY: str(version), **(metadata or {})}
    for k, v in tensors.items():
        if not torch.is_tensor(v):
            raise TypeError(f"{k} is not a tensor")
    out = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    try:
        st_save(out, tmp, metadata=encode_metadata(meta))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
