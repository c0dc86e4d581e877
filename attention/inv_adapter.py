"""Inv-Adapter (Xing et al. 2024; docs/methods/inv-adapter.md): extraction of the reference branch and the EAA processors.

Self side (eq. 2-3):   O_s' = O_s + sigma_I * softmax(Q_s K_s^T / sqrt(d)) V_s,  K_s = F_s^p W'_k, V_s = F_s^p W'_v
Cross side (eq. 4-5):  O_c' = O_c + sigma_I * softmax(Q_c K_c^T / sqrt(d)) V_c,  K_c = agg(F_c^p) W'_k^c, ...
Q is the block's own query (shared, pretrained); d is the head dimension (the host's head split, INV5); the sum is
taken before to_out (equivalent up to re-parameterising W'_v, as IP-Adapter does). Training-free mode: self side
only, with W'_k, W'_v = the layer's own attn1 to_k / to_v, called as modules.
"""
import logging

import torch

from ..samplers.inversion import ddim_invert_trajectory
from ..samplers.sigmas import percent_sigma_window
from .dispatcher import Contribution, add_contribution
from ..core.layout import attention_layout, model_fingerprint, transformer_block
from ..weights.inv_features_file import InvFeatures
from .reference_features import FeatureCapture, ReferenceProvider, ReferenceWrapper

log = logging.getLogger("likeness")

MIN_IMAGE_SIDE = 32
WRAPPER_KEY = "likeness_inv_adapter"


class EAAContribution(Contribution):
    """sigma_I * Attn(q, K'(F), V'(F)) at one site, F = the reference branch's input to that attention."""

    def __init__(self, provider: ReferenceProvider, site: str, key, project_k, project_v, aggregate=None,
                 adapter_patcher=None, **window):
        super().__init__(**window)
        self.provider, self.site, self.key = provider, site, tuple(key)
        self.project_k, self.project_v, self.aggregate = project_k, project_v, aggregate
        self.adapter_patcher = adapter_patcher

    def reference_kv(self, call):
        feats = self.provider.lookup(call.extra_options, self.site, self.key).to(call.q.device, call.q.dtype)
        if self.aggregate is not None:
            feats = self.aggregate(feats)
        return self.project_k(feats), self.project_v(feats)

    def compute(self, call):
        k, v = self.reference_kv(call)
        return call.attention(call.q, k.to(call.q.dtype), v.to(call.q.dtype))

    def models(self):
        return [self.adapter_patcher] if self.adapter_patcher is not None else []


# --- extraction -----------------------------------------------------------------------------------------------

def prepare_reference_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE (1, H, W, C) -> (1, size, size, 3): alpha dropped, grey repeated, centre-cropped square, resized."""
    import comfy.utils

    if not torch.is_tensor(image) or image.ndim != 4:
        raise ValueError(f"image must be an IMAGE batch (batch, height, width, channels); got {getattr(image, 'shape', type(image))}")
    if image.shape[0] != 1:
        raise ValueError(f"image: Inv-Adapter takes one face image, got a batch of {image.shape[0]}; pick one (e.g. ImageFromBatch)")
    b, h, w, c = image.shape
    if c == 1:
        image = image.repeat(1, 1, 1, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise ValueError(f"image has {c} channels; expected RGB (3), RGBA (4) or greyscale (1)")
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ValueError(f"image is only {w}x{h} pixels; Inv-Adapter needs a face crop of at least "
                         f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} (it is resized to {size}x{size})")
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        log.info("Likeness Inv-Adapter: the face image is %dx%d; using its centred %dx%d square", w, h, side, side)
        image = image[:, top:top + side, left:left + side]
    pixels = comfy.utils.common_upscale(image.movedim(-1, 1).float(), size, size, "bicubic", "disabled")
    return pixels.movedim(1, -1).clamp(0.0, 1.0)


def _caption(conditioning, layout):
    if not conditioning or not torch.is_tensor(conditioning[0][0]):
        raise ValueError("caption must be a CONDITIONING (CLIP Text Encode of the face crop's caption, e.g. 'a photo of a face')")
    cond, extra = conditioning[0]
    if cond.shape[-1] != layout.context_dim:
        raise ValueError(f"caption has width {cond.shape[-1]} but the model's cross-attention expects "
                         f"{layout.context_dim}: encode it with the CLIP that belongs to this model")
    clean = {k: extra[k] for k in ("pooled_output",) if k in extra}  # no ControlNet, area or hooks on the reference
    return cond[:1].float().cpu(), [[cond[:1], clean]]


def extract_inv_features(model, vae, image, caption, steps: int, scheduler: str = "ddim_uniform", size: int = 512,
                         cache_features: bool = True, feature_dtype=torch.float16, callback=None,
                         disable_pbar: bool = True) -> InvFeatures:
    """Encode the face, invert it (CFG 1, caption as prompt) and keep the trajectory, and in cache mode the
    reference branch's attention inputs at every grid point (captured during the inversion's own model calls).

    The reference branch is the frozen UNet: the model's weight patches (LoRA) stay, attention patches of other
    nodes are removed for the extraction (they are not part of the paper's reference branch).
    """
    layout = attention_layout(model)
    caption_tensor, caption_cond = _caption(caption, layout)
    if size % 8 != 0 or size < 64:
        raise ValueError(f"size must be a multiple of 8 and at least 64 (got {size})")
    pixels = prepare_reference_image(image, size)
    latent = vae.encode(pixels)

    m = model.clone()
    options = dict(m.model_options["transformer_options"])
    options.pop("patches", None)
    options.pop("patches_replace", None)
    m.model_options["transformer_options"] = options
    store = {}
    features = {} if cache_features else None
    if cache_features:
        m.set_model_attn1_patch(FeatureCapture("attn1", store, feature_dtype, torch.device("cpu")))
        m.set_model_attn2_patch(FeatureCapture("attn2", store, feature_dtype, torch.device("cpu")))

    def on_point(i, sigma, x, eps):
        if features is not None and i >= 1:  # point 0 is evaluated at sigmas[1]: not a feature the sampler needs
            features[i] = dict(store)
        store.clear()

    traj = ddim_invert_trajectory(m, caption_cond, {"samples": latent}, steps, scheduler, on_point=on_point,
                                  callback=callback, disable_pbar=disable_pbar)
    if features is not None:
        missing = [k for k in range(1, traj.sigmas.shape[0]) if len(features.get(k, {})) != 2 * len(layout.sites)]
        if missing:
            raise RuntimeError(f"Inv-Adapter extraction captured no features at {len(missing)} grid points; another "
                               "node's wrapper may be skipping model evaluations (disable caches such as EasyCache)")
    info = {"steps": int(steps), "scheduler": scheduler, "size": int(size), "cached": bool(cache_features)}
    return InvFeatures(fingerprint=model_fingerprint(model, layout), sigmas=traj.sigmas.float(),
                       latents=traj.latents[:, 0], eps=traj.eps[:, 0], caption=caption_tensor,
                       features=features, info=info)


# --- application ----------------------------------------------------------------------------------------------

def eaa_patcher(adapter):
    """The adapter's own ModelPatcher, made once per loaded adapter so the host's memory manager loads and
    offloads it with the UNet (and never sees a patcher die while its module lives on)."""
    import comfy.model_management
    import comfy.model_patcher

    patcher = getattr(adapter, "_likeness_patcher", None)
    if patcher is None:
        patcher = comfy.model_patcher.ModelPatcher(adapter, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        adapter._likeness_patcher = patcher
    return patcher


def apply_inv_adapter(model, features: InvFeatures, adapter=None, weight: float = 0.8, self_attention: bool = True,
                      cross_attention: bool = True, start_percent: float = 0.0, end_percent: float = 1.0,
                      mask=None, apply_to: str = "all"):
    """A clone of model with EAA contributions on every transformer block.

    adapter: an EmbeddedAttentionAdapter (trained mode) or None (training-free: self side with the layer's own
    to_k/to_v). Raises ValueError in plain words if the features or adapter do not belong to this model.
    """
    from ..weights.eaa import check_eaa_for_model, check_eaa_for_reference
    import comfy.patcher_extension

    if weight == 0.0 or not (self_attention or cross_attention):
        return model  # nothing to register: the model that came in (docs/stacking.md)
    if not isinstance(features, InvFeatures):
        raise ValueError("inv_features must come from Inv-Adapter Extract or Load Inv-Adapter Features")
    layout = attention_layout(model)
    try:
        features.check_model(model_fingerprint(model, layout))
    except ValueError as e:
        raise ValueError(f"inv_features: {e}") from e
    if adapter is not None:
        check_eaa_for_model(adapter.spec, layout, "adapter")
        check_eaa_for_reference(adapter.spec, features.reference_latent, "adapter")
    if mask is not None:
        if not torch.is_tensor(mask) or mask.ndim not in (2, 3):
            raise ValueError("attn_mask must be a MASK (height, width) or (batch, height, width)")
        mask = (mask[None] if mask.ndim == 2 else mask).float().cpu()
    high, low = percent_sigma_window(model, start_percent, end_percent)

    sides = tuple(adapter.spec.sides) if adapter is not None else ()
    if cross_attention and "cross" not in sides:
        log.info("Likeness Inv-Adapter: cross-attention injection needs an EAA adapter with a cross side; "
                 "injecting into self-attention only")
    m = model.clone()
    provider = ReferenceProvider(features, is_needed=lambda s: weight != 0 and low <= s <= high)
    adapter_patcher = eaa_patcher(adapter) if adapter is not None else None
    window = dict(weight=weight, sigma_start=high, sigma_end=low, mask=mask, apply_to=apply_to)
    registered = 0
    for site in layout.sites:
        layer = adapter.layer(site.key) if adapter is not None else None
        if self_attention:
            if "self" in sides:
                pk, pv = layer.self_k, layer.self_v
            else:
                attn1 = transformer_block(model, site).attn1
                pk, pv = attn1.to_k, attn1.to_v
            add_contribution(m, "attn1", site.key, EAAContribution(
                provider, "attn1", site.key, pk, pv, adapter_patcher=adapter_patcher if "self" in sides else None,
                **window))
            registered += 1
        if cross_attention and "cross" in sides:
            add_contribution(m, "attn2", site.key, EAAContribution(
                provider, "attn2", site.key, layer.cross_k, layer.cross_v, aggregate=layer.aggregate_tokens,
                adapter_patcher=adapter_patcher, **window))
            registered += 1
    if registered:
        key = f"{WRAPPER_KEY}_{provider.uid}"
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, ReferenceWrapper(provider))
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, key, provider.reset)
        m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, key, provider.reset)
    return m if registered else model
