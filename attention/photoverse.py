"""PhotoVerse's concept injection into every cross-attention block (docs/methods/photoverse.md, "Apply").

Text branch:   Q, K^T, V^T come from the block's own to_q/to_k/to_v with the LoRA deltas merged as weight patches
               (W + alpha * B @ A, applied by the host when it loads the model; or ELITE's replaced to_k/to_v,
               W + alpha * (W' - W)), over the prompt whose placeholder holds the words S* (Likeness Prompt).
Visual branch: K^S = W_k^S f, V^S = W_v^S f over the concept's visual tokens f (unconditional rows use the
               tokens of the zero CLIP input, which the trainer trains on: docs/methods/photoverse.md), through
               the shared attention dispatcher.
Fusion:        O = gamma_T * Attn(Q, K^T, V^T) + sigma_V * Attn(Q, K^S, V^S), before to_out.

The dispatcher's base output is the text attention, so the contribution adds
    (gamma_T - 1) * Attn(Q, K^T, V^T) + sigma_V * Attn(Q, K^S, V^S)
(the text attention is recomputed only when gamma_T != 1). A mask limits the change to a region, where outside
it the block keeps its plain output. fused_attention() is the same equation with per-sample scales, for the
trainer's random fusion (encoders/photoverse.py draw_fusion_scales).
"""
import torch

from ..samplers.sigmas import percent_sigma_window
from .dispatcher import Contribution, add_contribution, host_attention
from ..core.layout import attention_layout

SITE = "attn2"
MAX_SCALE = 3.0


def _per_sample(scale, like: torch.Tensor):
    """A float, or a (B,) tensor of per-sample scales repeated over the B' = chunks * B rows of q."""
    if not torch.is_tensor(scale):
        return float(scale)
    scale = scale.to(device=like.device, dtype=like.dtype).reshape(-1)
    rows = like.shape[0]
    if rows % scale.shape[0] != 0:
        raise ValueError(f"{scale.shape[0]} fusion scales for {rows} attention rows")
    return scale.repeat(rows // scale.shape[0])[:, None, None]


def fused_attention(q, k_text, v_text, k_visual, v_visual, heads: int, text_scale=1.0, visual_scale=1.0,
                    extra_options=None):
    """gamma_T * Attn(q, K^T, V^T) + sigma_V * Attn(q, K^S, V^S) with the host's attention backend.

    q (B', T, inner); k/v (B' or 1, tokens, inner); the scales are floats or (B,) tensors (one per sample, as the
    training-time random fusion draws them), repeated over cond/uncond chunks of the batch."""
    options = extra_options or {}

    def attend(k, v):
        if k.shape[0] != q.shape[0]:
            k, v = k.expand(q.shape[0], *k.shape[1:]), v.expand(q.shape[0], *v.shape[1:])
        return host_attention(q, k, v, heads, options)

    return (_per_sample(text_scale, q) * attend(k_text, v_text)
            + _per_sample(visual_scale, q) * attend(k_visual, v_visual))


class PhotoVerseContribution(Contribution):
    """The visual branch and the text scale at one cross-attention block (weight 1; the scales are inside).

    visual (n, d_ctx) are the concept's tokens for the conditional rows; visual_uncond those of the unconditional
    rows (the image adapter on the zero CLIP input, which the trainer also trains on), or None when the method
    gives the unconditional pass no visual branch (ELITE's local mapper). visual None: no visual branch at all."""

    def __init__(self, layer, visual, visual_uncond, text_scale: float = 1.0, visual_scale: float = 1.0,
                 adapter_patcher=None, **window):
        super().__init__(weight=1.0, **window)
        self.layer = layer
        self.visual = None if visual is None else visual.float()
        self.visual_uncond = None if visual_uncond is None else visual_uncond.float()
        self.text_scale, self.visual_scale = float(text_scale), float(visual_scale)
        self.adapter_patcher = adapter_patcher

    def visual_kv(self, call):
        """K^S, V^S for each row of q and a (rows, 1, 1) weight: 1 where the row has visual tokens, 0 for
        unconditional rows of a concept without unconditional tokens."""
        kinds = call.row_kinds()
        f = self.visual.to(device=call.q.device, dtype=call.q.dtype)
        if self.visual_uncond is None:
            keep = torch.tensor([k == "cond" for k in kinds], device=call.q.device, dtype=call.q.dtype)
            k, v = self.layer.visual_k(f[None]), self.layer.visual_v(f[None])
            return k.to(call.q.dtype), v.to(call.q.dtype), keep[:, None, None]
        tokens = torch.stack([f, self.visual_uncond.to(f)])                     # (2, n, d_ctx): cond, uncond
        k, v = self.layer.visual_k(tokens), self.layer.visual_v(tokens)
        rows = torch.tensor([0 if kind == "cond" else 1 for kind in kinds], device=call.q.device)
        return k[rows].to(call.q.dtype), v[rows].to(call.q.dtype), None

    def compute(self, call):
        out = 0
        if self.visual is not None and self.visual_scale != 0.0:
            k_s, v_s, keep = self.visual_kv(call)
            visual = call.attention(call.q, k_s, v_s)
            out = self.visual_scale * (visual if keep is None else visual * keep)
        if self.text_scale != 1.0:
            out = out + (self.text_scale - 1.0) * call.attention(call.q, call.k, call.v)
        return out if torch.is_tensor(out) else torch.zeros_like(call.q)

    def models(self):
        return [self.adapter_patcher] if self.adapter_patcher is not None else []


def _base_weight(model, key: str) -> torch.Tensor:
    """A UNet weight as the model holds it before its patches (the host keeps in-place patched originals in
    backup). Read once when Apply runs, never inside a patch."""
    import comfy.utils

    saved = getattr(model, "backup", {}).get(key)
    return (saved.weight if saved is not None else comfy.utils.get_attr(model.model, key)).detach()


def text_patches(loaded, layout, model) -> dict:
    """{host weight key: patch} for the text branch of every block; the host merges strength * patch.
    text_kv "lora": attn2 to_q/to_k/to_v get W + alpha * B @ A (alpha the node's lora_strength, the paper's alpha).
    text_kv "replace": attn2 to_k/to_v get W + alpha * (W' - W), i.e. W' at alpha 1 (ELITE's to_k/v_global)."""
    from comfy.weight_adapter.lora import LoRAAdapter

    sd = loaded.module.state_dict()
    patches = {}
    for site in layout.sites:
        prefix = f"layers.{site.name}"
        if loaded.spec.text_kv == "lora":
            for t in ("q", "k", "v"):
                up, down = sd[f"{prefix}.lora_{t}.up.weight"], sd[f"{prefix}.lora_{t}.down.weight"]
                # alpha None: the host scales by 1, so the node's strength is the paper's alpha directly (not PEFT's alpha / rank).
                patches[f"diffusion_model.{site.path}.attn2.to_{t}.weight"] = LoRAAdapter(set(), (up, down, None, None, None, None))
        else:
            for t in ("k", "v"):
                key = f"diffusion_model.{site.path}.attn2.to_{t}.weight"
                diff = sd[f"{prefix}.text_{t}.weight"].float() - _base_weight(model, key).float().cpu()
                patches[key] = (diff,)
    return patches


def _check_scale(name, value):
    if not 0.0 <= value <= MAX_SCALE:
        raise ValueError(f"{name} must be between 0 and {MAX_SCALE:g} (got {value})")


def _check_mask(mask):
    if mask is None:
        return None
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3) or min(mask.shape[-2:]) < 1:
        raise ValueError("attn_mask must be a MASK of shape (height, width) or (batch, height, width)")
    return (mask[None] if mask.ndim == 2 else mask).float().cpu()


def check_concept_for_adapter(data: dict, loaded):
    if data.get("adapter") != loaded.digest:
        raise ValueError(
            f"concept: it was made with another PhotoVerse adapter ('{data.get('adapter_name') or 'unknown'}'), not "
            f"with '{loaded.name}'; encode the face again with this adapter (PhotoVerse Encode) or load its own adapter")
    ctx = loaded.spec.context_dim
    for key in ("visual", "visual_uncond"):
        t = data.get(key)
        if t is not None and (t.ndim != 2 or t.shape[-1] != ctx):
            raise ValueError(f"concept: its {key} tokens are {tuple(t.shape)} but the adapter expects (n, {ctx})")


def apply_photoverse(model, loaded, concept, lora_strength: float = 1.0, text_scale: float = 1.0,
                     visual_scale: float = 1.0, start_percent: float = 0.0, end_percent: float = 1.0, mask=None):
    """A clone of model with PhotoVerse's text-branch weight change (strength alpha) and the fused cross-attention
    on every block. Everything is checked before the clone, so a bad input leaves nothing changed."""
    from ..concepts.photoverse_concept import photoverse_data
    from ..weights.photoverse import LoadedPhotoVerse, check_for_model

    if lora_strength == 0.0 and visual_scale == 0.0 and text_scale == 1.0:
        return model  # every part off: nothing to register, the model that came in (docs/stacking.md)
    if not isinstance(loaded, LoadedPhotoVerse):
        raise ValueError("adapter must be a PhotoVerse adapter (Load PhotoVerse Adapter or Load ELITE Weights)")
    data = photoverse_data(concept)
    layout = attention_layout(model)
    check_for_model(loaded.spec, layout, loaded.name)
    check_concept_for_adapter(data, loaded)
    _check_scale("lora_strength", lora_strength)
    _check_scale("text_scale", text_scale)
    _check_scale("visual_scale", visual_scale)
    mask = _check_mask(mask)
    high, low = percent_sigma_window(model, start_percent, end_percent)
    patches = text_patches(loaded, layout, model) if lora_strength != 0.0 else {}

    m = model.clone()
    if patches:
        added = m.add_patches(patches, strength_patch=float(lora_strength))
        if len(added) != len(patches):
            missing = sorted(set(patches) - set(added))
            raise ValueError(f"the model has no weights {missing[:3]} for PhotoVerse's LoRA; it is not {loaded.spec.base_model}")
    if text_scale == 1.0 and (visual_scale == 0.0 or data.get("visual") is None):
        return m  # the fused attention equals the plain text attention: nothing to register
    window = dict(sigma_start=high, sigma_end=low, mask=mask)
    for site in layout.sites:
        add_contribution(m, SITE, site.key, PhotoVerseContribution(
            loaded.module.layers[site.name], data.get("visual"), data.get("visual_uncond"), text_scale, visual_scale,
            adapter_patcher=loaded.patcher, **window))
    return m
