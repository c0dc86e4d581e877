"""ProFusion as published: the "ProFusion DDIM" schedule against a float64 statement of the official sampling loop
(ProFusion Alg. 1 with eq. 11 in alpha-bar form on the official DDIM grid, eq. 6 and DDIM's eq. 8 for the
refinement), written here from the paper and the official pipeline's described behaviour, not from the pack's
code; plus st, the continuous refinement eta and the start noise."""
import copy
import math

import pytest
import torch

import micro as m
from fixtures_fusion import conds, empty_latent

W = (6.0, 5.0, 3.0)   # w_f, w1, w2


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.samplers import fusion_sampler, ksampler_fusion, profusion_schedule
    return {"sampler": fusion_sampler, "ks": ksampler_fusion, "schedule": profusion_schedule}


@pytest.fixture(scope="module")
def model():
    return m.micro_model()


@pytest.fixture(scope="module")
def c():
    return conds(m.micro_clip())


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# --- the reference: ProFusion's official loop in float64 --------------------------------------------------------

def alphas_cumprod():
    """Stable Diffusion's scaled-linear betas (beta_start 0.00085, beta_end 0.012, 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


def official_loop(unet, contexts, x_T, steps, m_repeats, eta, refine, w, noises, refine_eta=0.0):
    """x_T: the VP starting noise. Returns the official pipeline's final latent (VP, at alpha_bar_0).
    DDIM with steps_offset 1: t = (N-1-i)*(1000//N) + 1; the previous level of the last step is alpha_bar_0."""
    w_f, w1, w2 = w
    a = alphas_cumprod()
    ratio = 1000 // steps
    grid = [(steps - 1 - i) * ratio + 1 for i in range(steps)]
    draws = iter(noises)

    def eps(x, t, name):
        return unet(x, torch.full((x.shape[0],), float(t), dtype=torch.float64), context=contexts[name])

    x = x_T
    for t in grid:
        a_t = a[t]
        a_p = a[t - ratio] if t - ratio >= 0 else a[0]
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        s = eta * var.sqrt()
        for r in range(m_repeats):
            e_u = eps(x, t, "negative")
            e = e_u + w_f * (eps(x, t, "fused") - e_u)                                      # eq. 3
            z = next(draws)
            if refine or r < m_repeats - 1:                                                 # eq. 11
                x = (x - e * (s ** 2 * (1 - a_t).sqrt()) / (1 - a_p)
                     + s * z * ((1 - a_t) * (2 - 2 * a_p - s ** 2)).sqrt() / (1 - a_p))
            else:                                                                           # Alg. 1 line 11, eq. 8
                x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
                x = a_p.sqrt() * x0 + (1 - a_p - s ** 2).sqrt() * e + s * z
        if refine:
            e_u = eps(x, t, "negative")
            e = e_u + w1 * (eps(x, t, "concept") - e_u) + w2 * (eps(x, t, "context") - e_u)  # eq. 6
            x0 = (x - (1 - a_t).sqrt() * e) / a_t.sqrt()
            s_r = refine_eta * var.sqrt()                                                   # DDIM step, eta
            x = a_p.sqrt() * x0 + (1 - a_p - s_r ** 2).sqrt() * e
            if refine_eta > 0:
                x = x + s_r * next(draws)
    return x


def float64_unet(model):
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    unet = copy.deepcopy(model.model.diffusion_model).double().eval().requires_grad_(False)
    return lambda x, t, context: unet(x, t, context=context)


def noise_list(count, shape, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


def pack_run(lib, model, c, steps, m_repeats, eta, refine, w, x_T, noises, refine_eta=0.0, st=1000):
    """The pack through the ProFusion DDIM schedule, with the noise draws injected."""
    draws = iter(noises)
    guider = lib["ks"].build_guider(model, c["negative"], c["fused"], c["concept"], c["context"], *w)
    sampler = lib["sampler"].fusion_ksampler(m_repeats, eta, refine, "euler", 0.0, 1.0, refine_eta, profusion_ddim=True,
                                             noise_sampler=lambda s, sn: next(draws))
    sigmas = lib["schedule"].profusion_ddim_sigmas(model, steps, st)
    out = guider.sample(x_T, torch.zeros_like(x_T), sampler, sigmas, seed=0)
    assert next(draws, None) is None, "the pack drew fewer noises than the official loop"
    return out


CASES = [(0, True, 0.0), (1, True, 0.0), (2, True, 0.0), (1, False, 0.0), (2, False, 0.0), (1, True, 0.5)]


@pytest.mark.parametrize("m_repeats,refine,refine_eta", CASES,
                         ids=[f"m{a}-{'refine' if b else 'norefine'}-eta{c}" for a, b, c in CASES])
def test_profusion_ddim_equals_the_official_loop_in_float64(lib, model, c, m_repeats, refine, refine_eta):
    steps, eta, shape = 5, 1.0, (1, 4, 8, 8)
    draws_per_step = m_repeats + (1 if refine and refine_eta > 0 else 0)
    noises = noise_list(steps * draws_per_step, shape)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    contexts = {k: c[k][0][0].double() for k in ("negative", "fused", "concept", "context")}
    want = official_loop(float64_unet(model), contexts, x_T.double(), steps, m_repeats, eta, refine, W,
                         [n.double() for n in noises], refine_eta)
    want = model.model.process_latent_out(want)
    got = pack_run(lib, model, c, steps, m_repeats, eta, refine, W, x_T, noises, refine_eta)
    assert torch.isfinite(got).all()
    print(f"relative difference to the float64 official loop: {rel(got, want):.2e}")
    assert rel(got, want) < 1e-5, rel(got, want)


def test_the_host_grid_misses_the_official_one(lib, model, c):
    """What the schedule fixes: ddim_uniform's grid ends at sigma = 0 where the official one ends at alpha_bar_0,
    and (for 30 steps) starts at t = 991 with 31 steps; the official loop tells the two apart."""
    from comfyui_likeness.samplers.sigmas import schedule_sigmas

    ms = model.get_model_object("model_sampling")
    host = schedule_sigmas(model, "ddim_uniform", 30)
    ours = lib["schedule"].profusion_ddim_sigmas(model, 30)
    t = [int(v) for v in ms.timestep(ours[:-1])]
    assert t == [958 - 33 * i for i in range(30)] and len(host) - 1 == 31 and int(ms.timestep(host[:1])) == 991
    assert float(ours[-1]) == pytest.approx(float(ms.sigma_min)) and float(host[-1]) == 0.0
    fifty = [int(v) for v in ms.timestep(lib["schedule"].profusion_ddim_sigmas(model, 50)[:-1])]
    assert fifty[0] == 981 and fifty[-1] == 1 and len(fifty) == 50
    # the last step matters: ending at sigma = 0 instead of alpha_bar_0 moves the result well beyond 1e-5
    steps, shape = 5, (1, 4, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    contexts = {k: c[k][0][0].double() for k in ("negative", "fused", "concept", "context")}
    want = model.model.process_latent_out(official_loop(float64_unet(model), contexts, x_T.double(), steps, 0, 1.0,
                                                        True, W, []))
    sigmas = lib["schedule"].profusion_ddim_sigmas(model, steps).clone()
    sigmas[-1] = 0.0
    guider = lib["ks"].build_guider(model, c["negative"], c["fused"], c["concept"], c["context"], *W)
    to_zero = guider.sample(x_T, torch.zeros_like(x_T), lib["sampler"].fusion_ksampler(0, profusion_ddim=True),
                            sigmas, seed=0)
    assert rel(to_zero, want) > 1e-4


def first_unet_input(model, run):
    """(x in VP scaling, integer timestep) of every model call of run(patched model)."""
    seen = []
    ms = model.get_model_object("model_sampling")

    def wrapper(apply_model, args):
        sigma = args["timestep"][:1]
        seen.append((ms.calculate_input(sigma, args["input"][:1]).clone(), ms.timestep(sigma)))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched = model.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    run(patched)
    return seen


def test_start_noise_and_st(lib, model, c):
    """Whole grid: the UNet first sees x_T = n (VP), as the official pipeline; st cuts the grid to t <= st and
    starts from the latent noised to the first kept level."""
    import comfy.sample

    latent = empty_latent(seed=4)
    noise = comfy.sample.prepare_noise(latent["samples"], 9)
    ms = model.get_model_object("model_sampling")

    def run(st):
        return lambda p: lib["ks"].ksampler_fusion(p, 9, 5, "euler", "profusion_ddim", c["negative"], c["fused"],
                                                   c["concept"], c["context"], {"samples": torch.zeros(1, 4, 8, 8)},
                                                   1.0, *W, 0, 1.0, True, 0.0, 1.0, st=st)

    seen = first_unet_input(model, run(1000))
    assert torch.allclose(seen[0][0], noise, atol=1e-6) and int(seen[0][1]) == 801
    assert len(seen) == 5
    img = first_unet_input(model, lambda p: lib["ks"].ksampler_fusion(
        p, 9, 5, "euler", "profusion_ddim", c["negative"], c["fused"], c["concept"], c["context"], latent, 1.0, *W,
        0, 1.0, True, 0.0, 1.0, st=500))
    assert [int(t) for _, t in img] == [401, 201, 1]
    sigma = float(ms.sigmas[401])
    scaled = model.model.process_latent_in(latent["samples"])
    assert torch.allclose(img[0][0], (scaled + sigma * noise) / math.sqrt(1 + sigma ** 2), atol=1e-5)
    with pytest.raises(ValueError, match="st = 0|st must be"):
        lib["schedule"].profusion_ddim_sigmas(model, 5, 0)
    # denoise as KSampler means it: the last 4 steps of the 8-step official grid
    half = lib["schedule"].profusion_ddim_sigmas(model, 4, denoise=0.5)
    assert [int(t) for t in ms.timestep(half[:-1])] == [376, 251, 126, 1]
    # st with a host scheduler cuts the same way
    host = first_unet_input(model, lambda p: lib["ks"].ksampler_fusion(
        p, 9, 6, "euler", "normal", c["negative"], c["fused"], c["concept"], c["context"], latent, 1.0, *W,
        0, 1.0, True, 0.0, 1.0, st=500))
    assert all(float(t) <= 500 for _, t in host) and 0 < len(host) < 6


def test_node_path_equals_the_library_path(lib, model, c):
    """KSampler (Fusion) with scheduler profusion_ddim is the schedule above with the seed's noise."""
    import comfy.sample

    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node = lib["ks"].ksampler_fusion(model, 5, 4, "euler", "profusion_ddim", c["negative"], c["fused"], c["concept"],
                                     c["context"], latent, 1.0, *W, 1, 1.0, True, 0.0, 1.0, refine_eta=0.3)
    guider = lib["ks"].build_guider(model, c["negative"], c["fused"], c["concept"], c["context"], *W)
    sampler = lib["sampler"].fusion_ksampler(1, 1.0, True, "euler", 0.0, 1.0, 0.3, profusion_ddim=True)
    noise = comfy.sample.prepare_noise(latent["samples"], 5)
    direct = guider.sample(noise, latent["samples"], sampler, lib["schedule"].profusion_ddim_sigmas(model, 4), seed=5)
    assert torch.equal(node["samples"], direct)


def test_refine_eta_is_continuous_ddim(lib, model, c):
    """refine_eta 0 is the deterministic Euler (DDIM eta 0) step, 1 is euler_ancestral; values between give
    results between; out of range or with a sampler it does not apply to is refused."""
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def run(sampler_name, refine_eta=0.0, scheduler="normal"):
        return lib["ks"].ksampler_fusion(model, 2, 4, sampler_name, scheduler, c["negative"], c["fused"], c["concept"],
                                         c["context"], latent, 1.0, *W, 0, 1.0, True, 0.0, 1.0,
                                         refine_eta=refine_eta)["samples"]

    plain, one, anc, half = run("euler"), run("euler", 1.0), run("euler_ancestral"), run("euler", 0.5)
    assert torch.equal(plain, run("euler", 0.0))
    assert rel(one, anc) < 1e-6
    assert rel(half, plain) > 1e-4 and rel(half, one) > 1e-4
    for bad, msg in ((1.5, "between 0 and 1"), (float("nan"), "between 0 and 1")):
        with pytest.raises(ValueError, match=msg):
            run("euler", bad)
    with pytest.raises(ValueError, match="use it with the euler"):
        run("heun", 0.5)


def test_schedule_refuses_models_off_the_ddpm_grid(lib):
    import comfy.model_sampling

    class Flow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        pass

    class Patcher:
        def get_model_object(self, name):
            return Flow()

    with pytest.raises(ValueError, match="1000-step DDPM grid"):
        lib["schedule"].profusion_ddim_sigmas(Patcher(), 10)
    assert lib["schedule"].official_timesteps(30)[:2] == [958, 925]
    with pytest.raises(ValueError, match="steps must be"):
        lib["schedule"].official_timesteps(0)


def test_schedule_node_with_samplercustomadvanced_equals_ksampler_fusion(lib, model, c):
    """ProFusion DDIM Schedule -> Fusion Sampler (profusion_ddim on) -> the host's SamplerCustomAdvanced gives
    KSampler (Fusion) with scheduler profusion_ddim, for a whole grid and for one cut by st."""
    from comfy_extras.nodes_custom_sampler import Noise_RandomNoise, SamplerCustomAdvanced
    from comfyui_likeness.nodes import fusion as nodes

    latent = empty_latent(seed=2)
    for st in (1000, 600):
        sigmas = nodes.LikenessProFusionDDIMSchedule.execute(model, 6, st, 1.0).result[0]
        sampler = nodes.LikenessFusionSampler.execute(1, 1.0, True, "euler", 0.0, 1.0, 0.2, True).result[0]
        guider = nodes.LikenessFusionGuider.execute(model, c["negative"], c["fused"], c["concept"], c["context"],
                                                    *W).result[0]
        custom = SamplerCustomAdvanced.execute(Noise_RandomNoise(4), guider, sampler, sigmas, latent).result[0]
        ks = lib["ks"].ksampler_fusion(model, 4, 6, "euler", "profusion_ddim", c["negative"], c["fused"], c["concept"],
                                       c["context"], latent, 1.0, *W, 1, 1.0, True, 0.0, 1.0, st=st, refine_eta=0.2)
        assert torch.allclose(custom["samples"], ks["samples"], atol=1e-6, rtol=1e-6), st
    assert len(nodes.LikenessProFusionDDIMSchedule.execute(model, 6, 600, 1.0).result[0]) < 7
