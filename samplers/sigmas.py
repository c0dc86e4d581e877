"""Sigma schedules exactly as the host's KSampler builds them (comfy.samplers.KSampler.set_steps)."""
import torch

import comfy.samplers


def schedule_sigmas(model_patcher, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    """Descending sigmas ending in 0, with KSampler's denoise semantics (the last `steps` of a longer schedule)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps})")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"unknown scheduler '{scheduler}'; choose one of {', '.join(comfy.samplers.SCHEDULER_NAMES)}")
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1] (got {denoise})")
    model_sampling = model_patcher.get_model_object("model_sampling")
    if denoise > 0.9999:
        return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, int(steps / denoise)).cpu()
    return sigmas[-(steps + 1):]


def percent_sigma_window(model_patcher, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_high, sigma_low) covering sampling progress start_percent..end_percent, as IPAdapter's start/end."""
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent}); both in [0, 1]")
    ms = model_patcher.get_model_object("model_sampling")
    high = float("inf") if start_percent <= 0.0 else float(ms.percent_to_sigma(start_percent))
    low = 0.0 if end_percent >= 1.0 else float(ms.percent_to_sigma(end_percent))
    return high, low


def start_at_timestep(model_patcher, sigmas: torch.Tensor, st: int) -> torch.Tensor:
    """Drop the leading steps whose timestep is above st (ProFusion's `st`: denoising starts at t <= st); the run
    then noises the latent to the first kept sigma, as img2img does. st = 1000 keeps every step."""
    if st >= 1000:
        return sigmas
    if st < 1:
        raise ValueError(f"st must be between 1 and 1000 (got {st})")
    ms = model_patcher.get_model_object("model_sampling")
    t = ms.timestep(sigmas[:-1].float()).float().reshape(-1)
    kept = (t <= st).nonzero()
    if kept.numel() == 0:
        raise ValueError(f"st = {st} is below every timestep of this schedule (the lowest is {float(t[-1]):.0f}); raise st")
    return sigmas[int(kept[0]):]
