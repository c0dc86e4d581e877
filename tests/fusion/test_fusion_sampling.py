"""Fusion Sampling on the real host with micro models: guider predictions, the whole step algorithm against a
direct re-implementation, equivalences with the host's KSampler, masks, ControlNet, batching, progress."""
import math

import pytest
import torch

import micro as m
from fixtures_fusion import conds, direct_denoise, empty_latent, encode, micro_controlnet


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.nodes import fusion as node_fusion
    from comfyui_likeness.samplers import fusion_guider, fusion_math, fusion_sampler, sigmas
    return {"nodes": node_fusion, "guider": fusion_guider, "math": fusion_math, "sampler": fusion_sampler,
            "sigmas": sigmas}


@pytest.fixture(scope="module", params=[False, True], ids=["eps", "v_pred"])
def model(request):
    return m.micro_model(v_prediction=request.param)


@pytest.fixture(scope="module")
def clip():
    return m.micro_clip()


@pytest.fixture(scope="module")
def c(clip):
    return conds(clip)


def close(a, b, tol=1e-5):
    """Equal up to float32 rounding, relative to the tensors' scale."""
    return bool(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) < tol)


def run_fusion(lib, model, c, latent, seed=11, steps=4, sampler_name="euler", scheduler="ddim_uniform",
               denoise=1.0, w=(7.0, 7.0, 5.0), fusion_steps=1, eta=1.0, refine=True, start=0.0, end=1.0, fused=None):
    return lib["nodes"].ksampler_fusion(model, seed, steps, sampler_name, scheduler, c["negative"],
                                        fused if fused is not None else c["fused"], c["concept"], c["context"],
                                        latent, denoise, *w, fusion_steps, eta, refine, start, end)["samples"]


def host_ksampler(model, positive, negative, latent, seed=11, steps=4, cfg=7.0, sampler_name="euler",
                  scheduler="ddim_uniform", denoise=1.0):
    import nodes
    return nodes.KSampler().sample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                   denoise=denoise)[0]["samples"]


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral", "heun", "dpmpp_2m"])
def test_m0_without_context_equals_host_ksampler(lib, model, c, sampler_name):
    latent = empty_latent()
    ours = run_fusion(lib, model, c, latent, sampler_name=sampler_name, fusion_steps=0, w=(7.0, 6.0, 0.0),
                      fused=c["concept"])
    ref = host_ksampler(model, c["concept"], c["negative"], latent, cfg=6.0, sampler_name=sampler_name)
    assert torch.isfinite(ours).all()
    assert close(ours, ref)


def test_fused_equal_concept_m0_equals_host_ksampler_for_img2img(lib, model, c):
    latent = empty_latent(seed=4)
    ours = run_fusion(lib, model, c, latent, fusion_steps=0, w=(7.0, 5.0, 0.0), fused=c["concept"], denoise=0.6,
                      scheduler="karras", steps=5)
    ref = host_ksampler(model, c["concept"], c["negative"], latent, cfg=5.0, scheduler="karras", steps=5, denoise=0.6)
    assert close(ours, ref)


def test_guider_predictions_equal_direct_computation(lib, model, c):
    """Both stage rules of the guider against D computed per condition with BaseModel.apply_model."""
    import comfy.samplers

    w_f, w1, w2 = 6.0, 4.0, 2.5
    guider = lib["nodes"].build_guider(model, c["negative"], c["fused"], c["concept"], c["context"], w_f, w1, w2)
    seen = {}

    def probe(km, x, sigmas, extra_args=None, callback=None, disable=None):
        stage_args = {**extra_args, "model_options": {**extra_args["model_options"],
                                                       lib["guider"].STAGE_KEY: lib["guider"].FUSION}}
        seen["x"], seen["sigma"] = x.clone(), sigmas[0]
        seen["fusion"] = km(x, sigmas[0] * x.new_ones(x.shape[0]), **stage_args)
        seen["refine"] = km(x, sigmas[0] * x.new_ones(x.shape[0]), **extra_args)
        return x

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.KSAMPLER(probe), torch.tensor([5.0, 0.0]), seed=0)
    x, s = seen["x"], seen["sigma"]
    d = {k: direct_denoise(model, x, s, c[k]) for k in ("negative", "fused", "concept", "context")}
    want_fusion = d["negative"] + w_f * (d["fused"] - d["negative"])
    want_refine = d["negative"] + w1 * (d["concept"] - d["negative"]) + w2 * (d["context"] - d["negative"])
    assert close(seen["fusion"], want_fusion)
    assert close(seen["refine"], want_refine)
    assert not close(want_fusion, want_refine, 1e-3)  # the two rules really differ


def initial_x(model, sig, latent, seed):
    """What the host's KSAMPLER makes of the seed's noise at the first sigma."""
    import comfy.sample

    ms = model.get_model_object("model_sampling")
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    max_denoise = math.isclose(float(sig[0]), float(ms.sigma_max), rel_tol=1e-5) or float(sig[0]) > float(ms.sigma_max)
    return ms.noise_scaling(sig[0], noise, torch.zeros_like(noise), max_denoise=max_denoise)


def reference_fusion_sampling(model, c, sigmas, x, seed, m_repeats, eta, w):
    """Alg. 1 in sigma form from scratch: direct model calls, closed form written out, Euler refinement."""
    from comfy.k_diffusion.sampling import default_noise_sampler

    w_f, w1, w2 = w
    noise = default_noise_sampler(x, seed=seed)  # the host's seeded noise, as its own ancestral samplers draw it
    for i in range(len(sigmas) - 1):
        s, sn = float(sigmas[i]), float(sigmas[i + 1])
        xt = x
        for _ in range(m_repeats):
            dn, df = direct_denoise(model, xt, s, c["negative"]), direct_denoise(model, xt, s, c["fused"])
            x0 = dn + w_f * (df - dn)
            eps = (xt - x0) / s
            rho = min(max(eta ** 2 * (1 - sn ** 2 / s ** 2), 0.0), 1.0)
            z = noise(s, sn)
            xt = x0 + s * ((1 - rho) * eps + math.sqrt(rho * (2 - rho)) * z)
        dn, dc, dx = (direct_denoise(model, xt, s, c[k]) for k in ("negative", "concept", "context"))
        x0 = dn + w1 * (dc - dn) + w2 * (dx - dn)
        x = x0 + sn * (xt - x0) / s
    return x


@pytest.mark.parametrize("m_repeats,eta", [(1, 1.0), (2, 0.6)])
def test_sampler_follows_algorithm_1_step_by_step(lib, model, c, m_repeats, eta):
    seed, steps, w = 5, 3, (6.0, 5.0, 3.0)
    latent = empty_latent()
    ours = run_fusion(lib, model, c, latent, seed=seed, steps=steps, w=w, fusion_steps=m_repeats, eta=eta)
    sig = lib["sigmas"].schedule_sigmas(model, "ddim_uniform", steps)
    x = initial_x(model, sig, latent, seed)
    ref = reference_fusion_sampling(model, c, sig, x, seed, m_repeats, eta, w)
    ref = model.model.process_latent_out(ref)
    assert close(ours, ref)


def test_eta_zero_adds_no_noise(lib, model, c):
    latent = empty_latent()
    a = run_fusion(lib, model, c, latent, fusion_steps=2, eta=0.0)
    b = run_fusion(lib, model, c, latent, fusion_steps=0, eta=0.0)
    assert close(a, b)
    noisy = run_fusion(lib, model, c, latent, fusion_steps=1, eta=1.0)
    assert not close(a, noisy, 1e-3)


def test_m0_equals_eq6_with_context(lib, model, c):
    """m = 0 is eq. 6 alone: an Euler loop on the three-condition guidance."""
    seed, steps, w = 2, 3, (9.0, 5.0, 3.0)
    latent = empty_latent()
    ours = run_fusion(lib, model, c, latent, seed=seed, steps=steps, w=w, fusion_steps=0)
    sig = lib["sigmas"].schedule_sigmas(model, "ddim_uniform", steps)
    x = initial_x(model, sig, latent, seed)
    ref = model.model.process_latent_out(reference_fusion_sampling(model, c, sig, x, seed, 0, 1.0, w))
    assert close(ours, ref)


def test_refine_off_ends_each_step_with_the_ancestral_step(lib, model, c):
    latent = empty_latent()
    out = run_fusion(lib, model, c, latent, refine=False, fusion_steps=1)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="fusion_steps"):
        run_fusion(lib, model, c, latent, refine=False, fusion_steps=0)


def test_step_window_limits_fusion(lib, model, c):
    latent = empty_latent()
    none = run_fusion(lib, model, c, latent, fusion_steps=0)
    window_empty = run_fusion(lib, model, c, latent, fusion_steps=1, start=1.0, end=1.0)
    full = run_fusion(lib, model, c, latent, fusion_steps=1)
    early = run_fusion(lib, model, c, latent, fusion_steps=1, start=0.0, end=0.5)
    assert close(none, window_empty)
    assert not close(full, early, 1e-3) and not close(none, early, 1e-3)


def test_inpaint_mask_keeps_the_unmasked_region(lib, model, c):
    latent = empty_latent(seed=9)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 1.0
    latent["noise_mask"] = mask
    out = run_fusion(lib, model, c, latent, fusion_steps=1)
    keep = out[..., :, :3] - latent["samples"][..., :, :3]
    assert keep.abs().max() < 1e-5
    assert (out[..., :, 5:] - latent["samples"][..., :, 5:]).abs().mean() > 1e-2
    ref = host_ksampler(model, c["concept"], c["negative"], latent, cfg=6.0)
    ours = run_fusion(lib, model, c, latent, fusion_steps=0, w=(7.0, 6.0, 0.0), fused=c["concept"])
    assert close(ours, ref)


def test_controlnet_conditioning_is_used_and_matches_host(lib, model, c):
    import nodes

    cn = micro_controlnet()
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(c["concept"], c["negative"], cn, hint, 1.0, 0.0, 1.0)[:2]
    latent = empty_latent()
    controlled = {"negative": neg, "fused": pos, "concept": pos, "context": c["context"]}
    ours = run_fusion(lib, model, controlled, latent, fusion_steps=0, w=(7.0, 6.0, 0.0))
    ref = host_ksampler(model, pos, neg, latent, cfg=6.0)
    plain = host_ksampler(model, c["concept"], c["negative"], latent, cfg=6.0)
    assert close(ours, ref)
    assert not close(ref, plain, 1e-3)  # the ControlNet really acts
    # fused/context without their own ControlNet receive the concept's (carried over by the guider)
    full = run_fusion(lib, model, {"negative": neg, "fused": c["fused"], "concept": pos, "context": c["context"]},
                      latent, fusion_steps=1)
    assert torch.isfinite(full).all()


def test_each_stage_is_one_batched_model_call(lib, model, c):
    calls = []

    from comfyui_likeness.core.keys import UNCOND_INDICES_KEY

    def wrapper(apply_model, args):
        # the negative is index 0 of the guider's cond lists; attention patches are told so
        assert args["c"]["transformer_options"][UNCOND_INDICES_KEY] == {0}
        assert 0 in args["cond_or_uncond"]
        calls.append((args["input"].shape[0], tuple(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    steps = 3
    run_fusion(lib, patched, c, empty_latent(), steps=steps, fusion_steps=1, w=(7.0, 7.0, 5.0))
    assert [b for b, _ in calls] == [2, 3] * steps
    calls.clear()
    run_fusion(lib, patched, c, empty_latent(), steps=steps, fusion_steps=0, w=(7.0, 7.0, 5.0))
    assert [b for b, _ in calls] == [3] * steps


def test_progress_bar_reports_every_step(lib, model, c, monkeypatch):
    import comfy.utils

    # What the pack reports to the host's progress bar; how often the host passes that on to its hook is the
    # host's choice (0.12 throttles it).
    seen = []
    update = comfy.utils.ProgressBar.update_absolute

    def record(self, value, total=None, preview=None):
        seen.append((value, self.total if total is None else total))
        return update(self, value, total, preview)

    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", record)
    run_fusion(lib, model, c, empty_latent(), steps=4)
    assert seen == [(i, 4) for i in range(1, 5)]


def test_interrupt_stops_sampling(lib, model, c):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_fusion(lib, model, c, empty_latent(), steps=4)
    finally:
        mm.interrupt_current_processing(False)
    assert torch.isfinite(run_fusion(lib, model, c, empty_latent(), steps=2)).all()


def test_fusion_sampler_without_fusion_guider_is_a_clear_error(lib, model, c):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(c["concept"], c["negative"])
    guider.set_cfg(5.0)
    sampler = lib["sampler"].fusion_ksampler()
    with pytest.raises(ValueError, match="Fusion Guider"):
        guider.sample(torch.randn(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), sampler, torch.tensor([3.0, 1.0, 0.0]), seed=0)


def test_plain_sampler_with_fusion_guider_runs_refinement_rule(lib, model, c):
    """SamplerCustomAdvanced with an ordinary sampler uses eq. 6 (m = 0)."""
    import comfy.samplers
    import comfy.sample

    guider = lib["nodes"].build_guider(model, c["negative"], c["fused"], c["concept"], c["context"], 7.0, 6.0, 2.0)
    sig = lib["sigmas"].schedule_sigmas(model, "ddim_uniform", 3)
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), 3)
    plain = guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.sampler_object("euler"), sig, seed=3)
    ours = guider.sample(noise, torch.zeros(1, 4, 8, 8), lib["sampler"].fusion_ksampler(m=0), sig, seed=3)
    assert close(plain, ours)
