"""Inv-Adapter's reference branch: the DDIM-inversion trajectory of the reference photos and their attention inputs.

docs/methods/inv-adapter.md: at every generation step the frozen UNet runs on each photo's inversion latent
Z^p(sigma) with the caption C_inv (and, for SDXL, the reference branch's own `y`), and the normalised hidden
states entering each block's self- and cross-attention (F_s^p = norm1(x), F_c^p = norm2(x): what the host passes
to attn1_patch / attn2_patch) are injected into the generation. InvFeatures keeps the trajectory (and, when stored,
those features at grid points); ReferenceProvider gives the features at whatever sigma the sampler asks for:
  - a grid point whose stored features hold every block the Apply needs: the stored ones, moved to the device
    and the UNet's compute dtype once per step;
  - any other sigma (or a point the memory budget left out): the latents Z^p(sigma) from the trajectory (an Euler
    step from the grid point below, which is exactly the inversion's own step, see InvFeatures.latent_at) run
    through the reference branch live, all photos in one batch.
The features of the last sigma are kept, so separate cond/uncond passes share one lookup or live pass.
"""
import logging
import math
import uuid

import torch

from ..weights.inv_features_file import InvFeatures

log = logging.getLogger("likeness")

FEATURES_KEY = "likeness_reference_features"  # transformer_options: {provider uid: {(site, key): tensor}}


def cond_rows(n: torch.Tensor, extra_options: dict, rows: int) -> torch.Tensor:
    """The rows of the conditional chunk. The reference branch runs at CFG 1, where the host evaluates the caption
    only; a host with disable_cfg1_optimization also batches an unconditional copy, which is dropped here."""
    order = list(extra_options.get("cond_or_uncond") or [0])
    if len(order) > 1 and n.shape[0] == rows * len(order) and 0 in order:
        start = order.index(0) * rows
        return n[start:start + rows]
    return n[:rows]


class FeatureCapture:
    """attn1_patch / attn2_patch that records the hidden states a block feeds its attention, by block key: the
    first `rows` rows of the conditional chunk (one per reference photo), optionally moved and cast for storage."""

    def __init__(self, site: str, store: dict, dtype=None, device=None, rows: int = 1):
        self.site, self.store, self.dtype, self.device, self.rows = site, store, dtype, device, rows

    def __call__(self, n, context, value, extra_options):
        block = extra_options.get("block")
        if block is not None:
            key = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
            kept = cond_rows(n, extra_options, self.rows).detach()
            self.store[(self.site, key)] = kept.to(device=self.device or n.device, dtype=self.dtype or n.dtype)
        return n, context, value

    def __deepcopy__(self, memo):
        return self


def capture_patches(store: dict, rows: int = 1, sites=("attn1", "attn2")) -> dict:
    return {f"{site}_patch": [FeatureCapture(site, store, rows=rows)] for site in sites}


def reference_y(base_model, pooled, size: int):
    """The vector conditioning of the reference branch: for SDXL-style models, the pooled caption output with the
    reference's own size (size x size, uncropped, as CLIPTextEncodeSDXL writes it); None for models without one."""
    if pooled is None:
        return None
    y = base_model.encode_adm(pooled_output=pooled, width=size, height=size, crop_w=0, crop_h=0, target_width=size,
                              target_height=size, device=pooled.device)
    return None if y is None else y.float().cpu()


def run_reference_branch(base_model, latents, sigma: float, caption, y=None) -> dict:
    """One pass of the frozen UNet (weight patches such as LoRA included, no attention patches, no wrappers) on the
    reference latents (N, C, h, w); returns {(site, key): (N, tokens, width)}."""
    store = {}
    n = latents.shape[0]
    options = {"patches": capture_patches(store, rows=n)}
    t = torch.full((n,), float(sigma), device=latents.device, dtype=torch.float32)
    kwargs = {} if y is None else {"y": y.to(latents.device).expand(n, -1)}
    context = caption.to(latents.device).expand(n, -1, -1)
    base_model.apply_model(latents, t, c_crossattn=context, transformer_options=options, **kwargs)
    return store


def compute_dtype(base_model):
    """The dtype the UNet's attention computes in (its manual-cast dtype, else its weight dtype)."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


class ReferenceProvider:
    """Reference features at the sampler's sigma, for one Inv-Adapter Apply. Keeps the last sigma's features.

    keys: the (site, key) pairs the Apply reads; stored features that lack one of them are not used (a live pass
    gives them all)."""

    def __init__(self, features: InvFeatures, is_needed=None, keys=None):
        self.features = features
        self.uid = uuid.uuid4().hex
        self.is_needed = is_needed or (lambda sigma: True)
        self.keys = frozenset(keys) if keys is not None else None
        self._last = None  # (sigma, device, dtype, {(site, key): tensor})
        self.kv_cache = {}  # the contributions' K'/V' of the current step, for a host that splits cond and uncond
        self.live_passes = 0  # how many reference passes ran (reported by the benchmark and tests)

    def reset(self, *args, **kwargs):
        self._last = None
        self.kv_cache.clear()

    def __deepcopy__(self, memo):
        return self

    def features_at(self, base_model, sigma: float, device, dtype=None, fallback_y=None) -> dict:
        """fallback_y: the vector conditioning a live pass uses when the features carry none (files written before
        the reference branch kept its own `y`)."""
        dtype = dtype or compute_dtype(base_model)
        last = self._last
        if last is not None and last[1] == device and last[2] == dtype and \
                math.isclose(last[0], sigma, rel_tol=1e-6, abs_tol=1e-9):
            return last[3]
        f = self.features
        stored = f.stored_at(sigma, self.keys)
        if stored is not None:
            keys = self.keys if self.keys is not None else stored.keys()
            feats = {key: stored[key].to(device=device, dtype=dtype, non_blocking=True) for key in keys}
        else:
            latents = f.latent_at(sigma).to(device)
            live = run_reference_branch(base_model, latents, sigma, f.caption, y=f.y if f.y is not None else fallback_y)
            feats = {key: t.to(dtype) for key, t in live.items()}
            self.live_passes += 1
        self._last = (sigma, device, dtype, feats)
        self.kv_cache.clear()
        return feats

    def lookup(self, extra_options: dict, site: str, key) -> torch.Tensor:
        per_provider = extra_options.get(FEATURES_KEY, {}).get(self.uid)
        if per_provider is None:
            # A call outside a sampler (no wrapper ran): stored features at a grid sigma still work.
            from .dispatcher import current_sigma
            sigma = current_sigma(extra_options)
            stored = None if sigma is None else self.features.stored_at(sigma, [(site, tuple(key))])
            if stored is not None:
                return stored[(site, tuple(key))]
            raise RuntimeError(
                "Inv-Adapter has no reference features for this model call: the patched model must be run by a "
                "sampler (KSampler, SamplerCustom ...), which lets Inv-Adapter run its reference branch")
        t = per_provider.get((site, tuple(key)))
        if t is None:
            raise RuntimeError(f"Inv-Adapter: the reference branch produced no features for {site} {key}")
        return t


class ReferenceWrapper:
    """APPLY_MODEL wrapper: before each model call, get the reference features for its sigma and hand them to the
    attention contributions through transformer_options."""

    def __init__(self, provider: ReferenceProvider):
        self.provider = provider

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma = float(t.reshape(-1)[0])
        if not self.provider.is_needed(sigma):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        y = kwargs.get("y")
        feats = self.provider.features_at(executor.class_obj, sigma, x.device,
                                          fallback_y=y[:1] if torch.is_tensor(y) else None)
        options = {**transformer_options,
                   FEATURES_KEY: {**transformer_options.get(FEATURES_KEY, {}), self.provider.uid: feats}}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
