"""Fusion Sampling algebra in ComfyUI's sigma (k-diffusion) parameterization.

ProFusion (Zhou et al. 2023, Alg. 1, eqs. 3-11) writes one fusion update in DDIM (alpha-bar) form. With
x = x0 + sigma * eps and the denoised estimate x0_hat, the whole update collapses to

    x_tilde <- x0_hat + sigma * [(1 - rho) * eps_hat + sqrt(rho * (2 - rho)) * z],   rho = eta^2 (1 - sigma_next^2 / sigma^2)

which is eq. 11 divided by sqrt(alpha_bar_t) (docs/methods/fusion-sampling.md). The two-stage form below (an ancestral step
down to sigma_next, then a draw from the posterior back up to sigma) is the same distribution; the tests pin the
two against each other and against eq. 11 written in alpha-bar form.

Pure torch: no ComfyUI import, so these functions serve the sampler, the trainers and the tests alike.
"""
import math

import torch


def fusion_rho(sigma: float, sigma_next: float, eta: float) -> float:
    """rho = varsigma^2 / (1 - alpha_bar_prev) = eta^2 (1 - sigma_next^2 / sigma^2), clamped to [0, 1].

    At the last step (sigma_next = 0) this gives eta^2: the original DDIM instead used alpha_bar_0 there.
    """
    if sigma <= 0:
        raise ValueError("fusion_rho needs sigma > 0")
    rho = eta * eta * (1.0 - (sigma_next * sigma_next) / (sigma * sigma))
    return min(max(rho, 0.0), 1.0)


def fusion_renoise(x0: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_next: float, eta: float,
                   noise: torch.Tensor) -> torch.Tensor:
    """Closed form of one fusion update: the new x_tilde at the same sigma (docs/methods/fusion-sampling.md)."""
    rho = fusion_rho(sigma, sigma_next, eta)
    return x0 + sigma * ((1.0 - rho) * eps + math.sqrt(rho * (2.0 - rho)) * noise)


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step, as k-diffusion defines them; sigma_up <= sigma_next."""
    if sigma_next <= 0:
        return 0.0, 0.0
    up = eta * sigma_next * math.sqrt(max(sigma * sigma - sigma_next * sigma_next, 0.0)) / sigma
    up = min(up, sigma_next)
    down = math.sqrt(max(sigma_next * sigma_next - up * up, 0.0))
    return down, up


def ancestral_step(x0: torch.Tensor, eps: torch.Tensor, sigma: float, sigma_next: float, eta: float,
                   noise: torch.Tensor) -> torch.Tensor:
    """Stage one of Alg. 1: x_prev = x0 + sigma_down * eps + sigma_up * z (DDIM with stochasticity eta)."""
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    out = x0 + down * eps
    if up > 0:
        out = out + up * noise
    return out


def posterior_renoise(x0: torch.Tensor, x_prev: torch.Tensor, sigma: float, sigma_next: float, eta: float,
                      noise: torch.Tensor) -> torch.Tensor:
    """Stage two of Alg. 1: draw x_t ~ q(x_t | x_prev, x0) back at sigma; needs sigma_next > 0."""
    if sigma_next <= 0:
        raise ValueError("the two-stage form needs sigma_next > 0; use fusion_renoise at the last step")
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    s2 = sigma_next * sigma_next
    return x0 + (sigma * down / s2) * (x_prev - x0) + (sigma * up / sigma_next) * noise


def two_stage_noise_weights(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Weights (a, b) of z1 and z2 in the two-stage result, so that a*z1 + b*z2 is its whole noise term."""
    down, up = ancestral_sigmas(sigma, sigma_next, eta)
    return sigma * down * up / (sigma_next * sigma_next), sigma * up / sigma_next
