"""The Fusion Sampling loop (ProFusion Alg. 1 in sigma form) as a host SAMPLER function.

Per step at sigma -> sigma_next, inside the chosen sigma window:
  fusion stage, m times:  x0 = fusion-guided denoise of x_tilde; x_tilde <- closed-form re-noise (fusion_math)
  refinement stage:       x0 = refinement-guided denoise of x_tilde; one step of the refinement sampler
Outside the window only the refinement stage runs. With refinement off, the last fusion repeat ends in the
ancestral down-step instead of the re-noise (Alg. 1, line 11).

With `profusion_ddim` the sigmas are ProFusion's official DDIM grid (samplers/profusion_schedule.py): the run
starts from pure noise when the grid is whole, and the result is the latent at the grid's last level in VP
scaling, as the official pipeline returns it.
"""
import torch
from tqdm.auto import trange

import comfy.model_management
import comfy.samplers
from comfy.k_diffusion.sampling import default_noise_sampler

from .fusion_guider import FUSION, STAGE_KEY, FusionGuider
from .fusion_math import ancestral_step, fusion_renoise
from .profusion_schedule import is_whole_official_grid, vp_scale
from .refine_steps import REFINE_SAMPLERS, RefineStepper, check_refine_eta
from .sigmas import percent_sigma_window

NO_GUIDER = ("the Fusion Sampler needs the Likeness Fusion Guider: connect a 'Fusion Guider (Likeness)' to the "
             "guider input of SamplerCustomAdvanced, or use 'KSampler (Fusion)'")


def check_fusion_options(m: int, eta: float, refine: bool, refine_sampler: str, start_percent: float,
                         end_percent: float, refine_eta: float = 0.0):
    if not 0 <= m <= 10:
        raise ValueError(f"fusion_steps (m) must be between 0 and 10 (got {m})")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be between 0 and 1 (got {eta})")
    if not refine and m < 1:
        raise ValueError("with refinement off, fusion_steps (m) must be at least 1: nothing would advance the sample")
    if refine_sampler not in REFINE_SAMPLERS:
        raise ValueError(f"refinement sampler '{refine_sampler}' is not supported; choose one of {', '.join(REFINE_SAMPLERS)}")
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}); both in [0, 1]")
    check_refine_eta(refine_sampler, refine_eta)


class FusionKSampler(comfy.samplers.KSAMPLER):
    """The host's KSAMPLER, except that on ProFusion's whole DDIM grid the start is pure noise (x_T = n in VP
    form, the official pipeline's start) rather than sigma_T * n."""

    def max_denoise(self, model_wrap, sigmas):
        if self.extra_options.get("profusion_ddim"):
            return is_whole_official_grid(model_wrap.inner_model.model_sampling, sigmas)
        return super().max_denoise(model_wrap, sigmas)


def fusion_ksampler(m=1, eta=1.0, refine=True, refine_sampler="euler", start_percent=0.0, end_percent=1.0,
                    refine_eta=0.0, profusion_ddim=False, noise_sampler=None):
    check_fusion_options(m, eta, refine, refine_sampler, start_percent, end_percent, refine_eta)
    options = {"m": m, "eta": eta, "refine": refine, "refine_sampler": refine_sampler, "start_percent": start_percent,
               "end_percent": end_percent, "refine_eta": refine_eta, "profusion_ddim": bool(profusion_ddim)}
    if noise_sampler is not None:
        options["noise_sampler"] = noise_sampler
    return FusionKSampler(sample_fusion, extra_options=options)


@torch.no_grad()
def sample_fusion(model, x, sigmas, extra_args=None, callback=None, disable=None, m=1, eta=1.0, refine=True,
                  refine_sampler="euler", start_percent=0.0, end_percent=1.0, refine_eta=0.0, profusion_ddim=False,
                  noise_sampler=None):
    """k-diffusion-style sampler function; `model` is the host's inpainting wrapper around a FusionGuider."""
    guider = getattr(model, "inner_model", None)
    if not isinstance(guider, FusionGuider):
        raise ValueError(NO_GUIDER)
    extra_args = {} if extra_args is None else extra_args
    fusion_args = {**extra_args, "model_options": {**extra_args.get("model_options", {}), STAGE_KEY: FUSION}}
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x, seed=extra_args.get("seed"))
    sigma_high, sigma_low = percent_sigma_window(guider.model_patcher, start_percent, end_percent)
    stepper = RefineStepper(refine_sampler, refine_eta)
    s_in = x.new_ones([x.shape[0]])

    for i in trange(len(sigmas) - 1, disable=disable):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x_tilde, denoised, x_next = x, None, None
        fuse = m > 0 and sigma_low <= sigma <= sigma_high
        for r in range(m if fuse else 0):
            comfy.model_management.throw_exception_if_processing_interrupted()
            denoised = model(x_tilde, sigmas[i] * s_in, **fusion_args)
            eps = (x_tilde - denoised) / sigma
            if r == m - 1 and not refine:
                x_next = ancestral_step(denoised, eps, sigma, sigma_next, eta, noise_sampler(sigmas[i], sigmas[i + 1]))
            else:
                x_tilde = fusion_renoise(denoised, eps, sigma, sigma_next, eta, noise_sampler(sigmas[i], sigmas[i + 1]))
        if x_next is None:
            denoised = model(x_tilde, sigmas[i] * s_in, **extra_args)
            x_next = stepper.step(x_tilde, denoised, sigma, sigma_next,
                                  evaluate=lambda y, s: model(y, s * s_in, **extra_args), noise_sampler=noise_sampler)
        if callback is not None:
            callback({"x": x_tilde, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x_next
    if profusion_ddim:
        x = x * vp_scale(float(sigmas[-1]))   # the official pipeline returns x_VP at its last level (alpha_bar_0)
    return x
