"""Inv-Adapter's reference branch: the DDIM-inversion trajectory of the reference and its attention inputs.

docs/methods/inv-adapter.md: at every generation step the frozen UNet runs on the reference's inversion latent Z^p(sigma)
with the caption C_inv, and the normalised hidden states entering each block's self- and cross-attention
(F_s^p = norm1(x), F_c^p = norm2(x): what the host passes to attn1_patch / attn2_patch) are injected into the
generation. InvFeatures keeps the trajectory (and, in cache mode, those features at every grid point);
ReferenceProvider gives the features at whatever sigma the sampler asks for:
  - a grid point with cached features: the stored features (moved to the device once per step);
  - any other sigma: the latent Z^p(sigma) from the trajectory (an Euler step from the grid point below, which
    is exactly the inversion's own step, see InvFeatures.latent_at) run through the reference branch live.
The live pass runs once per sigma and is shared by separate cond/uncond passes.
"""
import logging
import math
import uuid

import torch

from ..weights.inv_features_file import InvFeatures

log = logging.getLogger("likeness")

FEATURES_KEY = "likeness_reference_features"  # transformer_options: {provider uid: {(site, key): tensor}}


class FeatureCapture:
    """attn1_patch / attn2_patch that records the hidden states a block feeds its attention, by block key.
    The reference branch is one image: only the first row is kept (a host that also runs an uncond pass at
    CFG 1, with disable_cfg1_optimization, batches the same caption twice)."""

    def __init__(self, site: str, store: dict, dtype=None, device=None):
        self.site, self.store, self.dtype, self.device = site, store, dtype, device

    def __call__(self, n, context, value, extra_options):
        block = extra_options.get("block")
        if block is not None:
            key = (block[0], int(block[1]), int(extra_options.get("block_index", 0)))
            self.store[(self.site, key)] = n[:1].detach().to(device=self.device or n.device, dtype=self.dtype or n.dtype)
        return n, context, value

    def __deepcopy__(self, memo):
        return self


def capture_patches(store: dict, dtype=None, device=None) -> dict:
    return {"attn1_patch": [FeatureCapture("attn1", store, dtype, device)],
            "attn2_patch": [FeatureCapture("attn2", store, dtype, device)]}


def run_reference_branch(base_model, latent, sigma: float, caption, y=None) -> dict:
    """One pass of the frozen UNet (weight patches such as LoRA included, no attention patches, no wrappers) on
    the reference latent; returns {(site, key): (1, tokens, width)}."""
    store = {}
    options = {"patches": capture_patches(store)}
    t = torch.full((latent.shape[0],), float(sigma), device=latent.device, dtype=torch.float32)
    kwargs = {} if y is None else {"y": y}
    base_model.apply_model(latent, t, c_crossattn=caption.to(latent.device), transformer_options=options, **kwargs)
    return store


class ReferenceProvider:
    """Reference features at the sampler's sigma, for one Inv-Adapter Apply. Keeps the last sigma's features."""

    def __init__(self, features: InvFeatures, is_needed=None):
        self.features = features
        self.uid = uuid.uuid4().hex
        self.is_needed = is_needed or (lambda sigma: True)
        self._last = None  # (sigma, device, {(site, key): tensor})
        self.live_passes = 0  # how many reference passes ran (reported by the benchmark and tests)

    def reset(self, *args, **kwargs):
        self._last = None

    def __deepcopy__(self, memo):
        return self

    def features_at(self, base_model, sigma: float, device, y=None) -> dict:
        last = self._last
        if last is not None and last[1] == device and math.isclose(last[0], sigma, rel_tol=1e-6, abs_tol=1e-9):
            return last[2]
        f = self.features
        k = f.point_index(sigma)
        if f.features and k is not None and k in f.features:
            feats = {key: t.to(device, non_blocking=True) for key, t in f.features[k].items()}
        else:
            latent = f.latent_at(sigma).to(device)
            feats = run_reference_branch(base_model, latent, sigma, f.caption, y=y)
            self.live_passes += 1
        self._last = (sigma, device, feats)
        return feats

    def lookup(self, extra_options: dict, site: str, key) -> torch.Tensor:
        per_provider = extra_options.get(FEATURES_KEY, {}).get(self.uid)
        if per_provider is None:
            # A call outside a sampler (no wrapper ran): cached features at a grid sigma still work.
            from .dispatcher import current_sigma
            sigma = current_sigma(extra_options)
            k = None if sigma is None else self.features.point_index(sigma)
            if self.features.features and k in self.features.features:
                return self.features.features[k][(site, tuple(key))]
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
        y = y[:1] if torch.is_tensor(y) else None  # class/ADM models: the reference borrows the first row's vector
        feats = self.provider.features_at(executor.class_obj, sigma, x.device, y=y)
        options = {**transformer_options,
                   FEATURES_KEY: {**transformer_options.get(FEATURES_KEY, {}), self.provider.uid: feats}}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
