"""PhotoVerse concept files: an identity encoded once (PhotoVerse Encode) and reused across workflows.

Version 2 keeps every photo (float32):
  words.<width>      (N, m, width)   the pseudo-words S1..Sm of each photo, one key per text-encoder width
  visual             (N, n, d_ctx)   the visual tokens of each photo (absent for adapters without a visual branch)
  visual_uncond      (n, d_ctx)      the unconditional visual tokens (absent when the adapter has none)
Metadata: likeness_format "likeness.photoverse_concept", version 2, adapter (the digest of the adapter that made
it), adapter_name, base_model, model_name, text_widths, context_dim, clip_vision, combine (how the photos are
joined; loading joins them again the same way), images, source.
Version 1 (one combined photo set, one text width): words (m, text_width), visual and visual_uncond (n, d_ctx);
loaded as one photo.
"""
import os

import torch

from .concept import LikenessConcept
from .photoverse_concept import build_concept, photoverse_data
from ..weights.safetensors_file import VERSION_KEY, WeightFileError, load_file, register_format, save_file

FORMAT = "likeness.photoverse_concept"
VERSION = 2
READS = (1, 2)
WHAT = "PhotoVerse concept file"
register_format(FORMAT, WHAT)

_TEXT_FIELDS = ("adapter", "adapter_name", "base_model", "model_name", "clip_vision")


def save_photoverse_concept(path: str, concept: LikenessConcept) -> str:
    data = photoverse_data(concept)
    photos = data["photos"]
    tensors = {f"words.{w}": v.float() for w, v in photos["words"].items()}
    if photos["visual"] is not None:
        tensors["visual"] = photos["visual"].float()
    if data.get("visual_uncond_single") is not None:
        tensors["visual_uncond"] = data["visual_uncond_single"].float()
    meta = {k: str(data.get(k, "")) for k in _TEXT_FIELDS}
    meta.update({"method": "photoverse", "text_widths": [int(w) for w in photos["words"]],
                 "context_dim": int(data["context_dim"]), "combine": data.get("combine", "average"),
                 "images": int(data.get("images", 1)), "source": concept.source})
    return save_file(path, tensors, FORMAT, VERSION, meta)


def _version_1(tensors: dict, meta: dict) -> tuple:
    """(tensors in version-2 keys, metadata) of a version-1 file: one photo, one width."""
    width = int(meta["text_width"])
    out = {f"words.{width}": tensors["words"][None]} if "words" in tensors else {}
    if "visual" in tensors:
        out["visual"] = tensors["visual"][None]
    if "visual_uncond" in tensors:
        out["visual_uncond"] = tensors["visual_uncond"]
    return out, {**meta, "text_widths": [width], "combine": "average"}


def _problems(tensors: dict, widths, context: int) -> list:
    problems = []
    photos = set()
    for w in widths:
        t = tensors.get(f"words.{w}")
        if t is None or t.ndim != 3 or t.shape[-1] != w or min(t.shape[:2]) < 1:
            problems.append(f"words.{w} should be (photos, n, {w})")
        else:
            photos.add(t.shape[0])
    visual, uncond = tensors.get("visual"), tensors.get("visual_uncond")
    if visual is not None:
        if visual.ndim != 3 or visual.shape[-1] != context or visual.shape[1] < 1:
            problems.append(f"visual should be (photos, n, {context})")
        else:
            photos.add(visual.shape[0])
    if uncond is not None and (visual is None or uncond.ndim != 2 or tuple(uncond.shape) != tuple(visual.shape[1:])):
        problems.append("visual_uncond should match one photo's visual tokens")
    if len(photos) > 1:
        problems.append("the words and visual tokens are for different numbers of photos")
    return problems


def load_photoverse_concept(path: str) -> LikenessConcept:
    name = os.path.basename(path)
    tensors, meta = load_file(path, FORMAT, READS, WHAT)
    try:
        if str(meta.get(VERSION_KEY)) == "1":
            tensors, meta = _version_1(tensors, meta)
        widths = [int(w) for w in meta["text_widths"]]
        context, adapter, combine = int(meta["context_dim"]), str(meta["adapter"]), str(meta.get("combine", "average"))
    except (KeyError, ValueError, TypeError) as e:
        raise WeightFileError(f"'{name}' is a PhotoVerse concept file without readable {e} metadata; it is damaged") from e
    problems = _problems(tensors, widths, context)
    if problems:
        raise WeightFileError(f"'{name}' does not match its own description as {WHAT}: {'; '.join(problems)}. "
                              "The file is damaged or was edited by hand")
    identity = {k: str(meta.get(k, "")) for k in _TEXT_FIELDS}
    identity.update({"adapter": adapter, "text_widths": widths, "context_dim": context})
    return build_concept({w: tensors[f"words.{w}"] for w in widths}, tensors.get("visual"), tensors.get("visual_uncond"),
                         identity, combine, str(meta.get("source") or name), int(meta.get("images", 1)))


def concept_nbytes(concept: LikenessConcept) -> int:
    data = photoverse_data(concept)
    photos = data["photos"]
    tensors = [*photos["words"].values(), photos["visual"], data.get("visual_uncond_single")]
    return sum(int(t.numel() * t.element_size()) for t in tensors if torch.is_tensor(t))
