"""The "ProFusion DDIM" schedule: the timestep grid, starting noise and last step of ProFusion's official pipeline
(its DDIM scheduler with Stable Diffusion 2's settings), in the host's sigma form (docs/methods/fusion-sampling.md).

Official grid for N steps over T = 1000 training steps (DDIM with steps_offset 1, set_alpha_to_one False):
    ratio = T // N,  t_i = (N - 1 - i) * ratio + 1  (i = 0 .. N-1),  t_prev = t - ratio,
    alpha_bar_prev = alpha_bar_0 where t_prev < 0 (the last step ends at alpha_bar_0, not at alpha_bar = 1).
For 30 steps this is 958, 925, ..., 1 (the host's ddim_uniform gives 31 sigmas from t = 999), for 50 steps
981, 961, ..., 1. As sigmas: sigma(t_i) for every step, then sigma(alpha_bar_0) = the model's sigma_min > 0
instead of 0.

`st` (the pipeline's denoising start) keeps the grid steps with t <= st. With the whole grid the sampler starts
from x_T = n in VP form (x = sqrt(1 + sigma_T^2) * n here), as the official pipeline does; when st or denoise cut
the grid, the latent is noised to the first kept level (img2img). At the end the sampler hands back the latent
at alpha_bar_0 in VP scaling, x / sqrt(1 + sigma_0^2), which is what the official pipeline decodes.
"""
import math

import torch

PROFUSION_DDIM = "profusion_ddim"
TRAIN_STEPS = 1000
STEPS_OFFSET = 1
FULL_ST = 1000


def official_timesteps(steps: int, train_steps: int = TRAIN_STEPS, offset: int = STEPS_OFFSET) -> list[int]:
    """The official DDIM grid, descending: (N - 1 - i) * (T // N) + offset."""
    if not 1 <= steps <= train_steps:
        raise ValueError(f"steps must be between 1 and {train_steps} for the ProFusion DDIM schedule (got {steps})")
    ratio = train_steps // steps
    return [(steps - 1 - i) * ratio + offset for i in range(steps)]


def check_discrete(model_sampling):
    """The schedule is defined on the DDPM training grid: refuse models sampled in continuous time."""
    import comfy.model_sampling as ms_mod

    sigmas = getattr(model_sampling, "sigmas", None)
    if (not isinstance(model_sampling, ms_mod.ModelSamplingDiscrete)
            or isinstance(model_sampling, ms_mod.ModelSamplingDiscreteEDM)
            or isinstance(model_sampling, ms_mod.CONST) or sigmas is None):
        raise ValueError("the ProFusion DDIM schedule needs a model trained on the 1000-step DDPM grid "
                         "(SD1.x, SD2.x, SDXL, eps or v prediction); use another scheduler with this model")
    return sigmas


def kept_timesteps(steps: int, st: int = FULL_ST, denoise: float = 1.0, train_steps: int = TRAIN_STEPS) -> tuple[list[int], int]:
    """(timesteps run, the grid's step ratio). denoise < 1 keeps the last `steps` of a longer grid (KSampler's
    meaning of denoise); st keeps those with t <= st."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1] (got {denoise})")
    if not 1 <= st <= FULL_ST:
        raise ValueError(f"st must be between 1 and {FULL_ST} (got {st}); {FULL_ST} runs the whole grid")
    total = steps if denoise > 0.9999 else int(steps / denoise)
    if total > train_steps:
        raise ValueError(f"steps / denoise = {total} exceeds the {train_steps} training timesteps")
    grid = official_timesteps(total, train_steps)
    ratio = train_steps // total
    kept = [t for t in grid[-steps:] if t <= st]
    if not kept:
        raise ValueError(f"st = {st} is below every timestep of the {total}-step grid (the lowest is {grid[-1]}); "
                         "raise st")
    return kept, ratio


def profusion_ddim_sigmas(model_patcher, steps: int, st: int = FULL_ST, denoise: float = 1.0) -> torch.Tensor:
    """Descending sigmas of the official grid: sigma(t) for each step run, then the level the last step ends at
    (sigma(t_last - ratio), or sigma(alpha_bar_0) = sigma_min when that is below 0, as the official DDIM does)."""
    sigmas = check_discrete(model_patcher.get_model_object("model_sampling"))
    train_steps = len(sigmas)
    kept, ratio = kept_timesteps(steps, st, denoise, train_steps)
    last = kept[-1] - ratio
    ends = [int(t) for t in kept] + [max(last, 0)]
    return sigmas[torch.tensor(ends)].float().cpu()


def is_whole_official_grid(model_sampling, sigmas: torch.Tensor) -> bool:
    """True when `sigmas` are exactly the official grid for their step count (nothing cut by st or denoise): the
    run then starts from pure noise, x_T = n in VP form."""
    table = getattr(model_sampling, "sigmas", None)
    steps = len(sigmas) - 1
    if table is None or not 1 <= steps <= len(table):
        return False
    grid = official_timesteps(steps, len(table))
    want = table[torch.tensor(grid + [max(grid[-1] - len(table) // steps, 0)])].float().cpu()
    return bool(torch.allclose(sigmas.float().cpu(), want, rtol=1e-5, atol=0.0))


def vp_scale(sigma: float) -> float:
    """sqrt(alpha_bar) at sigma: the factor from the host's x = x0 + sigma * eps to DDIM's x_VP."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)
