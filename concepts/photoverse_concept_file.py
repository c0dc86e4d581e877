"""PhotoVerse concept files: an identity encoded once (PhotoVerse Encode) and reused across workflows.

Keys: words (m, text_width) float32 - the pseudo-words S1..Sm; visual (n, context_dim) and visual_uncond
(n, context_dim) - the visual tokens of the face and of the zero input. Metadata: likeness_format
"likeness.photoverse_concept", version 1, adapter (the digest of the adapter that made it), adapter_name,
base_model, model_name, text_width, context_dim, clip_vision, images, source.
"""
import os

import torch

from .concept import TOKEN_SPACE, LikenessConcept
from .photoverse_concept import META_KEY, photoverse_data
from ..weights.safetensors_file import WeightFileError, load_file, register_format, save_file

FORMAT = "likeness.photoverse_concept"
VERSION = 1
WHAT = "PhotoVerse concept file"
register_format(FORMAT, WHAT)

_TEXT_FIELDS = ("adapter", "adapter_name", "base_model", "model_name", "clip_vision")


def save_photoverse_concept(path: str, concept: LikenessConcept) -> str:
    data = photoverse_data(concept)
    width = int(data["text_width"])
    tensors = {"words": concept.vectors_for(width, "PhotoVerse").float(), "visual": data["visual"].float(),
               "visual_uncond": data["visual_uncond"].float()}
    meta = {k: str(data.get(k, "")) for k in _TEXT_FIELDS}
    meta.update({"method": "photoverse", "text_width": width, "context_dim": int(data["context_dim"]),
                 "images": int(data.get("images", 1)), "source": concept.source})
    return save_file(path, tensors, FORMAT, VERSION, meta)


def load_photoverse_concept(path: str) -> LikenessConcept:
    name = os.path.basename(path)
    tensors, meta = load_file(path, FORMAT, (VERSION,), WHAT)
    try:
        width, context = int(meta["text_width"]), int(meta["context_dim"])
        adapter = str(meta["adapter"])
    except (KeyError, ValueError) as e:
        raise WeightFileError(f"'{name}' is a PhotoVerse concept file without readable {e} metadata; it is damaged") from e
    words, visual, uncond = (tensors.get(k) for k in ("words", "visual", "visual_uncond"))
    problems = []
    if words is None or words.ndim != 2 or words.shape[-1] != width or words.shape[0] < 1:
        problems.append(f"words should be (n, {width})")
    for key, t in (("visual", visual), ("visual_uncond", uncond)):
        if t is None or t.ndim != 2 or t.shape[-1] != context or t.shape[0] < 1:
            problems.append(f"{key} should be (n, {context})")
    if not problems and visual.shape != uncond.shape:
        problems.append("visual and visual_uncond differ in shape")
    if problems:
        raise WeightFileError(f"'{name}' does not match its own description as {WHAT}: {'; '.join(problems)}. "
                              "The file is damaged or was edited by hand")
    data = {k: str(meta.get(k, "")) for k in _TEXT_FIELDS}
    data.update({"adapter": adapter, "text_width": width, "context_dim": context, "visual": visual.float(),
                 "visual_uncond": uncond.float(), "images": int(meta.get("images", 1))})
    return LikenessConcept(vectors={width: words.float()}, space=TOKEN_SPACE, source=str(meta.get("source") or name),
                           metadata={META_KEY: data})


def concept_nbytes(concept: LikenessConcept) -> int:
    data = photoverse_data(concept)
    return sum(int(t.numel() * t.element_size()) for t in
               [*concept.vectors.values(), data["visual"], data["visual_uncond"]] if torch.is_tensor(t))
