"""The Taming Encoder's added cross-attention as contributions of the shared attn2 dispatcher (docs/methods/taming-encoder.md).

At every attn2 site, with Q the block's own query (shared, pretrained) and o the object tokens:
    O = Attn(Q, K_text, V_text) + weight * tanh(g_l) * Attn(Q, W_k^l o, W_v^l o)        (before to_out)
Conditional rows attend to the subject's tokens, unconditional rows (CFG's negative pass) to the null embedding
(the projection of eq. 4's fixed phi, or the learned tokens), as in training, where general-domain samples always
see it. Several photos of one subject are combined on the object tokens (combine_tokens). Heads and 1/sqrt(d_head) are the
host layer's. weight, the start/end window and the optional attention mask are the dispatcher's.
"""
import logging

import torch

from ..samplers.sigmas import percent_sigma_window
from .dispatcher import Contribution, add_contribution
from ..core.layout import attention_layout, weights_digest

log = logging.getLogger("likeness")

UNCOND_MODES = {"null embedding": "all", "no adapter": "cond"}
COMBINES = ("average", "concat", "norm average")


class ObjectTokens:
    """What the added attention attends to: the subject's tokens (1 or one per latent, N, context) and the null
    embedding (1, N', context). Inference caches casts per (device, dtype); the trainer sets new tokens every step
    (cache off, so autograd reaches the projection and phi)."""

    def __init__(self, tokens=None, null=None, cache: bool = True):
        self.cache = cache
        self._casts = {}
        self.tokens, self.null = None, None
        if tokens is not None:
            self.set(tokens, null)

    def set(self, tokens, null):
        if tokens.ndim != 3 or null.ndim != 3 or tokens.shape[-1] != null.shape[-1]:
            raise ValueError(f"object tokens {tuple(tokens.shape)} and null tokens {tuple(null.shape)} must both be "
                             "(batch, tokens, context) of one width")
        if tokens.shape[1] % null.shape[1] != 0:
            raise ValueError(f"{tokens.shape[1]} object tokens cannot share an attention call with {null.shape[1]} "
                             "null tokens (the object token count must be a multiple of the null's)")
        self.tokens, self.null = tokens, null
        self._casts = {}

    def get(self, device, dtype):
        if self.tokens is None:
            raise RuntimeError("the Taming Encoder's object tokens were never set")
        key = (str(device), dtype)
        if self.cache and key in self._casts:
            return self._casts[key]
        tokens, null = self.tokens.to(device=device, dtype=dtype), self.null.to(device=device, dtype=dtype)
        n, n_null = tokens.shape[1], null.shape[1]
        if n != n_null:
            # Repeating every key/value the same number of times leaves softmax attention unchanged; it gives
            # both kinds of row one length, so they share one attention call.
            null = null.repeat(1, n // n_null, 1)
        if self.cache:
            self._casts[key] = (tokens, null)
        return tokens, null

    def __deepcopy__(self, memo):
        return self


class TamingContribution(Contribution):
    """tanh(g) * Attn(Q, K_o, V_o) at one attn2 site; the dispatcher scales it by weight, window and mask."""

    def __init__(self, layer, source: ObjectTokens, adapter_patcher=None, **window):
        super().__init__(**window)
        self.layer, self.source, self.adapter_patcher = layer, source, adapter_patcher

    def contexts(self, call):
        """(stack, index): the distinct contexts (subject rows, then phi) and, per row of q, which one it attends
        to (index None: every row takes stack's single context)."""
        q = call.q
        tokens, null = self.source.get(q.device, q.dtype)
        kinds = call.row_kinds()
        per = call.chunk_batch
        if tokens.shape[0] not in (1, per):
            raise ValueError(f"the object tokens have {tokens.shape[0]} rows for a latent batch of {per}")
        if tokens.shape[0] == 1 and all(k == "cond" for k in kinds):
            return tokens, None
        if all(k == "uncond" for k in kinds):
            return null[:1], None
        stack = torch.cat([tokens, null[:1]], dim=0)
        null_row = stack.shape[0] - 1
        index = [null_row if kind == "uncond" else (r % per if tokens.shape[0] > 1 else 0)
                 for r, kind in enumerate(kinds)]
        return stack, torch.tensor(index, device=q.device)

    def compute(self, call):
        q = call.q
        gate = self.layer.gate_value(q)
        stack, index = self.contexts(call)
        k, v = self.layer.to_k(stack), self.layer.to_v(stack)  # projected once per distinct context
        if index is not None:
            k, v = k[index], v[index]
        return call.attention(q, k, v) * gate

    def models(self):
        return [self.adapter_patcher] if self.adapter_patcher is not None else []


def combine_tokens(tokens: torch.Tensor, combine: str) -> torch.Tensor:
    """Several photos of one subject, object tokens t_i (images, N, C) -> (1, N or images*N, C):
    average       mean_i t_i, token by token;
    concat        every photo's N tokens side by side (images * N tokens);
    norm average  the mean rescaled, token by token, to the mean of the photos' norms:
                  mean_i t_i * (mean_i |t_i|) / |mean_i t_i|, norms over the context width. Photos that disagree
                  give a shorter mean; the rescaling keeps the token as long as a single photo's, so the added
                  attention is as strong as with one photo."""
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)} (got {combine!r})")
    if tokens.shape[0] == 1:
        return tokens
    if combine == "concat":
        return tokens.reshape(1, -1, tokens.shape[-1])
    mean = tokens.mean(dim=0, keepdim=True)
    if combine == "average":
        return mean
    target = tokens.norm(dim=-1, keepdim=True).mean(dim=0, keepdim=True)
    return mean * (target / mean.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(mean.dtype).tiny))


def register_taming(model, encoder, source: ObjectTokens, adapter_patcher=None, layout=None, **window):
    """A clone of model with one TamingContribution per attn2 site (shared by inference and training)."""
    layout = layout or attention_layout(model)
    m = model.clone()
    for site in layout.sites:
        add_contribution(m, "attn2", site.key, TamingContribution(encoder.layer(site.key), source, adapter_patcher,
                                                                  **window))
    return m


def attach_for_training(model, encoder):
    """For the trainer: (patched clone, ObjectTokens). Set the batch's tokens with source.set(tokens, null) before
    each forward; tokens (batch, N, context) come from taming_training.training_object_tokens."""
    from ..weights.taming_file import check_taming_for_model

    layout = attention_layout(model)
    check_taming_for_model(encoder.spec, layout, "the Taming Encoder")
    source = ObjectTokens(cache=False)
    return register_taming(model, encoder, source, layout=layout), source


def apply_taming_encoder(model, adapter, embedding, weight: float = 1.0, start_percent: float = 0.0,
                         end_percent: float = 1.0, mask=None, uncond: str = "null embedding",
                         combine: str = "average"):
    """A clone of model with the Taming Encoder's added cross-attention on every attn2 site.

    adapter: a TamingAdapter (Load Taming Encoder); embedding: an ObjectEmbedding (Taming Encode). Raises
    ValueError in plain words when the adapter does not fit the model or the embedding's CLIP vision model.
    """
    from ..encoders.taming_object import ObjectEmbedding
    from ..weights.taming_file import TamingAdapter, check_taming_for_model, check_taming_for_vision

    if weight == 0.0:
        return model  # nothing to register: the model that came in (docs/stacking.md)
    if not isinstance(adapter, TamingAdapter):
        raise ValueError("taming must come from Load Taming Encoder (Likeness)")
    if not isinstance(embedding, ObjectEmbedding):
        raise ValueError("object_embeds must come from Taming Encode or Load Object Embeds (Likeness)")
    if uncond not in UNCOND_MODES:
        raise ValueError(f"uncond must be one of {', '.join(UNCOND_MODES)} (got {uncond!r})")
    layout = attention_layout(model)
    spec = adapter.module.spec
    check_taming_for_model(spec, layout, f"the Taming Encoder '{adapter.name}'")
    check_taming_for_vision(spec, embedding.vision, f"the Taming Encoder '{adapter.name}'")
    if mask is not None:
        if not torch.is_tensor(mask) or mask.ndim not in (2, 3):
            raise ValueError("attn_mask must be a MASK (height, width) or (batch, height, width)")
        mask = (mask[None] if mask.ndim == 2 else mask).float().cpu()
    high, low = percent_sigma_window(model, start_percent, end_percent)
    tuned = spec.extra.get("tuned_unet_digest")
    if tuned and tuned != weights_digest(model):
        log.warning("Likeness Taming Encoder: '%s' was trained together with a fine-tuned UNet (the paper tunes the "
                    "whole network); the connected model is a different one, so the likeness may be weaker. Load "
                    "the UNet the trainer wrote next to the adapter (taming_unet.safetensors) with Load Diffusion "
                    "Model", adapter.name)

    module = adapter.module
    with torch.no_grad():  # the projection runs once per Apply; sampling only sees its tokens
        features = embedding.features.float()
        tokens = combine_tokens(module.project(features).float(), combine).cpu()
        null = module.null_embedding(1, like=features).float().cpu()
    source = ObjectTokens(tokens, null)
    return register_taming(model, module, source, adapter.patcher, layout, weight=weight, sigma_start=high,
                           sigma_end=low, mask=mask, apply_to=UNCOND_MODES[uncond])
