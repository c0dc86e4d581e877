"""Several reference photos for PromptNet Concept (ProFusion's extra_ref_image_*, docs/methods/promptnet.md): both
combine modes of the Fusion Guider equal a direct computation (S* of each photo from PromptNet called directly,
each condition encoded statically and denoised with BaseModel.apply_model), the mixture equals the official
pipeline's formula, on SD1.5 and SDXL micro models; the node takes a batch of photos and per-photo weights, and a
second photo changes the image."""
import pytest
import torch

import micro as m
from fixtures_fusion import empty_latent, encode
from fixtures_promptnet import micro_promptnet, micro_sdxl_promptnet, promptnet_patcher

TEXT = "a holder is smiling"
W_F, W1, W2 = 6.0, 4.0, 2.5


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.concepts import concept, prompt_injection, promptnet_source
    from comfyui_likeness.nodes import promptnet as nodes_promptnet
    from comfyui_likeness.samplers import fusion_guider, ksampler_fusion
    return {"concept": concept, "inject": prompt_injection, "source": promptnet_source, "guider": fusion_guider,
            "ks": ksampler_fusion, "nodes": nodes_promptnet}


FAMILIES = {
    "sd15": lambda: (m.micro_model(), m.micro_clip(), micro_promptnet(), m.CONTEXT),
    "sdxl": lambda: (m.micro_sdxl_model(), m.micro_sdxl_clip(), micro_sdxl_promptnet(), m.SDXL_CONTEXT),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, clip, net, context_dim = FAMILIES[request.param]()
    g = torch.Generator().manual_seed(8)
    photos = {"tokens": torch.randn(2, 257, 32, generator=g), "latents": torch.randn(2, 4, 8, 8, generator=g) * 3}
    return {"name": request.param, "model": model, "clip": clip, "net": net, "context_dim": context_dim, **photos}


def size_of(x):
    side = {"width": x.shape[-1] * 8, "height": x.shape[-2] * 8}
    return {**side, "crop_w": 0, "crop_h": 0, "target_width": side["width"], "target_height": side["height"]}


def direct_s_star(f, k, x, sigma):
    """PromptNet called directly for photo k: x in VP scaling, t = timestep(sigma), y from the size (SDXL)."""
    model, net = f["model"], f["net"]
    ms = model.get_model_object("model_sampling")
    s = torch.full((x.shape[0],), float(sigma))
    extra = {}
    if net.adm_channels is not None:
        extra["y"] = model.model.encode_adm(pooled_output=torch.zeros(1, m.SDXL_G_WIDTH), device="cpu", **size_of(x))
    reference = model.model.process_latent_in(f["latents"][k:k + 1])
    with torch.no_grad():
        return net(reference, ms.calculate_input(s, x), ms.timestep(s).float(), f["tokens"][k:k + 1], **extra)[0]


def static_conds(lib, f, s_star):
    concept = lib["concept"].LikenessConcept(vectors=f["net"].split(s_star), space="hidden")
    fused, conc, _ = lib["inject"].encode_likeness_prompt(f["clip"], TEXT, concept, "holder", "person", 0.7)
    return fused, conc


def direct_denoise(f, x, sigma, cond):
    import comfy.model_management

    model = f["model"]
    comfy.model_management.load_models_gpu([model])
    extra = {}
    if "pooled_output" in cond[0][1] and f["net"].adm_channels is not None:
        extra["y"] = model.model.encode_adm(pooled_output=cond[0][1]["pooled_output"], device="cpu", **size_of(x))
    with torch.no_grad():
        return model.model.apply_model(x, torch.full((x.shape[0],), float(sigma)), c_crossattn=cond[0][0],
                                       **extra).float()


def guider_predictions(lib, f, weights, combine):
    """Both stage rules of a Fusion Guider holding a PromptNet concept of the two photos, at one (x, sigma)."""
    import comfy.samplers

    source = lib["source"].PromptNetSource(promptnet_patcher(f["net"]), f["tokens"], f["latents"],
                                           {"unet_config": {"context_dim": f["context_dim"]}, "vision_width": 32},
                                           weights, combine)
    concept = source.static_concept(f["model"], "promptnet:refs")
    fused, conc, context = lib["inject"].encode_likeness_prompt(f["clip"], TEXT, concept, "holder", "person", 0.7)
    negative = encode(f["clip"], "")
    guider = lib["ks"].build_guider(f["model"], negative, fused, conc, context, W_F, W1, W2)
    seen = {}

    def probe(km, x, sigmas, extra_args=None, callback=None, disable=None):
        stage = {**extra_args, "model_options": {**extra_args["model_options"],
                                                  lib["guider"].STAGE_KEY: lib["guider"].FUSION}}
        seen["x"], seen["sigma"] = x.clone(), sigmas[0]
        seen["fusion"] = km(x, sigmas[0] * x.new_ones(x.shape[0]), **stage)
        seen["refine"] = km(x, sigmas[0] * x.new_ones(x.shape[0]), **extra_args)
        return x

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.KSAMPLER(probe), torch.tensor([4.0, 0.0]), seed=0)
    return seen, negative, context, source


def close(a, b, tol=1e-5):
    return bool(((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) < tol)


def test_mixture_equals_a_direct_computation_and_the_official_formula(lib, family):
    f = family
    r = [1.0, 0.5]
    seen, negative, context, _ = guider_predictions(lib, f, r, "mixture")
    x, sigma = seen["x"], seen["sigma"]
    d_neg, d_ctx = direct_denoise(f, x, sigma, negative), direct_denoise(f, x, sigma, context)
    d_fused, d_conc = [], []
    for k in range(2):
        fused, conc = static_conds(lib, f, direct_s_star(f, k, x, sigma))
        d_fused.append(direct_denoise(f, x, sigma, fused))
        d_conc.append(direct_denoise(f, x, sigma, conc))
    fusion = d_neg + W_F * sum(r[k] / sum(r) * (d_fused[k] - d_neg) for k in range(2))
    refine = d_neg + W1 * sum(r[k] * (d_conc[k] - d_neg) for k in range(2)) + W2 * (d_ctx - d_neg)
    assert close(seen["fusion"], fusion) and close(seen["refine"], refine)
    # ProFusion's pipeline with extra_ref_image_scales = [s], s = w1 * r_1: a weighted mean of the guided fused
    # predictions (weights w1 and s over their sum), and s * (D_concept_1 - D_neg) added to eq. 6
    s = W1 * r[1]
    official_fusion = (W1 * (d_neg + W_F * (d_fused[0] - d_neg)) + s * (d_neg + W_F * (d_fused[1] - d_neg))) / (W1 + s)
    official_refine = d_neg + W1 * (d_conc[0] - d_neg) + W2 * (d_ctx - d_neg) + s * (d_conc[1] - d_neg)
    assert close(seen["fusion"], official_fusion) and close(seen["refine"], official_refine)
    assert not close(d_fused[0], d_fused[1], 1e-3)   # the two photos give different predictions


def test_average_equals_a_direct_computation(lib, family):
    f = family
    r = [0.25, 1.0]
    seen, negative, context, _ = guider_predictions(lib, f, r, "average")
    x, sigma = seen["x"], seen["sigma"]
    s_mean = (r[0] * direct_s_star(f, 0, x, sigma) + r[1] * direct_s_star(f, 1, x, sigma)) / sum(r)
    fused, conc = static_conds(lib, f, s_mean)
    d_neg, d_ctx = direct_denoise(f, x, sigma, negative), direct_denoise(f, x, sigma, context)
    fusion = d_neg + W_F * (direct_denoise(f, x, sigma, fused) - d_neg)
    refine = d_neg + W1 * sum(r) * (direct_denoise(f, x, sigma, conc) - d_neg) + W2 * (d_ctx - d_neg)
    assert close(seen["fusion"], fusion) and close(seen["refine"], refine)


def test_static_concept_is_the_weighted_mean_of_each_photos_s_star(lib, family):
    f = family
    _, _, _, source = guider_predictions(lib, f, [2.0, 1.0], "mixture")
    model = f["model"]
    sigma = model.get_model_object("model_sampling").sigma_min
    latents = model.model.process_latent_in(f["latents"])
    want = (2.0 * direct_s_star(f, 0, latents[:1], sigma) + direct_s_star(f, 1, latents[1:], sigma)) / 3.0
    concept = source.static_concept(model, "promptnet:static")
    for width, part in f["net"].split(want).items():
        assert torch.allclose(concept.vectors[width], part, atol=1e-5)
    assert concept.metadata["weights"] == [2.0, 1.0] and concept.metadata["references"] == 2


@pytest.fixture(scope="module")
def node_models():
    from comfyui_likeness.nodes.promptnet import PromptNetModel

    meta = {"unet_config": {"context_dim": m.CONTEXT}, "vision_width": 32, "latent_size": 8}
    return {"promptnet": PromptNetModel(micro_promptnet(), meta, "micro.safetensors"), "clip_vision": m.micro_clip_vision(),
            "vae": m.micro_vae(), "model": m.micro_model(), "clip": m.micro_clip()}


def photos(n):
    g = torch.Generator().manual_seed(11)
    return torch.rand(n, 72, 64, 3, generator=g)


def sample_with(lib, nm, images, weights="1.0", combine="mixture"):
    from comfyui_likeness.nodes.promptnet import LikenessPromptNetConcept

    rows = []

    def wrapper(apply_model, args):
        rows.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = nm["model"].clone()
    model.set_model_unet_function_wrapper(wrapper)
    concept = LikenessPromptNetConcept.execute(nm["promptnet"], nm["clip_vision"], nm["vae"], nm["model"], images,
                                               weights, combine).result[0]
    fused, conc, context = lib["inject"].encode_likeness_prompt(nm["clip"], TEXT, concept, "holder", "person", 0.7)
    out = lib["ks"].ksampler_fusion(model, 2, 2, "euler", "ddim_uniform", encode(nm["clip"], ""), fused, conc, context,
                                    empty_latent(), 1.0, W_F, W1, W2, 1, 1.0, True, 0.0, 1.0)["samples"]
    return out, rows


def test_node_a_second_photo_changes_the_image_and_adds_one_condition_per_stage(lib, node_models):
    one, rows_one = sample_with(lib, node_models, photos(1))
    two, rows_two = sample_with(lib, node_models, photos(2), "1.0, 0.8")
    assert torch.isfinite(two).all() and not torch.allclose(one, two, atol=1e-4)
    assert rows_one == [2, 3, 2, 3] and rows_two == [3, 4, 3, 4]   # (negative, fused x K), (negative, concept x K, context)
    average, rows_avg = sample_with(lib, node_models, photos(2), "1.0, 0.8", "average")
    assert rows_avg == rows_one and not torch.allclose(average, two, atol=1e-4)
    same, _ = sample_with(lib, node_models, photos(1), "1")
    assert torch.equal(same, one)


@pytest.mark.parametrize("weights,message", [("1, 2, 3", r"3 weight\(s\) for 2 reference photo"),
                                             ("1, -1", "at least 0"), ("0, 0", "not all 0"),
                                             ("one, two", "numbers separated by commas")])
def test_node_bad_weights_are_named(lib, node_models, weights, message):
    from comfyui_likeness.nodes.promptnet import LikenessPromptNetConcept

    nm = node_models
    with pytest.raises(ValueError, match=message):
        LikenessPromptNetConcept.execute(nm["promptnet"], nm["clip_vision"], nm["vae"], nm["model"], photos(2), weights)
    with pytest.raises(ValueError, match="combine must be one of"):
        lib["source"].PromptNetSource(None, torch.zeros(1, 2, 3), torch.zeros(1, 4, 8, 8), {}, None, "concat")


def test_shipped_multi_photo_workflow_changes_when_the_second_photo_is_added(host, workflow_assets, base_dir):
    """profusion_promptnet_photos as shipped (two photos) against the same graph with photo 1 alone."""
    import os

    import numpy as np
    from PIL import Image

    import workflow_tools as wt

    prompt = wt.shrink(wt.load(os.path.join(wt.API_DIR, "profusion_promptnet_photos.json")))
    concept = next(n for n in prompt.values() if n["class_type"] == "LikenessPromptNetConcept")
    batch = prompt[concept["inputs"]["image"][0]]
    assert batch["class_type"] == "ImageBatch"

    def image_of(graph):
        ok, outputs, messages = host.run(graph)
        assert ok, messages[-1:]
        info = [i for out in outputs.values() for i in out.get("images", [])][0]
        path = os.path.join(base_dir, info["type"], info.get("subfolder", ""), info["filename"])
        return np.asarray(Image.open(path), dtype=np.float32)

    two = image_of(prompt)
    one_photo = {**prompt, concept_id(prompt): {**concept, "inputs": {**concept["inputs"], "image": batch["inputs"]["image1"],
                                                                     "weights": "1.0"}}}
    one = image_of(one_photo)
    assert one.shape == two.shape and np.abs(one - two).mean() > 0.5


def concept_id(prompt):
    return next(k for k, n in prompt.items() if n["class_type"] == "LikenessPromptNetConcept")
