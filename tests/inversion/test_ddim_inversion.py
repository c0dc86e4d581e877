"""DDIM inversion on the host's sigma grid: matches a direct loop, reconstructs under deterministic sampling
with an error that shrinks as steps grow, and rejects bad input clearly."""
import pytest
import torch

import micro as m
from fixtures_fusion import direct_denoise, encode


@pytest.fixture(scope="module")
def inv(pack):
    from comfyui_likeness.samplers import inversion
    return inversion


@pytest.fixture(scope="module")
def setup():
    model, clip = m.micro_model(seed=7), m.micro_clip()
    # Random weights give eps predictions of size ~50 that swing wildly with x; a trained denoiser's are O(1)
    # and smooth. Scale the output convolution so the micro model behaves like one for this test.
    with torch.no_grad():
        model.model.diffusion_model.out[-1].weight.mul_(0.02)
    g = torch.Generator().manual_seed(0)
    # A smooth "image latent" in the raw VAE scale (process_latent_in multiplies by 0.18215).
    latent = torch.nn.functional.interpolate(torch.randn(1, 4, 4, 4, generator=g), size=(8, 8), mode="bilinear") * 4
    return model, encode(clip, "a photo of a face"), {"samples": latent}


def reconstruct(model, cond, inverted, sigmas):
    import comfy.sample
    import comfy.samplers

    zeros = torch.zeros_like(inverted["samples"])
    return comfy.sample.sample_custom(model, zeros, 1.0, comfy.samplers.sampler_object("euler"), sigmas, cond, cond,
                                      inverted["samples"], seed=0)


def test_inversion_equals_direct_euler_loop(inv, setup):
    model, cond, latent = setup
    out, sigmas = inv.ddim_invert(model, cond, latent, 6, "ddim_uniform")
    up = sigmas.flip(0)
    x = model.model.process_latent_in(latent["samples"])
    for i in range(len(up) - 1):
        s, sn = float(up[i]), float(up[i + 1])
        s_eval = s if s > 0 else sn
        x = x + (x - direct_denoise(model, x, s_eval, cond)) / s_eval * (sn - s)
    ref = model.model.process_latent_out(x)
    assert torch.allclose(out["samples"], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert float(sigmas[0]) > float(sigmas[-2]) and float(sigmas[-1]) == 0.0


def test_round_trip_error_shrinks_as_steps_grow(inv, setup):
    model, cond, latent = setup
    errors = []
    for steps in (5, 10, 20, 40):
        out, sigmas = inv.ddim_invert(model, cond, latent, steps, "ddim_uniform")
        recon = reconstruct(model, cond, out, sigmas)
        errors.append(((recon - latent["samples"]).norm() / latent["samples"].norm()).item())
    print("relative round-trip errors for 5, 10, 20, 40 steps:", errors)
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0], errors


def test_partial_inversion_for_img2img(inv, setup):
    model, cond, latent = setup
    out, sigmas = inv.ddim_invert(model, cond, latent, 10, "normal", denoise=0.5)
    full = inv.inversion_sigmas(model, "normal", 20)
    assert len(sigmas) == 11
    assert torch.allclose(sigmas.flip(0), full[:11])
    recon = reconstruct(model, cond, out, sigmas)
    assert ((recon - latent["samples"]).norm() / latent["samples"].norm()) < 0.5


def test_bad_input(inv, setup):
    model, cond, latent = setup
    with pytest.raises(ValueError, match="conditioning"):
        inv.ddim_invert(model, None, latent, 5)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        inv.ddim_invert(model, cond, latent, 0)
    with pytest.raises(ValueError, match="image latent"):
        inv.ddim_invert(model, cond, {"samples": torch.zeros(1, 4, 2, 8, 8)}, 5)
    with pytest.raises(ValueError, match="unknown scheduler"):
        inv.ddim_invert(model, cond, latent, 5, "nope")
