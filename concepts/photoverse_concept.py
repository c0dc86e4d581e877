"""From face photos to a PhotoVerse concept (docs/methods/photoverse.md, "Encode").

  x_m = face crop with non-face pixels zeroed (the MASK input, or a crop that is already masked), centre square
  CLIP-vision hidden states of the layers the adapter reads (host ClipVisionModel, all layers in one pass)
  words S1..Sm = text adapter of each text encoder (m kept, default 1: S1 from the deepest layer, as ELITE's
  --token_index 0)
  visual tokens f = image adapter (all m by default; "first" keeps one like the unofficial port)
  unconditional visual tokens = image adapter on the CLIP features of an all-zeros CLIP input: the CFG choice of
  the unofficial port (idonahum/photoVerse, infer.py), which the pack's trainer also trains on, so training and
  inference agree. Zeros are taken in the normalised pixel space the encoder sees (the dataset-mean grey image).
  They depend only on the CLIP vision and the adapter, so the zero input's CLIP features are cached per model.
Adapters converted from ELITE (preprocess "elite") see what ELITE's scripts feed them: the words come from the
unmasked image, the local mapper's per-patch tokens from the masked image, multiplied by the mask on the patch
grid, and both images are resized to the CLIP size without cropping; the unconditional pass has no local tokens.

Several photos (a batch) give one set per photo, joined by `combine` (concepts/combine.py). The result is a
LikenessConcept: the words as token-space vectors keyed by each text encoder's width (SDXL: 768 and 1280, so the
Likeness Prompt node injects each encoder's own words before position embeddings), and in
metadata["photoverse"] the combined visual tokens, the per-photo words and tokens (kept so a saved concept holds
every photo) and the identity of the adapter that made them (PhotoVerse Apply refuses a concept from another
adapter).
"""
import logging
import weakref

import torch

from .combine import check_mode, combine_photos
from .concept import TOKEN_SPACE, LikenessConcept
from ..encoders.photoverse import describe_clip_vision

log = logging.getLogger("likeness")

META_KEY = "photoverse"
VISUAL_TOKEN_MODES = ("all", "first")
MIN_FACE_SIDE = 16

_zero_features = weakref.WeakKeyDictionary()  # CLIP vision nn.Module -> {(layers, device): features}


def clip_vision_signature(clip_vision) -> dict:
    """{"width", "layers", "image_size", "patch"} of a host CLIP_VISION; plain errors for other encoders."""
    model = getattr(clip_vision, "model", None)
    vision = getattr(model, "vision_model", None)
    if vision is None or not hasattr(vision, "encoder") or not hasattr(clip_vision, "patcher"):
        raise ValueError(f"clip_vision: {type(model).__name__ if model is not None else type(clip_vision).__name__} is "
                         "not a CLIP vision model; load a CLIP ViT (ViT-L/14 for SD1.5) with Load CLIP Vision")
    emb = vision.embeddings
    if getattr(emb, "class_embedding", None) is None:
        raise ValueError("clip_vision: this vision model has no CLS token (SigLIP?); PhotoVerse needs a CLIP ViT "
                         "such as ViT-L/14 for SD1.5")
    patch = emb.patch_embedding.kernel_size
    return {"width": int(emb.class_embedding.shape[-1]), "layers": len(vision.encoder.layers),
            "image_size": int(getattr(clip_vision, "image_size", 224)),
            "patch": int(patch[0] if isinstance(patch, (tuple, list)) else patch)}


def clip_text_widths(clip) -> tuple:
    """The token-embedding width of each text encoder of a host CLIP, ascending (SD1.x (768,), SD2.x (1024,),
    SDXL (768, 1280)): the widths a PhotoVerse adapter makes words for."""
    widths = set()
    for key in clip.tokenize("a"):
        encoder = getattr(clip.cond_stage_model, f"clip_{key}", None)
        if encoder is None:
            raise ValueError(f"clip: this CLIP has no '{key}' text encoder; PhotoVerse needs CLIP text encoders")
        widths.add(int(encoder.transformer.get_input_embeddings().weight.shape[-1]))
    return tuple(sorted(widths))


def _layer_features(clip_vision, pixel_values: torch.Tensor, layers) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, m, tokens, width) float32 on the CPU; layers in hidden-state numbering
    (the host returns the output of encoder layer i at index i - 1)."""
    import comfy.model_management

    comfy.model_management.load_model_gpu(clip_vision.patcher)
    _, hidden, _, _ = clip_vision.model(pixel_values=pixel_values.to(clip_vision.load_device),
                                        intermediate_output="all")
    return hidden[:, [int(i) - 1 for i in layers]].float().cpu()


def face_pixels(clip_vision, image: torch.Tensor, mask=None, crop: bool = True) -> torch.Tensor:
    """IMAGE (+ optional MASK) -> the CLIP input of x_m: (B, 3, S, S), masked, centre-cropped (or, crop False,
    resized to the square), normalised."""
    import comfy.clip_vision

    from ..faces.images import as_mask, as_rgb

    image = as_rgb(image, "image")
    b, h, w, _ = image.shape
    if min(h, w) < MIN_FACE_SIDE:
        raise ValueError(f"image: the face image is only {w}x{h} pixels; give PhotoVerse a face crop of at least "
                         f"{MIN_FACE_SIDE}x{MIN_FACE_SIDE} (Face Crop with size 224)")
    if mask is not None:
        image = image * as_mask(mask, b, h, w, "mask")[..., None]
    if h != w:
        log.info("Likeness PhotoVerse: the face image is %dx%d; CLIP vision sees its %s", w, h,
                 "centred square" if crop else "whole frame resized to a square")
    return comfy.clip_vision.clip_preprocess(image, size=clip_vision.image_size, mean=clip_vision.image_mean,
                                             std=clip_vision.image_std, crop=crop).float()


def patch_grid_mask(mask, batch: int, image_size: int, patch: int) -> torch.Tensor:
    """A MASK resized (nearest, no crop) to the CLIP patch grid, flattened: (B, patches, 1), as ELITE masks its
    local tokens on the 16 x 16 grid."""
    from ..faces.images import as_mask

    m = torch.as_tensor(mask).float()
    m = as_mask(m, batch, m.shape[-2], m.shape[-1], "mask")
    grid = image_size // patch
    m = torch.nn.functional.interpolate(m[:, None], size=(grid, grid), mode="nearest")
    return m.reshape(batch, grid * grid, 1)


def zero_input_features(clip_vision, layers) -> torch.Tensor:
    """CLIP features of the all-zeros CLIP input, (1, m, tokens, width), computed once per CLIP vision."""
    key = (tuple(int(x) for x in layers), str(clip_vision.load_device))
    cache = _zero_features.setdefault(clip_vision.model, {})
    if key not in cache:
        size = clip_vision.image_size
        cache[key] = _layer_features(clip_vision, torch.zeros(1, 3, size, size), layers)
    return cache[key]


def _run_adapter(adapter_patcher, fn, features: torch.Tensor):
    import comfy.model_management

    comfy.model_management.load_model_gpu(adapter_patcher)
    out = fn(features.to(adapter_patcher.load_device))
    if isinstance(out, dict):
        return {k: v.float().cpu() for k, v in out.items()}
    return out.float().cpu()


def _features(spec, clip_vision, image, mask):
    """(features for the words, features for the visual tokens): x_m for both (PhotoVerse), or ELITE's
    unmasked image for the words and masked image for the local tokens."""
    if spec.preprocess == "photoverse":
        feats = _layer_features(clip_vision, face_pixels(clip_vision, image, mask), spec.clip_layers)
        return feats, feats
    words = _layer_features(clip_vision, face_pixels(clip_vision, image, None, crop=False), spec.clip_layers)
    if not spec.has_visual:
        return words, None
    if mask is None:
        log.warning("Likeness PhotoVerse: ELITE's local mapper expects the object's mask (connect the mask input); "
                    "the whole image is used")
        return words, words
    return words, _layer_features(clip_vision, face_pixels(clip_vision, image, mask, crop=False), spec.clip_layers)


def encode_photoverse_concept(loaded, clip_vision, image, mask=None, words: int = 1, visual_tokens: str = "all",
                              combine: str = "average") -> LikenessConcept:
    """loaded: a LoadedPhotoVerse (weights/photoverse.py). Several images in the batch are several photos of one
    subject, joined by `combine` (average, concat, norm_average: concepts/combine.py)."""
    from ..weights.photoverse import check_for_clip_vision

    spec = loaded.spec
    if not 1 <= int(words) <= spec.num_words:
        raise ValueError(f"words must be between 1 and {spec.num_words} (this adapter makes {spec.num_words} words)")
    if visual_tokens not in VISUAL_TOKEN_MODES:
        raise ValueError(f"visual_tokens must be one of {VISUAL_TOKEN_MODES} (got {visual_tokens!r})")
    check_mode(combine)
    check_for_clip_vision(spec, clip_vision_signature(clip_vision), loaded.name)
    text_feats, visual_feats = _features(spec, clip_vision, image, mask)
    module = loaded.module
    visual = uncond = None
    with torch.no_grad():
        word_sets = _run_adapter(loaded.patcher, module.words, text_feats)                  # {w: (N, m_all, w)}
        if spec.has_visual:
            visual = _run_adapter(loaded.patcher, module.visual_tokens, visual_feats)         # (N, n_all, d_ctx)
        if spec.image_mapper in ("mlp", "elite"):
            zero = zero_input_features(clip_vision, spec.clip_layers)
            uncond = _run_adapter(loaded.patcher, module.visual_tokens, zero)[0]              # (n_all, d_ctx)
    if spec.image_mapper == "elite_local":
        if mask is not None:
            visual = visual * patch_grid_mask(mask, visual.shape[0], spec.clip_vision["image_size"],
                                              spec.clip_vision["patch"])
        if visual_tokens == "first":
            log.info("Likeness PhotoVerse: ELITE's local mapper gives one token per patch; all of them are used")
    elif visual is not None and visual_tokens == "first":
        visual, uncond = visual[:, :1], uncond[:1]
    return make_concept({w: v[:, :int(words)] for w, v in word_sets.items()}, visual, uncond, loaded, combine)


def _per_photo(x, name):
    if x is None:
        return None
    x = x.float().cpu()
    if x.ndim == 2:
        return x[None]
    if x.ndim != 3:
        raise ValueError(f"{name} must be (photos, n, width) or (n, width); got {tuple(x.shape)}")
    return x


def adapter_identity(loaded) -> dict:
    """What a concept records about the adapter that made it."""
    spec = loaded.spec
    return {"adapter": loaded.digest, "adapter_name": loaded.name, "base_model": spec.base_model,
            "model_name": spec.model_name, "text_widths": [int(w) for w in spec.text_widths],
            "context_dim": int(spec.context_dim), "clip_vision": describe_clip_vision(spec.clip_vision)}


def make_concept(words, visual, visual_uncond, loaded, combine: str = "average", source: str | None = None,
                 images: int | None = None) -> LikenessConcept:
    """A PhotoVerse concept made by the adapter `loaded` from per-photo words {text width: (N, m, width)} (or one
    tensor (m, width) / (N, m, width) for a one-encoder adapter), per-photo visual tokens (N, n, d_ctx) or
    (n, d_ctx) or None, and the unconditional visual tokens (n, d_ctx) or None."""
    if torch.is_tensor(words):
        widths = loaded.spec.text_widths
        if len(widths) != 1:
            raise ValueError(f"this adapter makes words for {len(widths)} text encoders; give one tensor per width "
                             f"{list(widths)}")
        words = {widths[0]: words}
    return build_concept(words, visual, visual_uncond, adapter_identity(loaded), combine,
                         source or f"PhotoVerse ({loaded.name})", images)


def build_concept(words: dict, visual, visual_uncond, identity: dict, combine: str, source: str,
                  images: int | None = None) -> LikenessConcept:
    """The concept from per-photo tensors and the identity of the adapter (adapter_identity, or a saved file's)."""
    words = {int(w): _per_photo(v, "words") for w, v in words.items()}
    if sorted(words) != sorted(int(w) for w in identity["text_widths"]):
        raise ValueError(f"words for widths {sorted(words)}, but the adapter makes {list(identity['text_widths'])}")
    visual = _per_photo(visual, "visual")
    photos = next(iter(words.values())).shape[0]
    if any(v.shape[0] != photos for v in words.values()) or (visual is not None and visual.shape[0] != photos):
        raise ValueError("the words and the visual tokens are for different numbers of photos")
    data = {**identity, "images": int(images or photos), "photos": {"words": words, "visual": visual},
            "visual_uncond_single": None if visual_uncond is None else visual_uncond.float().cpu()}
    placeholder = {w: v[0] for w, v in words.items()}  # replaced by recombine
    return recombine(LikenessConcept(vectors=placeholder, space=TOKEN_SPACE, source=source, metadata={META_KEY: data}),
                     combine)


def recombine(concept: LikenessConcept, combine: str) -> LikenessConcept:
    """The concept's photos joined with another combine mode (a new concept; the input is left as it was)."""
    data = dict(photoverse_data(concept))
    photos = data["photos"]
    n = next(iter(photos["words"].values())).shape[0]
    uncond = data.get("visual_uncond_single")
    data.update({"combine": check_mode(combine),
                 "visual": None if photos["visual"] is None else combine_photos(photos["visual"], combine),
                 "visual_uncond": None if uncond is None else combine_photos(uncond[None].expand(n, -1, -1), combine)})
    return LikenessConcept(vectors={w: combine_photos(v, combine) for w, v in photos["words"].items()},
                           space=TOKEN_SPACE, source=concept.source, metadata={**concept.metadata, META_KEY: data})


def photoverse_data(concept, name: str = "concept") -> dict:
    """The PhotoVerse part of a concept, or a plain error for any other concept."""
    if not isinstance(concept, LikenessConcept):
        raise ValueError(f"{name} must be a LIKENESS_CONCEPT from PhotoVerse Encode or Load PhotoVerse Concept")
    data = concept.metadata.get(META_KEY)
    if not isinstance(data, dict) or "photos" not in data:
        raise ValueError(f"{name}: '{concept.source or 'this concept'}' was not made by PhotoVerse Encode (it has no "
                         "PhotoVerse data); connect the concept output of PhotoVerse Encode or Load PhotoVerse Concept")
    return data
