"""Fusion Sampling on a micro SDXL-architecture model (the host's SDXL classes: two text encoders, `y` from the
pooled output and six size embeddings, transformer depth 2), eps and v-prediction: the pooled output and the size
conditioning reach every condition of both stages, the guider's rules equal a direct computation, m = 0 equals the
host's KSampler, and a conditioning without the pooled output is refused in plain words."""
import pytest
import torch

import micro as m
from fixtures_fusion import empty_latent

SIZE = {"width": 192, "height": 256, "crop_w": 0, "crop_h": 0, "target_width": 192, "target_height": 256}


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.nodes import fusion as node_fusion
    from comfyui_likeness.samplers import fusion_guider, sigmas
    return {"nodes": node_fusion, "guider": fusion_guider, "sigmas": sigmas}


@pytest.fixture(scope="module", params=[False, True], ids=["eps", "v_pred"])
def model(request):
    return m.micro_sdxl_model(v_prediction=request.param)


@pytest.fixture(scope="module")
def clip():
    return m.micro_sdxl_clip()


def plain(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


@pytest.fixture(scope="module")
def c(clip):
    """The negative as CLIPTextEncode makes it (pooled output, no size keys); the others as CLIPTextEncodeSDXL."""
    sized = lambda t: m.sdxl_conditioning(clip, t, SIZE["width"], SIZE["height"])  # noqa: E731
    return {"negative": plain(clip, ""), "fused": sized("a photo of a red apple"),
            "concept": sized("a photo of a green apple"), "context": sized("a photo of a fruit")}


def close(a, b, tol=1e-5):
    return bool(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) < tol)


def expected_y(model, cond):
    """The UNet's y of a conditioning with the concept's size conditioning (the guider carries it over)."""
    extra = cond[0][1]
    size = {k: extra.get(k, SIZE[k]) for k in SIZE}
    return model.model.encode_adm(pooled_output=extra["pooled_output"], device="cpu", **size)


def direct_denoise(model, x, sigma, cond):
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    s = torch.full((x.shape[0],), float(sigma))
    with torch.no_grad():
        return model.model.apply_model(x, s, c_crossattn=cond[0][0].repeat(x.shape[0], 1, 1),
                                       y=expected_y(model, cond).repeat(x.shape[0], 1)).float()


def test_m0_without_context_equals_host_ksampler(lib, model, c):
    import nodes

    latent = empty_latent()
    ours = lib["nodes"].ksampler_fusion(model, 11, 3, "euler", "ddim_uniform", c["negative"], c["concept"],
                                        c["concept"], c["context"], latent, 1.0, 7.0, 6.0, 0.0, 0, 1.0, True,
                                        0.0, 1.0)["samples"]
    negative = [[c["negative"][0][0], {**c["negative"][0][1], **SIZE}]]   # the host does not carry sizes over
    ref = nodes.KSampler().sample(model, 11, 3, 6.0, "euler", "ddim_uniform", c["concept"], negative, latent)[0]["samples"]
    assert torch.isfinite(ours).all() and close(ours, ref)
    unsized = nodes.KSampler().sample(model, 11, 3, 6.0, "euler", "ddim_uniform", c["concept"], c["negative"],
                                      latent)[0]["samples"]
    assert not close(ours, unsized, 1e-3)   # the size conditioning of the negative matters, and it was carried


def test_both_rules_equal_a_direct_computation_with_y(lib, model, c):
    """Each condition's D uses its own pooled output and the shared size conditioning; a wrapper sees exactly
    that y on every row of both stages (the negative got the concept's size conditioning)."""
    import comfy.samplers

    w_f, w1, w2 = 6.0, 4.0, 2.5
    guider = lib["nodes"].build_guider(model, c["negative"], c["fused"], c["concept"], c["context"], w_f, w1, w2)
    want_y = {name: expected_y(model, c[name]) for name in c}
    seen, rows = {}, []

    def wrapper(apply_model, args):
        rows.append((args["c"]["y"].clone(), list(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    guider.model_patcher = guider.model_patcher.clone()
    guider.model_patcher.set_model_unet_function_wrapper(wrapper)
    guider.model_options = guider.model_patcher.model_options

    def probe(km, x, sigmas, extra_args=None, callback=None, disable=None):
        stage = {**extra_args, "model_options": {**extra_args["model_options"],
                                                  lib["guider"].STAGE_KEY: lib["guider"].FUSION}}
        seen["x"], seen["sigma"] = x.clone(), sigmas[0]
        seen["fusion"] = km(x, sigmas[0] * x.new_ones(x.shape[0]), **stage)
        seen["refine"] = km(x, sigmas[0] * x.new_ones(x.shape[0]), **extra_args)
        return x

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.KSAMPLER(probe), torch.tensor([5.0, 0.0]), seed=0)
    x, s = seen["x"], seen["sigma"]
    d = {k: direct_denoise(model, x, s, c[k]) for k in c}
    assert close(seen["fusion"], d["negative"] + w_f * (d["fused"] - d["negative"]))
    assert close(seen["refine"], d["negative"] + w1 * (d["concept"] - d["negative"]) + w2 * (d["context"] - d["negative"]))
    # every row of every model call carried its condition's pooled output and the same size embedding
    stage_names = [["negative", "fused"], ["negative", "concept", "context"]]
    assert len(rows) == 2
    for (y, order), names in zip(rows, stage_names):
        assert sorted(order) == list(range(len(names)))
        for row, index in enumerate(order):
            assert torch.allclose(y[row:row + 1], want_y[names[index]], atol=1e-6), (names[index], row)
    assert not torch.allclose(want_y["fused"], want_y["concept"])  # the rows really differ by their pooled output


def test_likeness_prompt_conditionings_sample_on_sdxl(lib, model, clip):
    """Likeness Prompt's three conditionings (pooled output, no size keys: the latent's size is used) with a text
    negative: KSampler (Fusion) m = 1 runs and is deterministic."""
    from comfyui_likeness.concepts.concept import LikenessConcept
    from comfyui_likeness.concepts.prompt_injection import encode_likeness_prompt

    fused, conc, context = encode_likeness_prompt(clip, "a holder in a garden", LikenessConcept(text="a red cat"),
                                                  "holder", "cat", 0.7)
    assert all("pooled_output" in cond[0][1] for cond in (fused, conc, context))
    run = lambda: lib["nodes"].ksampler_fusion(model, 3, 3, "euler", "ddim_uniform", plain(clip, ""), fused, conc,  # noqa: E731
                                               context, empty_latent(), 1.0, 6.0, 6.0, 3.0, 1, 1.0, True, 0.0,
                                               1.0)["samples"]
    a, b = run(), run()
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_a_conditioning_without_pooled_output_is_refused(lib, model, c):
    bare = [[c["negative"][0][0], {}]]
    with pytest.raises(ValueError, match="'negative' conditioning has no pooled text output"):
        lib["nodes"].build_guider(model, bare, c["fused"], c["concept"], c["context"], 5.0, 5.0, 1.0)
    with pytest.raises(ValueError, match="'context' conditioning has no pooled text output"):
        lib["nodes"].build_guider(model, c["negative"], c["fused"], c["concept"], [[c["context"][0][0], {}]], 5., 5., 1.)
