"""Deterministic DDIM inversion on the host's own sigma grid (methods.md B.1; comfyui-host.md section 2).

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
