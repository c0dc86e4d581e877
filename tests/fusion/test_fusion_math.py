"""Fusion Sampling algebra (docs/methods/fusion-sampling.md) against independent forms: the two-stage ancestral + posterior
sampler and ProFusion's eq. 11 written in DDIM (alpha-bar) coordinates."""
import math

import pytest
import torch

# SD's scaled-linear schedule, written out here independently of the host.
BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0)


@pytest.fixture(scope="module")
def fm(pack):
    from comfyui_likeness.samplers import fusion_math
    return fusion_math


def eq11_vp(x_vp, eps, a_t, a_prev, eta, z):
    """ProFusion eq. 11 / its code, in VP coordinates (independent reference)."""
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    s = eta * math.sqrt(var)
    return (x_vp - eps * (s ** 2 * math.sqrt(1 - a_t)) / (1 - a_prev)
            + s * z * math.sqrt((1 - a_t) * (2 - 2 * a_prev - s ** 2)) / (1 - a_prev))


@pytest.mark.parametrize("t", [981, 781, 501, 201, 21])
@pytest.mark.parametrize("eta", [1.0, 0.5, 0.0])
def test_closed_form_equals_eq11(fm, t, eta):
    g = torch.Generator().manual_seed(t)
    a_t, a_prev = float(ALPHAS_CUMPROD[t]), float(ALPHAS_CUMPROD[t - 20])
    sigma, sigma_next = math.sqrt((1 - a_t) / a_t), math.sqrt((1 - a_prev) / a_prev)
    x0 = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    z = torch.randn(4, 8, 8, generator=g, dtype=torch.float64)
    x_kd = x0 + sigma * eps
    ours = fm.fusion_renoise(x0, eps, sigma, sigma_next, eta, z)
    reference = eq11_vp(x_kd * math.sqrt(a_t), eps, a_t, a_prev, eta, z) / math.sqrt(a_t)
    assert torch.allclose(ours, reference, atol=1e-10, rtol=0)


@pytest.mark.parametrize("eta", [1.0, 0.7, 0.3])
@pytest.mark.parametrize("sigmas", [(14.6, 9.0), (3.0, 2.2), (0.5, 0.03)])
def test_closed_form_equals_two_stage_form(fm, eta, sigmas):
    sigma, sigma_next = sigmas
    g = torch.Generator().manual_seed(1)
    x0, eps, z1, z2 = (torch.randn(3, 16, 16, generator=g, dtype=torch.float64) for _ in range(4))
    x_prev = fm.ancestral_step(x0, eps, sigma, sigma_next, eta, z1)
    two_stage = fm.posterior_renoise(x0, x_prev, sigma, sigma_next, eta, z2)
    # Same draw: the closed form's single noise is the normalised combination of z1 and z2.
    a, b = fm.two_stage_noise_weights(sigma, sigma_next, eta)
    z = (a * z1 + b * z2) / math.hypot(a, b)
    closed = fm.fusion_renoise(x0, eps, sigma, sigma_next, eta, z)
    assert torch.allclose(closed, two_stage, atol=1e-10, rtol=0)


def test_two_stage_distribution_matches_closed_form(fm):
    """Monte Carlo without the shared-draw trick: mean and std of the re-noised sample."""
    sigma, sigma_next, eta = 2.0, 1.2, 1.0
    n = 400_000
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.full((n,), 0.3, dtype=torch.float64), torch.full((n,), 0.7, dtype=torch.float64)
    x_prev = fm.ancestral_step(x0, eps, sigma, sigma_next, eta, torch.randn(n, generator=g, dtype=torch.float64))
    out = fm.posterior_renoise(x0, x_prev, sigma, sigma_next, eta, torch.randn(n, generator=g, dtype=torch.float64))
    rho = fm.fusion_rho(sigma, sigma_next, eta)
    assert abs(out.mean().item() - (0.3 + sigma * (1 - rho) * 0.7)) < 5e-3
    assert abs(out.std().item() - sigma * math.sqrt(rho * (2 - rho))) < 5e-3


def test_rho_zero_leaves_x_unchanged_and_rho_one_renoises_fully(fm):
    g = torch.Generator().manual_seed(5)
    x0, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma = 3.0
    x = x0 + sigma * eps
    assert fm.fusion_rho(sigma, 1.0, 0.0) == 0.0
    assert torch.allclose(fm.fusion_renoise(x0, eps, sigma, 1.0, 0.0, z), x, atol=1e-6)
    # rho = 1 (Remark 2 of the paper): eta = 1 at the last step, sigma_next = 0.
    assert fm.fusion_rho(sigma, 0.0, 1.0) == 1.0
    assert torch.allclose(fm.fusion_renoise(x0, eps, sigma, 0.0, 1.0, z), x0 + sigma * z, atol=1e-6)


def test_rho_is_clamped_and_last_step_gives_eta_squared(fm):
    assert fm.fusion_rho(1.0, 0.0, 0.5) == pytest.approx(0.25)
    assert 0.0 <= fm.fusion_rho(1.0, 2.0, 1.0) <= 1.0  # sigma_next > sigma never yields a negative rho
    with pytest.raises(ValueError):
        fm.fusion_rho(0.0, 0.0, 1.0)


def test_ancestral_sigmas_match_k_diffusion(fm):
    from comfy.k_diffusion.sampling import get_ancestral_step

    for s, sn, eta in [(14.6, 9.0, 1.0), (3.0, 2.2, 0.5), (0.5, 0.03, 1.0), (1.0, 0.0, 1.0)]:
        down, up = fm.ancestral_sigmas(s, sn, eta)
        ref_down, ref_up = get_ancestral_step(torch.tensor(s), torch.tensor(sn), eta)
        assert down == pytest.approx(float(ref_down), abs=1e-6)
        assert up == pytest.approx(float(ref_up), abs=1e-6)
