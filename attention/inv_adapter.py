"""Inv-Adapter (Xing et al. 2024; docs/methods/inv-adapter.md): extraction of the reference branch and the EAA processors.

Self side (eq. 2-3):   O_s' = O_s + sigma_I * softmax(Q_s K_s^T / sqrt(d)) V_s,  K_s = F_s^p W'_k, V_s = F_s^p W'_v
Cross side (eq. 4-5):  O_c' = O_c + sigma_I * softmax(Q_c K_c^T / sqrt(d)) V_c,  K_c = agg(F_c^p) W'_k^c, ...
Q is the block's own query (shared, pretrained); d is the head dimension (the host's head split); the sum is
taken before to_out (equivalent up to re-parameterising W'_v, as IP-Adapter does). Training-free mode: self side
only, with W'_k, W'_v = the layer's own attn1 to_k / to_v, called as modules.
"""
import logging

import torch

from ..samplers.inversion import ddim_invert_trajectory, inversion_sigmas
from ..samplers.sigmas import percent_sigma_window
from .dispatcher import Contribution, add_contribution
from ..core.layout import attention_layout, model_fingerprint, transformer_block
from ..weights.inv_features_file import InvFeatures
from ..encoders.token_aggregation import COMBINE_MODES, combine_photos, pool_grid
from .reference_features import FeatureCapture, ReferenceProvider, ReferenceWrapper, reference_y

log = logging.getLogger("likeness")

MIN_IMAGE_SIDE = 32
WRAPPER_KEY = "likeness_inv_adapter"


class EAAContribution(Contribution):
    """sigma_I * Attn(q, K'(F), V'(F)) at one site, F = the reference branch's input to that attention.

    combine: how several photos' tokens become one token set ("concat", "average", "norm average"), or
    "per_row" (training: row i of the batch attends to reference i). pool > 1 averages the reference grid in
    pool x pool windows before projecting (the fast mode). K'/V' are computed once per set of features (one
    step) and shared by the calls of one step when the host splits cond and uncond into separate passes."""

    def __init__(self, provider: ReferenceProvider, site: str, key, project_k, project_v, aggregate=None,
                 adapter_patcher=None, combine: str = "concat", pool: int = 1, grid=None, **window):
        super().__init__(**window)
        if combine != "per_row" and combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)} (got {combine!r})")
        self.provider, self.site, self.key = provider, site, tuple(key)
        self.project_k, self.project_v, self.aggregate = project_k, project_v, aggregate
        self.adapter_patcher = adapter_patcher
        self.combine, self.pool, self.grid = combine, int(pool), grid

    def reference_tokens(self, feats):
        """(photos, tokens, width) features -> the token set K'/V' project: pooled (fast mode), aggregated (cross
        side of an adapter), then the photos combined."""
        if self.pool > 1:
            feats = pool_grid(feats, self.grid, self.pool)
        if self.aggregate is not None:
            feats = self.aggregate(feats)
        return feats if self.combine == "per_row" else combine_photos(feats, self.combine)

    def reference_kv(self, call):
        feats = self.provider.lookup(call.extra_options, self.site, self.key)
        kept = getattr(self.provider, "kv_cache", None)  # the provider empties it at every new step and at cleanup
        cached = kept.get(id(self)) if kept is not None else None
        if cached is not None and cached[0] is feats:
            k, v = cached[1], cached[2]
        else:
            tokens = self.reference_tokens(feats.to(call.q.device, call.q.dtype))
            k, v = self.project_k(tokens).to(call.q.dtype), self.project_v(tokens).to(call.q.dtype)
            # A call holding only the cond or only the uncond rows is followed by one for the others at the same
            # step (the host split the batch): keep K'/V' for it. A full batch needs them once, so nothing is held.
            if kept is not None and len(call.cond_or_uncond) == 1 and not torch.is_grad_enabled():
                kept[id(self)] = (feats, k, v)
        rows = call.q.shape[0]
        if k.shape[0] != rows:
            # One materialised copy per row rather than a broadcast (stride-0) batch: every host kernel takes it,
            # and bench/bench_attention_layout.py found it no slower on the CPU default kernel (a few % on
            # attention_pytorch; docs/methods/inv-adapter.md, Speed).
            k, v = k.expand(rows, -1, -1).contiguous(), v.expand(rows, -1, -1).contiguous()
        return k, v

    def compute(self, call):
        k, v = self.reference_kv(call)
        return call.attention(call.q, k, v)

    def models(self):
        return [self.adapter_patcher] if self.adapter_patcher is not None else []

    def __deepcopy__(self, memo):
        return self


# --- extraction -----------------------------------------------------------------------------------------------

STORE_MODES = ("all", "self", "none")   # features of both attentions, of self-attention only, or none (live)
DEFAULT_MEMORY_GB = 4.0                 # the default budget for stored features (docs/methods/inv-adapter.md)


def prepare_reference_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """IMAGE (N, H, W, C) -> (N, size, size, 3): alpha dropped, grey repeated, centre-cropped square, resized.
    Each image of the batch is one reference photo."""
    import comfy.utils

    if not torch.is_tensor(image) or image.ndim != 4:
        raise ValueError(f"image must be an IMAGE batch (batch, height, width, channels); got {getattr(image, 'shape', type(image))}")
    b, h, w, c = image.shape
    if b < 1:
        raise ValueError("image is an empty batch; connect at least one face photo")
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


def needs_vector_conditioning(model) -> bool:
    """SDXL-style UNets condition on a vector `y` besides the context."""
    return model.model.model_config.unet_config.get("adm_in_channels") is not None


def reference_conditioning(model, context, pooled, size: int):
    """The reference branch's CONDITIONING: the caption context, and for SDXL-style models its pooled output with
    the reference's own size (size x size, uncropped), from which the host builds the branch's exact `y`."""
    if not needs_vector_conditioning(model):
        return [[context, {}]]
    if pooled is None:
        raise ValueError("caption has no pooled text output, which this SDXL-style model needs for the reference "
                         "branch: encode the caption with CLIP Text Encode (or CLIPTextEncodeSDXL) of this model")
    return [[context, {"pooled_output": pooled, "width": size, "height": size, "crop_w": 0, "crop_h": 0,
                       "target_width": size, "target_height": size}]]


def _caption(conditioning, layout, model, size):
    """(C_inv (1, L, context) on the CPU, the inversion's CONDITIONING, pooled output or None). For SDXL the
    conditioning carries the reference's own size (size x size, uncropped), so the host builds the reference
    branch's exact `y` from it (reference_y gives the same vector)."""
    if not conditioning or not torch.is_tensor(conditioning[0][0]):
        raise ValueError("caption must be a CONDITIONING (CLIP Text Encode of the face crop's caption, e.g. 'a photo of a face')")
    cond, extra = conditioning[0]
    if cond.shape[-1] != layout.context_dim:
        raise ValueError(f"caption has width {cond.shape[-1]} but the model's cross-attention expects "
                         f"{layout.context_dim}: encode it with the CLIP that belongs to this model")
    pooled = extra.get("pooled_output") if needs_vector_conditioning(model) else None
    pooled = None if pooled is None else pooled[:1]
    # Only the text: no ControlNet, area or hooks on the reference branch.
    return cond[:1].float().cpu(), reference_conditioning(model, cond[:1], pooled, size), pooled


def feature_bytes_per_point(layout, sides, photos: int, latent_hw, dtype=torch.float16) -> int:
    """Bytes of one grid point's stored features: photos x tokens x width per block and attention."""
    size = torch.tensor([], dtype=dtype).element_size()
    return sum(len(sides) * photos * s.tokens(*latent_hw) * s.query_dim * size for s in layout.sites)


def stored_points(steps: int, per_point: int, memory_gb: float) -> list:
    """The grid points 1..steps whose features fit in memory_gb (0: no limit), spread evenly over the grid."""
    if memory_gb <= 0 or per_point * steps <= memory_gb * 2**30:
        return list(range(1, steps + 1))
    keep = int(memory_gb * 2**30 // max(per_point, 1))
    if keep <= 0:
        return []
    return sorted({int(round(1 + i * (steps - 1) / max(keep - 1, 1))) for i in range(keep)}) if keep > 1 else [steps]


def extract_inv_features(model, vae, image, caption, steps: int, scheduler: str = "ddim_uniform", size: int = 512,
                         store: str = "all", memory_gb: float = DEFAULT_MEMORY_GB, feature_dtype=torch.float16,
                         callback=None, disable_pbar: bool = True) -> InvFeatures:
    """Encode the face photos, invert them together (CFG 1, caption as prompt) and keep the trajectories, and the
    reference branch's attention inputs at the grid points (captured during the inversion's own model calls).

    store: "all" (both attentions' inputs), "self" (self-attention inputs only: all that training-free Apply
    reads, half the memory) or "none" (trajectory only: Apply runs the reference branch live). memory_gb caps the
    stored features (0 = no cap): the points that do not fit are left to a live pass. The reference branch is the
    frozen UNet: the model's weight patches (LoRA) stay, attention patches of other nodes are removed for the
    extraction (they are not part of the paper's reference branch).
    """
    if store not in STORE_MODES:
        raise ValueError(f"store must be one of {', '.join(STORE_MODES)} (got {store!r})")
    if size % 8 != 0 or size < 64:
        raise ValueError(f"size must be a multiple of 8 and at least 64 (got {size})")
    if not memory_gb >= 0:
        raise ValueError(f"memory_gb must be 0 (no limit) or more (got {memory_gb})")
    layout = attention_layout(model)
    caption_tensor, caption_cond, pooled = _caption(caption, layout, model, size)
    pixels = prepare_reference_image(image, size)
    photos = int(pixels.shape[0])
    latent = vae.encode(pixels)

    m = model.clone()
    options = dict(m.model_options["transformer_options"])
    options.pop("patches", None)
    options.pop("patches_replace", None)
    m.model_options["transformer_options"] = options
    sides = {"all": ("attn1", "attn2"), "self": ("attn1",), "none": ()}[store]
    points = len(inversion_sigmas(m, scheduler, steps)) - 1  # the grid the inversion walks (some schedulers merge steps)
    per_point = feature_bytes_per_point(layout, sides, photos, (size // 8, size // 8), feature_dtype)
    keep = set(stored_points(points, per_point, memory_gb)) if sides else set()
    if sides and len(keep) < points:
        log.info("Likeness Inv-Adapter: features of %d of %d steps fit in %.1f GB (%.0f MiB per step); the other steps "
                 "run the reference branch live", len(keep), points, memory_gb, per_point / 2**20)
    capture = {}
    features = {} if keep else None
    for site in sides:
        patch = FeatureCapture(site, capture, feature_dtype, torch.device("cpu"), rows=photos)
        (m.set_model_attn1_patch if site == "attn1" else m.set_model_attn2_patch)(patch)

    def on_point(i, sigma, x, eps):
        if features is not None and i in keep:  # point 0 is evaluated at sigmas[1]: not a feature the sampler needs
            features[i] = dict(capture)
        capture.clear()

    traj = ddim_invert_trajectory(m, caption_cond, {"samples": latent}, steps, scheduler, on_point=on_point,
                                  callback=callback, disable_pbar=disable_pbar)
    if features is not None:
        missing = [k for k in keep if len(features.get(k, {})) != len(sides) * len(layout.sites)]
        if missing:
            raise RuntimeError(f"Inv-Adapter extraction captured no features at {len(missing)} grid points; another "
                               "node's wrapper may be skipping model evaluations (disable caches such as EasyCache)")
    info = {"steps": int(steps), "scheduler": scheduler, "size": int(size), "store": store, "photos": photos,
            "stored_points": len(keep), "cached": bool(keep)}
    return InvFeatures(fingerprint=model_fingerprint(model, layout), sigmas=traj.sigmas.float(),
                       latents=traj.latents, eps=traj.eps, caption=caption_tensor,
                       y=reference_y(model.model, pooled, size), features=features, info=info)


# --- application ----------------------------------------------------------------------------------------------

SPEEDS = ("exact", "fast")


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


def fast_pooling(layout, reference_latent) -> dict:
    """The fast mode's pooling: {site key: (factor, reference grid)}. The reference tokens of the blocks at the
    model's largest token grid (SD1.5 and SDXL: the first attention level) are averaged in 2 x 2 windows, which
    cuts the extra attention there by 4; every other block keeps all its tokens."""
    finest = min(s.downscale for s in layout.sites)
    out = {}
    for s in layout.sites:
        h, w = reference_latent
        f = s.downscale
        while f > 1:
            h, w, f = -(-h // 2), -(-w // 2), f // 2
        out[s.key] = (2 if s.downscale == finest else 1, (h, w))
    return out


def apply_inv_adapter(model, features: InvFeatures, adapter=None, weight: float = 0.8, self_attention: bool = True,
                      cross_attention: bool = True, start_percent: float = 0.0, end_percent: float = 1.0,
                      mask=None, apply_to: str = "all", combine: str = "concat", speed: str = "exact"):
    """A clone of model with EAA contributions on every transformer block.

    adapter: an EmbeddedAttentionAdapter (trained mode) or None (training-free: self side with the layer's own
    to_k/to_v). combine: how several reference photos are combined (COMBINE_MODES). speed: "exact" (the paper's
    formula) or "fast" (reference tokens pooled 2 x 2 at the largest-grid blocks, self side). Raises ValueError in
    plain words if the features or adapter do not belong to this model.
    """
    from ..weights.eaa import check_eaa_for_model, check_eaa_for_reference
    import comfy.patcher_extension

    if not isinstance(features, InvFeatures):
        raise ValueError("inv_features must come from Inv-Adapter Extract or Load Inv-Adapter Features")
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)} (got {combine!r})")
    if speed not in SPEEDS:
        raise ValueError(f"speed must be one of {', '.join(SPEEDS)} (got {speed!r})")
    if weight == 0.0 or not (self_attention or cross_attention):
        return model  # nothing to register: the model that came in (docs/stacking.md)
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
    pooling = fast_pooling(layout, features.reference_latent) if speed == "fast" else {}
    plan = []  # (site, block key, K' projection, V' projection, aggregation, adapter patcher, pool, grid)
    adapter_patcher = eaa_patcher(adapter) if adapter is not None else None
    for site in layout.sites:
        layer = adapter.layer(site.key) if adapter is not None else None
        if self_attention:
            if "self" in sides:
                pk, pv, owner = layer.self_k, layer.self_v, adapter_patcher
            else:
                attn1 = transformer_block(model, site).attn1
                pk, pv, owner = attn1.to_k, attn1.to_v, None
            pool, grid = pooling.get(site.key, (1, None))
            plan.append(("attn1", site.key, pk, pv, None, owner, pool, grid))
        if cross_attention and "cross" in sides:
            plan.append(("attn2", site.key, layer.cross_k, layer.cross_v, layer.aggregate_tokens, adapter_patcher, 1,
                         None))
    if not plan:
        return model  # nothing to register: the model that came in
    m = model.clone()
    provider = ReferenceProvider(features, is_needed=lambda s: weight != 0 and low <= s <= high,
                                 keys={(site, key) for site, key, *_ in plan})
    window = dict(weight=weight, sigma_start=high, sigma_end=low, mask=mask, apply_to=apply_to)
    for site, key, pk, pv, aggregate, owner, pool, grid in plan:
        add_contribution(m, site, key, EAAContribution(provider, site, key, pk, pv, aggregate=aggregate,
                                                       adapter_patcher=owner, combine=combine, pool=pool, grid=grid,
                                                       **window))
    key = f"{WRAPPER_KEY}_{provider.uid}"
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, ReferenceWrapper(provider))
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_PRE_RUN, key, provider.reset)
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, key, provider.reset)
    return m
