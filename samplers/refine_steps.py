"""One-step updates for the refinement stage of Fusion Sampling.

ProFusion refines with deterministic DDIM (eta = 0), which in sigma form is exactly an Euler step (docs/methods/fusion-sampling.md). Because the fusion stage replaces x by x_tilde at every step, only samplers whose state is the current x
(plus, for DPM++ 2M, the previous denoised estimate) make sense here; each follows the formulas of k-diffusion's
sampler of the same name so that, with fusion off, the result matches the host's sampler. The euler step takes
DDIM's stochasticity eta (ProFusion's pipeline `eta`, 0 by default): eta = 0 is the plain Euler step, eta > 0 the
ancestral step with that eta, which is DDIM's step with sigma_t = eta * sqrt(beta_tilde) in sigma form
(docs/methods/fusion-sampling.md).
"""
import torch

from .fusion_math import ancestral_sigmas

REFINE_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m")


def check_refine_eta(name: str, eta: float):
    if name not in REFINE_SAMPLERS:
        raise ValueError(f"refinement sampler '{name}' is not supported; choose one of {', '.join(REFINE_SAMPLERS)}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"refine_eta must be between 0 and 1 (got {eta})")
    if eta > 0.0 and name != "euler":
        raise ValueError(f"refine_eta is the eta of the DDIM refinement step: use it with the euler refinement sampler "
                         f"(got {name}; euler_ancestral is eta 1, heun and dpmpp_2m are deterministic)")


class RefineStepper:
    """Advances x_tilde (at sigma) to sigma_next given the refinement-guided denoised estimate."""

    def __init__(self, name: str, eta: float = 0.0):
        check_refine_eta(name, eta)
        self.name = name
        self.eta = 1.0 if name == "euler_ancestral" else float(eta)
        self._old_denoised = None
        self._old_sigma = None

    def step(self, x, denoised, sigma: float, sigma_next: float, evaluate, noise_sampler):
        """evaluate(x, sigma) -> denoised at another point (Heun's corrector); noise_sampler(s, s_next) -> noise."""
        if self.name == "euler" and self.eta == 0.0:
            out = x + (x - denoised) / sigma * (sigma_next - sigma)
        elif self.name in ("euler", "euler_ancestral"):
            down, up = ancestral_sigmas(sigma, sigma_next, self.eta)
            out = x + (x - denoised) / sigma * (down - sigma)
            if sigma_next > 0 and up > 0:
                out = out + noise_sampler(sigma, sigma_next) * up
        elif self.name == "heun":
            d = (x - denoised) / sigma
            dt = sigma_next - sigma
            out = x + d * dt
            if sigma_next > 0:
                d2 = (out - evaluate(out, sigma_next)) / sigma_next
                out = x + (d + d2) / 2 * dt
        else:
            out = self._dpmpp_2m(x, denoised, sigma, sigma_next)
        self._old_denoised, self._old_sigma = denoised, sigma
        return out

    def _dpmpp_2m(self, x, denoised, sigma, sigma_next):
        if sigma_next == 0:
            return denoised
        t, t_next = -torch.tensor(sigma).log(), -torch.tensor(sigma_next).log()
        h = t_next - t
        if self._old_denoised is not None:
            r = (t - (-torch.tensor(self._old_sigma).log())) / h
            denoised = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self._old_denoised
        return (sigma_next / sigma) * x - torch.expm1(-h).item() * denoised
