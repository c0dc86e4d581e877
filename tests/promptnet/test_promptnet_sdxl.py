"""PromptNet on SDXL's UNet encoder half (micro SDXL from the host's classes) and on v-prediction models: the label
embedding takes PromptNet's own `y` (size conditioning, zero text vector), S* has one part per text encoder, the
Fusion Guider re-encodes context, pooled output and the UNet's `y` from S* at every evaluation, the file keeps the
layout, and pre-training runs the same path on SDXL."""
import os

import pytest
import torch

import micro as m
from fixtures_fusion import empty_latent, encode
from fixtures_promptnet import micro_promptnet, micro_sdxl_promptnet, promptnet_patcher
from fixtures_train import assert_learns, fixed_batch, write_folder

L, G = m.SDXL_L_WIDTH, m.SDXL_G_WIDTH


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.concepts import prompt_injection, promptnet_source
    from comfyui_likeness.encoders import promptnet
    from comfyui_likeness.samplers import ksampler_fusion
    from comfyui_likeness.weights import promptnet_file
    return {"net": promptnet, "file": promptnet_file, "source": promptnet_source, "inject": prompt_injection,
            "ks": ksampler_fusion}


def inputs(batch=2, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.randn(batch, 4, size, size, generator=g),
            torch.tensor([900.0, 30.0][:batch]), torch.randn(batch, 257, 32, generator=g))


def test_module_takes_y_and_gives_one_part_per_encoder(lib, tmp_path):
    net = micro_sdxl_promptnet()
    assert net.label_emb is not None and net.adm_channels == m.SDXL_ADM and net.prompt_widths == [L, G]
    y = torch.randn(2, m.SDXL_ADM, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s = net(*inputs(), y=y)
        other = net(*inputs(), y=y.flip(0))
    assert s.shape == (2, 1, L + G) and not torch.allclose(s, other)      # y reaches the body
    parts = net.split(s)
    assert parts[L].shape == (2, 1, L) and torch.equal(torch.cat([parts[L], parts[G]], -1), s)
    with pytest.raises(ValueError, match=f"needs the {m.SDXL_ADM}-wide vector conditioning"):
        net(*inputs())
    path = str(tmp_path / "pn_sdxl.safetensors")
    lib["file"].save_promptnet(path, net)
    loaded, meta = lib["file"].load_promptnet(path)
    assert meta["prompt_widths"] == [L, G] and meta["unet_config"]["num_classes"] == "sequential"
    with torch.no_grad():
        assert torch.equal(loaded(*inputs(), y=y), s)
    unet = m.micro_sdxl_model(seed=3).model.diffusion_model
    assert net.init_from_unet(unet) > 0
    assert torch.equal(net.state_dict()["label_emb.0.0.weight"], unet.state_dict()["label_emb.0.0.weight"])


def test_promptnet_y_is_the_models_size_embedding_with_a_zero_text_vector(lib):
    model = m.micro_sdxl_model()
    size = {"width": 192, "height": 256, "crop_w": 8, "crop_h": 0, "target_width": 384, "target_height": 512}
    y = lib["source"].promptnet_y(model, m.SDXL_ADM, 3, size)
    want = model.model.encode_adm(pooled_output=torch.zeros(1, G), device="cpu", **size)
    assert y.shape == (3, m.SDXL_ADM) and torch.equal(y, want.repeat(3, 1))
    assert lib["source"].promptnet_y(m.micro_model(), None, 3, size) is None
    with pytest.raises(ValueError, match="vector conditioning"):
        lib["source"].promptnet_y(m.micro_model(), m.SDXL_ADM, 1, size)


def sdxl_setup(lib, v_prediction=False):
    model, clip = m.micro_sdxl_model(v_prediction=v_prediction), m.micro_sdxl_clip()
    net = micro_sdxl_promptnet()
    g = torch.Generator().manual_seed(4)
    source = lib["source"].PromptNetSource(promptnet_patcher(net), torch.randn(1, 257, 32, generator=g),
                                           torch.randn(1, 4, 8, 8, generator=g),
                                           {"unet_config": {"context_dim": m.SDXL_CONTEXT}, "vision_width": 32})
    concept = source.static_concept(model, "promptnet:sdxl")
    fused, conc, context = lib["inject"].encode_likeness_prompt(clip, "a holder is smiling", concept, "holder",
                                                                "person", 0.7)
    return {"model": model, "clip": clip, "net": net, "source": source, "concept": concept, "fused": fused,
            "conc": conc, "context": context, "negative": encode(clip, "")}


@pytest.mark.parametrize("v_prediction", [False, True], ids=["eps", "v_pred"])
def test_guider_re_encodes_context_pooled_and_y_from_s_star(lib, v_prediction):
    """Every fused/concept row the UNet sees carries the context, pooled output and y of the prompt encoded with
    the S* PromptNet gave at that evaluation (computed here as a static concept), and PromptNet got its own y."""
    from comfyui_likeness.concepts.concept import LikenessConcept

    s = sdxl_setup(lib, v_prediction)
    assert sorted(s["concept"].vectors) == [L, G]
    calls, rows = [], []
    original = s["net"].forward

    def spy(reference, x_t, timesteps, tokens, transformer_options=None, y=None):
        out = original(reference, x_t, timesteps, tokens, y=y)
        calls.append((y.clone(), out.clone()))
        return out

    def wrapper(apply_model, args):
        rows.append((args["c"]["c_crossattn"].clone(), args["c"]["y"].clone(), list(args["cond_or_uncond"])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = s["model"].clone()
    model.set_model_unet_function_wrapper(wrapper)
    s["net"].forward = spy
    try:
        out = lib["ks"].ksampler_fusion(model, 5, 2, "euler", "ddim_uniform", s["negative"], s["fused"], s["conc"],
                                        s["context"], empty_latent(), 1.0, 6.0, 6.0, 3.0, 1, 1.0, True, 0.0,
                                        1.0)["samples"]
    finally:
        s["net"].forward = original
    assert torch.isfinite(out).all() and len(calls) == len(rows) == 4     # fusion + refinement, 2 steps
    size = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
    net_y = s["model"].model.encode_adm(pooled_output=torch.zeros(1, G), device="cpu", **size)
    for i, ((y_seen, s_star), (ctx, y, order)) in enumerate(zip(calls, rows)):
        assert torch.allclose(y_seen, net_y)                              # PromptNet's y: sizes, no text
        gamma = 0.7 if i % 2 == 0 else 1.0                                # even calls: fusion stage (fused)
        vec = s["net"].split(s_star[0])
        static = LikenessConcept(vectors=vec, space="hidden")
        fused, conc, _ = lib["inject"].encode_likeness_prompt(s["clip"], "a holder is smiling", static, "holder",
                                                              "person", gamma)
        want = fused if gamma != 1.0 else conc
        row = order.index(1)                                              # index 1: the condition with S*
        assert torch.allclose(ctx[row:row + 1], want[0][0], atol=1e-5)
        want_y = s["model"].model.encode_adm(pooled_output=want[0][1]["pooled_output"], device="cpu", **size)
        assert torch.allclose(y[row:row + 1], want_y, atol=1e-5)
        assert not torch.allclose(y[order.index(0)], y[row])              # the negative keeps its own pooled output
    assert not torch.allclose(calls[0][1], calls[2][1])                   # S* follows x_t


def test_sd2_768_v_prediction_promptnet_sampling(lib):
    """SD2-768 is v-prediction: PromptNet gets exactly the model's c_in-scaled x and its timestep there too."""
    model, clip = m.micro_model(v_prediction=True), m.micro_clip()
    net = micro_promptnet()
    seen, unet = [], []
    original = net.forward

    def spy(reference, x_t, timesteps, tokens, transformer_options=None):
        seen.append((x_t.clone(), timesteps.clone()))
        return original(reference, x_t, timesteps, tokens)

    def wrapper(apply_model, args):
        unet.append((args["input"][:1].clone(), args["timestep"][:1].clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    source = lib["source"].PromptNetSource(promptnet_patcher(net), torch.randn(1, 257, 32), torch.randn(1, 4, 8, 8),
                                           {"unet_config": {"context_dim": m.CONTEXT}, "vision_width": 32})
    concept = source.static_concept(model, "promptnet:v")
    fused, conc, context = lib["inject"].encode_likeness_prompt(clip, "a holder", concept, "holder", "person", 0.7)
    patched = model.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    net.forward = spy
    try:
        out = lib["ks"].ksampler_fusion(patched, 1, 2, "euler", "ddim_uniform", encode(clip, ""), fused, conc, context,
                                        empty_latent(seed=1), 0.8, 6.0, 6.0, 3.0, 1, 1.0, True, 0.0, 1.0)["samples"]
    finally:
        net.forward = original
    assert torch.isfinite(out).all() and len(seen) == len(unet) == 4
    ms = model.get_model_object("model_sampling")
    for (x_t, t), (x, sigma) in zip(seen, unet):
        assert torch.allclose(x_t, ms.calculate_input(sigma, x), atol=1e-6)
        assert torch.allclose(t, ms.timestep(sigma).float())


def test_pretraining_on_sdxl_is_the_sampling_path_with_gradients(lib, tmp_path):
    """One PromptNetStep on SDXL equals the loss computed directly: PromptNet with its y, the prompt encoded with
    S* (both encoders), the UNet with the y of that prompt's pooled output and the image size; training learns."""
    from comfyui_likeness.train import diffusion, loop, profusion
    from comfyui_likeness.train.base_models import BaseModels
    from comfyui_likeness.train.data import scan_images

    base = BaseModels(m.micro_sdxl_model(), m.micro_sdxl_clip(), m.micro_vae(), m.micro_clip_vision(), "micro-sdxl")
    records = scan_images(write_folder(str(tmp_path / "data"), ("a",), per=2))
    trainer = profusion.PromptNetPretrainer(base, {"region_channels": 8}, records, resolution=64)
    trainer.setup()
    try:
        net = trainer.net
        assert net.prompt_widths == [L, G] and net.label_emb is not None
        batch = trainer.prepare_batch(fixed_batch(trainer), torch.Generator().manual_seed(0))
        with diffusion.gradients_on():
            got = float(trainer.module(batch)["loss"].detach())
            size = {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
            x_vp, t = lib["source"].promptnet_inputs(trainer.train_patcher, batch["x_t"], batch["sigma"], 8)
            y_net = lib["source"].promptnet_y(trainer.train_patcher, m.SDXL_ADM, 2, size)
            s_star = net(batch["reference"], x_vp, t, batch["tokens"], y=y_net)
            context, pooled = trainer.prompt.dynamic.encode_with_pooled(net.split(s_star.detach()))
            y = trainer.train_patcher.model.encode_adm(pooled_output=pooled, device="cpu", **size)
            denoised = diffusion.denoise(trainer.train_patcher, batch["x_t"], batch["sigma"], context, y=y)
            want = float(diffusion.eps_loss(diffusion.eps_from_denoised(batch["x_t"], batch["sigma"], denoised),
                                            batch["noise"]))
        assert abs(got - want) < 1e-5 * max(1.0, abs(want))
        assert_learns(loop.overfit_losses(trainer, fixed_batch(trainer), 5, 1e-3), "PromptNet pre-training on SDXL")
        path = trainer.export(str(tmp_path / "out"))
    finally:
        trainer.close()
    loaded, meta = lib["file"].load_promptnet(path)
    assert meta["prompt_widths"] == [L, G] and os.path.isfile(path)
    lib["file"].check_fits(meta, context_dim=m.SDXL_CONTEXT, vision_width=32)


@pytest.mark.parametrize("size", [6, 12, 16])
def test_fit_latent_resamples_and_reports_the_noise_gain(lib, size):
    """SD2-768 / SDXL latents are larger than a 512-px PromptNet's: area averaging when shrinking, linear
    interpolation when enlarging (the host's own interpolate modes), and the gain k is the rms noise std after it."""
    import torch.nn.functional as F

    x = torch.randn(64, 4, size, size, generator=torch.Generator().manual_seed(size))
    out, gain = lib["net"].fit_latent(x, 8)
    mode = {"mode": "area"} if size > 8 else {"mode": "bilinear", "align_corners": False}
    assert out.shape == (64, 4, 8, 8) and torch.allclose(out, F.interpolate(x, size=(8, 8), **mode), atol=1e-6)
    assert abs(float(out.std()) - gain) < 0.02 and gain < 1.0
    same = torch.randn(1, 4, 8, 8)
    kept, unit = lib["net"].fit_latent(same, 8)
    assert kept is same and unit == 1.0


def test_promptnet_is_told_the_noise_level_it_sees_after_the_resize(lib):
    """A 16x16 latent fitted to an 8x8 PromptNet: area averaging halves the noise, so PromptNet gets
    c_in(sigma / 2) * area(x) and timestep(sigma / 2)."""
    import torch.nn.functional as F

    model, net = m.micro_model(), micro_promptnet()
    seen = []
    original = net.forward

    def spy(reference, x_t, timesteps, tokens, transformer_options=None):
        seen.append((x_t.clone(), timesteps.clone()))
        return original(reference, x_t, timesteps, tokens)

    net.forward = spy
    source = lib["source"].PromptNetSource(promptnet_patcher(net), torch.randn(1, 257, 32), torch.randn(1, 4, 8, 8),
                                           {"unet_config": {"context_dim": m.CONTEXT}, "vision_width": 32})
    x, sigma = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3)) * 3.0, torch.tensor([3.0])
    source(x, sigma, model)
    ms = model.get_model_object("model_sampling")
    half = sigma / 2
    assert torch.allclose(seen[0][0], ms.calculate_input(half, F.interpolate(x, size=(8, 8), mode="area")), atol=1e-6)
    assert torch.allclose(seen[0][1], ms.timestep(half).float())
