"""Deterministic DDIM inversion on the host's own sigma grid (docs/methods/inv-adapter.md; the host's comfy/samplers.py).

A deterministic DDIM step is an Euler step in sigma, so inversion walks the sampler's grid upwards:
    x <- x + eps_hat(x, sigma_eval) * (sigma_next - sigma),   eps_hat = (x - D(x, sigma_eval)) / sigma_eval
with CFG 1 (the conditional prediction only). The clean latent sits at sigma = 0 where eps is undefined, so the
first step evaluates the model at the first non-zero sigma (as diffusers' inverse DDIM starts at its first
timestep). Running the host's deterministic Euler on the same grid then retraces the path; the error of using
eps at the start of each step shrinks as the number of steps grows.

The loop runs as a SAMPLER function under the host's own guider, so model loading, ControlNet, hooks, wrappers,
the progress bar and interruption all behave as in any sampling run.
"""
import torch
from tqdm.auto import trange

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils

from .sigmas import schedule_sigmas


@torch.no_grad()
def sample_inversion(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Sampler function over an ascending sigma grid; returns the latent at sigmas[-1]."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        comfy.model_management.throw_exception_if_processing_interrupted()
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_eval = sigma if sigma > 0 else sigma_next
        denoised = model(x, sigma_eval * s_in, **extra_args)
        eps = (x - denoised) / sigma_eval
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_eval, "denoised": denoised})
        x = x + eps * (sigma_next - sigma)
    return x


def inversion_sigmas(model_patcher, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """The sampler's descending grid for (scheduler, steps, denoise), flipped to run upwards from 0."""
    return schedule_sigmas(model_patcher, scheduler, steps, denoise).flip(0)


def ddim_invert(model_patcher, conditioning, latent: dict, steps: int, scheduler: str = "ddim_uniform",
                denoise: float = 1.0, callback=None, disable_pbar: bool = True):
    """Invert a LATENT dict; returns (inverted LATENT dict, the descending sigmas a sampler should use)."""
    if conditioning is None or len(conditioning) == 0:
        raise ValueError("DDIM inversion needs a conditioning (the caption of the image; an empty prompt works)")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise ValueError(f"DDIM inversion expects an image latent (batch, channels, height, width); got shape {tuple(samples.shape)}")
    up = inversion_sigmas(model_patcher, scheduler, steps, denoise)
    samples = comfy.sample.fix_empty_latent_channels(model_patcher, samples)
    zeros = torch.zeros_like(samples)
    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(conditioning, conditioning)
    guider.set_cfg(1.0)  # conditional prediction only; the host skips the uncond pass at cfg 1
    sampler = comfy.samplers.KSAMPLER(sample_inversion)
    out = guider.sample(zeros, samples, sampler, up, denoise_mask=None, callback=callback,
                        disable_pbar=disable_pbar, seed=0)
    result = {k: v for k, v in latent.items() if k != "noise_mask"}
    result["samples"] = out.to(comfy.model_management.intermediate_device())
    return result, up.flip(0)


# --- Recording the whole trajectory (Inv-Adapter's reference branch, docs/methods/inv-adapter.md) ---------------------

class InversionTrajectory:
    """Every point of an inversion: sigmas ascending (T+1,), latents (T+1, B, C, h, w) in the model's latent space
    (process_latent_in applied) and eps (T+1, B, C, h, w), the noise estimate the inversion stepped with from each
    point (point 0 uses the model at sigmas[1], as the inversion does; the top point is evaluated once more so a
    sampler starting there has its eps too). latents[i+1] = latents[i] + (sigmas[i+1] - sigmas[i]) * eps[i]."""

    def __init__(self, sigmas, latents, eps):
        self.sigmas, self.latents, self.eps = sigmas, latents, eps


def sample_inversion_recorded(model, x, sigmas, extra_args=None, callback=None, disable=None, record=None):
    """sample_inversion, then one more model evaluation at the top of the grid. record(i, x, sigma_eval, denoised)
    runs after every evaluation (i = 0..len(sigmas)-1)."""
    extra_args = {} if extra_args is None else extra_args

    def on_step(d):
        if record is not None:
            record(d["i"], d["x"], d["sigma_hat"], d["denoised"])
        if callback is not None:
            callback(d)

    x = sample_inversion(model, x, sigmas, extra_args, on_step, disable)
    if record is not None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        top = sigmas[-1]
        denoised = model(x, top * x.new_ones([x.shape[0]]), **extra_args)
        record(len(sigmas) - 1, x, top, denoised)
    return x


def ddim_invert_trajectory(model_patcher, conditioning, latent: dict, steps: int, scheduler: str = "ddim_uniform",
                           on_point=None, callback=None, disable_pbar: bool = True) -> InversionTrajectory:
    """Full DDIM inversion (denoise 1, CFG 1) of a LATENT dict, recording every point. on_point(i, sigma, latent,
    eps) is called right after the model evaluation of point i, so patches on the model can be read out there."""
    if conditioning is None or len(conditioning) == 0:
        raise ValueError("DDIM inversion needs a conditioning (the caption of the image; an empty prompt works)")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise ValueError(f"DDIM inversion expects an image latent (batch, channels, height, width); got shape {tuple(samples.shape)}")
    up = inversion_sigmas(model_patcher, scheduler, steps, 1.0)
    samples = comfy.sample.fix_empty_latent_channels(model_patcher, samples)
    latents, eps = [None] * len(up), [None] * len(up)

    def record(i, x, sigma_eval, denoised):
        latents[i] = x.detach().float().cpu()
        eps[i] = ((x - denoised) / sigma_eval).detach().float().cpu()
        if on_point is not None:
            on_point(i, float(up[i]), latents[i], eps[i])

    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(conditioning, conditioning)
    guider.set_cfg(1.0)
    sampler = comfy.samplers.KSAMPLER(sample_inversion_recorded, extra_options={"record": record})
    guider.sample(torch.zeros_like(samples), samples, sampler, up, denoise_mask=None, callback=callback,
                  disable_pbar=disable_pbar, seed=0)
    return InversionTrajectory(up.clone(), torch.stack(latents), torch.stack(eps))
