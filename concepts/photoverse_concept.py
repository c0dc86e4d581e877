"""From a face photo to a PhotoVerse concept (docs/methods/photoverse.md, A.7).

  x_m = face crop with non-face pixels zeroed (the MASK input, or a crop that is already masked)
  CLIP-vision hidden states of the layers the adapter reads (host ClipVisionModel, all layers in one pass)
  words S1..Sm = text adapter (m kept, default 1: S1 from the deepest layer, as ELITE's --token_index 0)
  visual tokens f = image adapter (all m by default, PV3; "first" keeps one like the port)
  unconditional visual tokens = image adapter on the CLIP features of an all-zeros CLIP input (the port's
  CFG choice [PV-unoff infer.py]); zeros are taken in the normalised pixel space the encoder sees, i.e. the
  dataset-mean grey image. They depend only on the CLIP vision and the adapter, so the CLIP features of the zero
  input are cached per CLIP-vision model.

The result is a LikenessConcept: the words as token-space vectors keyed by the text width (so the Likeness
Prompt node injects them before position embeddings), and in metadata["photoverse"] the visual tokens and the
identity of the adapter that made them (PhotoVerse Apply refuses a concept from another adapter).
"""
import logging
import weakref

import torch

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


def _layer_features(clip_vision, pixel_values: torch.Tensor, layers) -> torch.Tensor:
    """(B, 3, S, S) normalised pixels -> (B, m, tokens, width) float32 on the CPU; layers in hidden-state numbering
    (the host returns the output of encoder layer i at index i - 1)."""
    import comfy.model_management

    comfy.model_management.load_model_gpu(clip_vision.patcher)
    _, hidden, _, _ = clip_vision.model(pixel_values=pixel_values.to(clip_vision.load_device),
                                        intermediate_output="all")
    return hidden[:, [int(i) - 1 for i in layers]].float().cpu()


def face_pixels(clip_vision, image: torch.Tensor, mask=None) -> torch.Tensor:
    """IMAGE (+ optional MASK) -> the CLIP input of x_m: (B, 3, S, S), masked, centre-cropped, normalised."""
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
        log.info("Likeness PhotoVerse: the face image is %dx%d; CLIP vision sees its centred square", w, h)
    return comfy.clip_vision.clip_preprocess(image, size=clip_vision.image_size, mean=clip_vision.image_mean,
                                             std=clip_vision.image_std, crop=True).float()


def zero_input_features(clip_vision, layers) -> torch.Tensor:
    """CLIP features of the all-zeros CLIP input, (1, m, tokens, width), computed once per CLIP vision."""
    key = (tuple(int(x) for x in layers), str(clip_vision.load_device))
    cache = _zero_features.setdefault(clip_vision.model, {})
    if key not in cache:
        size = clip_vision.image_size
        cache[key] = _layer_features(clip_vision, torch.zeros(1, 3, size, size), layers)
    return cache[key]


def _run_adapter(adapter_patcher, fn, features: torch.Tensor) -> torch.Tensor:
    import comfy.model_management

    comfy.model_management.load_model_gpu(adapter_patcher)
    return fn(features.to(adapter_patcher.load_device)).float().cpu()


def encode_photoverse_concept(loaded, clip_vision, image, mask=None, words: int = 1,
                              visual_tokens: str = "all") -> LikenessConcept:
    """loaded: a LoadedPhotoVerse (weights/photoverse.py). Several images in the batch are averaged (one identity)."""
    from ..weights.photoverse import check_for_clip_vision

    spec = loaded.spec
    if not 1 <= int(words) <= spec.num_words:
        raise ValueError(f"words must be between 1 and {spec.num_words} (this adapter makes {spec.num_words} words)")
    if visual_tokens not in VISUAL_TOKEN_MODES:
        raise ValueError(f"visual_tokens must be one of {VISUAL_TOKEN_MODES} (got {visual_tokens!r})")
    check_for_clip_vision(spec, clip_vision_signature(clip_vision), loaded.name)
    pixels = face_pixels(clip_vision, image, mask)
    feats = _layer_features(clip_vision, pixels, spec.clip_layers)
    zero = zero_input_features(clip_vision, spec.clip_layers)
    module = loaded.module
    with torch.no_grad():
        word_vectors = _run_adapter(loaded.patcher, module.words, feats).mean(0)         # (m_all, d_txt)
        visual = _run_adapter(loaded.patcher, module.visual_tokens, feats).mean(0)       # (m_all, d_ctx)
        visual_uncond = _run_adapter(loaded.patcher, module.visual_tokens, zero)[0]      # (m_all, d_ctx)
    n_visual = spec.num_words if visual_tokens == "all" else 1
    return make_concept(word_vectors[:int(words)], visual[:n_visual], visual_uncond[:n_visual], loaded,
                        images=int(pixels.shape[0]))


def make_concept(word_vectors, visual, visual_uncond, loaded, images: int = 1,
                 source: str | None = None) -> LikenessConcept:
    """A PhotoVerse concept from words (m, d_txt) and visual tokens (n, d_ctx) made by the adapter `loaded`."""
    spec = loaded.spec
    data = {"adapter": loaded.digest, "adapter_name": loaded.name, "base_model": spec.base_model,
            "model_name": spec.model_name, "text_width": spec.text_width, "context_dim": spec.context_dim,
            "clip_vision": describe_clip_vision(spec.clip_vision), "visual": visual.float().cpu(),
            "visual_uncond": visual_uncond.float().cpu(), "images": int(images)}
    return LikenessConcept(vectors={spec.text_width: word_vectors.float().cpu()}, space=TOKEN_SPACE,
                           source=source or f"PhotoVerse ({loaded.name})", metadata={META_KEY: data})


def photoverse_data(concept, name: str = "concept") -> dict:
    """The PhotoVerse part of a concept, or a plain error for any other concept."""
    if not isinstance(concept, LikenessConcept):
        raise ValueError(f"{name} must be a LIKENESS_CONCEPT from PhotoVerse Encode or Load PhotoVerse Concept")
    data = concept.metadata.get(META_KEY)
    if not isinstance(data, dict) or "visual" not in data:
        raise ValueError(f"{name}: '{concept.source or 'this concept'}' was not made by PhotoVerse Encode (it has no "
                         "visual tokens); connect the concept output of PhotoVerse Encode or Load PhotoVerse Concept")
    return data
