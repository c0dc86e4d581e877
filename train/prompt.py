"""Prompts for training: a template with learned vectors at its placeholder, and fixed captions.

TrainablePrompt goes through exactly the inference path (concepts/prompt_injection.py): the Likeness Prompt's
token substitution and its DynamicPrompt, which re-encodes the prompt with new vectors per batch row. The host's
text encoder takes injected embeddings as they are, so gradients reach the vectors (ProFusion's S*, PhotoVerse's
words) while the encoder itself stays frozen; only its in-place residual additions have to run out of place
while gradients are taken (differentiable_text_encoder).
"""
import contextlib
import types

import torch

from ..concepts.concept import HIDDEN_SPACE, TOKEN_SPACE, LikenessConcept, by_width
from ..concepts.prompt_injection import DYNAMIC_KEY, encode_likeness_prompt, encoder_widths


def _residual_forward(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward with out-of-place residual additions (the host's `x += ...` would
    overwrite activations autograd still needs)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


@contextlib.contextmanager
def differentiable_text_encoder(clip):
    """For the duration, every CLIPLayer of the CLIP's text encoders runs the out-of-place forward above (an
    instance attribute, removed afterwards); the weights and results are the host's."""
    from comfy.clip_model import CLIPLayer

    layers = [m for m in clip.cond_stage_model.modules() if isinstance(m, CLIPLayer) and "forward" not in m.__dict__]
    for layer in layers:
        layer.forward = types.MethodType(_residual_forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


class _Learned:
    """Marks a concept as recomputed by the caller (the trainer hands the vectors to encode())."""

    def models(self):
        return []


class TrainablePrompt:
    """A template with learned vectors at its placeholder, for every text encoder of the CLIP.

    width: None (every encoder of the CLIP), one encoder's width, the sum of all widths (one concatenated tensor,
    SDXL: 768 + 1280 = 2048) or the list of widths. encode() takes {width: (B, n, width)} or one (B, n, sum of
    widths) tensor in ascending width order (concepts/concept.by_width)."""

    def __init__(self, clip, template: str = "a photo of holder", placeholder: str = "holder", width=None,
                 vectors: int = 1, space: str = HIDDEN_SPACE):
        if space not in (HIDDEN_SPACE, TOKEN_SPACE):
            raise ValueError(f"space must be '{HIDDEN_SPACE}' or '{TOKEN_SPACE}'")
        widths = encoder_widths(clip)
        asked = sorted(int(w) for w in width) if isinstance(width, (list, tuple)) else width
        if asked is not None and asked not in (widths, sum(widths)) and not (len(widths) == 1 and asked == widths[0]):
            raise ValueError(f"the prompt's vectors are {asked} wide but this CLIP's text encoders are {widths} wide")
        concept = LikenessConcept(vectors={w: torch.zeros(vectors, w) for w in widths}, space=space, source="training",
                                  dynamic=_Learned())
        with torch.no_grad():
            _, concept_cond, _ = encode_likeness_prompt(clip, template, concept, placeholder, "person", 1.0)
        self.dynamic = concept_cond[0][1][DYNAMIC_KEY]
        self.template, self.placeholder, self.vectors, self.space = template, placeholder, vectors, space
        self.widths, self.width = widths, sum(widths)

    def _check(self, vectors):
        parts = vectors.values() if isinstance(vectors, dict) else [vectors]
        for v in parts:
            if v.ndim != 3 or v.shape[1] != self.vectors:
                raise ValueError(f"the prompt takes {self.vectors} vector(s) per sample of widths {self.widths}, "
                                 f"got {tuple(v.shape)}")
        return by_width(vectors, self.widths)

    def encode(self, vectors) -> torch.Tensor:
        """vectors -> conditioning (B, tokens, context) with gradients to the vectors."""
        return self.encode_with_pooled(vectors)[0]

    def encode_with_pooled(self, vectors):
        """vectors -> (conditioning, pooled output or None): SDXL's `y` needs the pooled output, which depends on
        the learned vectors too (train/diffusion.py size_conditioning_y)."""
        vectors = self._check(vectors)
        with differentiable_text_encoder(self.dynamic.clip):
            return self.dynamic.encode_with_pooled(vectors)


def _text_width(clip) -> int:
    tokens = clip.tokenize("a")
    key = next(iter(tokens))
    model = getattr(clip.cond_stage_model, f"clip_{key}")
    return int(model.transformer.get_input_embeddings().weight.shape[-1])


class CaptionEncoder:
    """Fixed (no-gradient) conditionings of captions, cached by text, cut to one 77-token chunk so a batch of
    different captions stacks. with_pooled() also gives the pooled output SDXL's size conditioning needs."""

    def __init__(self, clip, max_cache: int = 4096):
        self.clip, self.cache, self.max_cache = clip, {}, max_cache

    def _encode(self, text):
        hit = self.cache.get(text)
        if hit is None:
            with torch.no_grad():
                cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            chunk = len(next(iter(self.clip.tokenize("").values()))[0])
            hit = (cond[:, :chunk].float().cpu(), None if pooled is None else pooled.float().cpu())
            if len(self.cache) < self.max_cache:
                self.cache[text] = hit
        return hit

    def __call__(self, texts) -> torch.Tensor:
        return torch.cat([self._encode(text)[0] for text in texts])

    def with_pooled(self, texts):
        """(context (B, tokens, width), pooled (B, width_g) or None for encoders without a pooled output)."""
        hits = [self._encode(text) for text in texts]
        pooled = [p for _, p in hits]
        return torch.cat([c for c, _ in hits]), (None if any(p is None for p in pooled) else torch.cat(pooled))
