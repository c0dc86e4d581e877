"""PromptNet: the module against an independent diffusers implementation (through the converter), its file
format, S* recomputed from the current latent at every evaluation, and bad input."""
import os

import pytest
import torch
from safetensors.torch import save_file

import micro as m
from fixtures_fusion import conds, empty_latent, encode
from fixtures_promptnet import DIFFUSERS_CONFIG, DiffusersPromptNet, micro_promptnet


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.concepts import prompt_injection, promptnet_source
    from comfyui_likeness.encoders import promptnet
    from comfyui_likeness.nodes import fusion
    from comfyui_likeness.weights import promptnet_file
    return {"net": promptnet, "file": promptnet_file, "source": promptnet_source, "inject": prompt_injection,
            "fusion": fusion}


def diffusers_state_dict(ref):
    """The reference's weights under ProFusion's names (diffusers layout)."""
    return {k: v.detach().clone() for k, v in ref.state_dict().items()}


def test_converted_diffusers_promptnet_matches_its_reference_forward(lib):
    ref = DiffusersPromptNet().eval()
    net = lib["file"].convert_diffusers_promptnet(diffusers_state_dict(ref), DIFFUSERS_CONFIG)
    g = torch.Generator().manual_seed(1)
    reference, x_t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    tokens, t = torch.randn(2, 257, 32, generator=g), torch.tensor([981.0, 21.0])
    with torch.no_grad():
        want = ref(reference, x_t, t, tokens)
        got = net(reference, x_t, t, tokens)
    assert got.shape == want.shape == (2, 1, 64)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_converter_rejects_foreign_or_incomplete_checkpoints(lib):
    sd = diffusers_state_dict(DiffusersPromptNet())
    with pytest.raises(ValueError, match="no place in PromptNet"):
        lib["file"].convert_diffusers_promptnet({**sd, "text_model.embeddings.weight": torch.zeros(3)}, DIFFUSERS_CONFIG)
    with pytest.raises(ValueError, match="lacks"):
        lib["file"].convert_diffusers_promptnet({k: v for k, v in sd.items() if "mid_prompt" not in k}, DIFFUSERS_CONFIG)
    with pytest.raises(ValueError, match="region_kernel_size"):
        lib["file"].convert_diffusers_promptnet(sd, {**DIFFUSERS_CONFIG, "region_kernel_size": 8})


def test_file_round_trip_and_bad_files(lib, tmp_path):
    net = micro_promptnet()
    path = str(tmp_path / "pn.safetensors")
    lib["file"].save_promptnet(path, net)
    loaded, meta = lib["file"].load_promptnet(path)
    args = (torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 257, 32))
    with torch.no_grad():
        assert torch.equal(net(*args), loaded(*args))
    assert meta["unet_config"]["context_dim"] == m.CONTEXT
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(path, "rb").read()[:200])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        lib["file"].load_promptnet(str(cut))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a PromptNet file written by ComfyUI-Likeness"):
        lib["file"].load_promptnet(str(foreign))
    with pytest.raises(ValueError, match=r"made for SD1.x .*768.* SD2.x \(1024\)"):
        lib["file"].check_fits({"unet_config": {"context_dim": 768}, "vision_width": 1024}, context_dim=1024)
    with pytest.raises(ValueError, match="1280.*gives 1024"):
        lib["file"].check_fits({"unet_config": {"context_dim": 768}, "vision_width": 1280}, vision_width=1024)


def test_init_from_unet_copies_the_encoder_half(lib):
    net = micro_promptnet()
    unet = m.micro_model(seed=3).model.diffusion_model
    assert net.init_from_unet(unet) > 0
    assert torch.equal(net.state_dict()["input_blocks.1.1.proj_in.weight"], unet.state_dict()["input_blocks.1.1.proj_in.weight"])


@pytest.fixture(scope="module")
def sampling_setup(lib):
    import comfy.model_management
    import comfy.model_patcher

    model, clip = m.micro_model(), m.micro_clip()
    net = micro_promptnet()
    patcher = comfy.model_patcher.ModelPatcher(net, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    g = torch.Generator().manual_seed(2)
    tokens, ref_latent = torch.randn(1, 257, 32, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    source = lib["source"].PromptNetSource(patcher, tokens, ref_latent, {"unet_config": {"context_dim": m.CONTEXT}, "vision_width": 32})
    concept = source.static_concept(model, "promptnet:test")
    fused, concept_cond, context = lib["inject"].encode_likeness_prompt(clip, "a holder is smiling", concept, "holder",
                                                                        "person", 0.7)
    return {"model": model, "clip": clip, "net": net, "source": source, "fused": fused, "concept": concept_cond,
            "context": context, "negative": encode(clip, "")}


def test_s_star_is_recomputed_from_the_current_latent_at_every_evaluation(lib, sampling_setup):
    s = sampling_setup
    seen_net, seen_unet = [], []
    original = s["net"].forward

    def spy(reference, x_t, timesteps, tokens, transformer_options=None):
        out = original(reference, x_t, timesteps, tokens)
        seen_net.append((x_t.clone(), timesteps.clone(), out.clone()))
        return out

    def wrapper(apply_model, args):
        seen_unet.append((args["input"].clone(), args["timestep"].clone(), args["c"]["c_crossattn"].clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = s["model"].clone()
    model.set_model_unet_function_wrapper(wrapper)
    s["net"].forward = spy
    try:
        steps = 3
        out = lib["fusion"].ksampler_fusion(model, 5, steps, "euler", "ddim_uniform", s["negative"], s["fused"],
                                            s["concept"], s["context"], empty_latent(), 1.0, 6.0, 6.0, 3.0, 1, 1.0,
                                            True, 0.0, 1.0)["samples"]
    finally:
        s["net"].forward = original
    assert torch.isfinite(out).all()
    # one PromptNet call per evaluation that uses the concept: fusion + refinement at every step
    assert len(seen_net) == len(seen_unet) == 2 * steps
    ms = model.get_model_object("model_sampling")
    for (x_t, t, _), (x_in, sigma, _) in zip(seen_net, seen_unet):
        x = x_in[:1]  # every condition's chunk carries the same latent
        assert torch.allclose(x_t, ms.calculate_input(sigma[:1], x), atol=1e-5)
        assert torch.allclose(t, ms.timestep(sigma[:1]).float())
    s_stars = torch.stack([o for _, _, o in seen_net])
    assert (s_stars[1:] - s_stars[:-1]).abs().amax(dim=(1, 2, 3)).min() > 1e-6  # S* follows x: it changes every call
    # and the conditioning the UNet saw changes with it (rows of the fused/concept chunk)
    ctx = [c for _, _, c in seen_unet]
    assert ctx[0].shape == ctx[2].shape and not torch.allclose(ctx[0], ctx[2])


def test_plain_sampler_uses_the_static_s_star(lib, sampling_setup):
    import nodes

    s = sampling_setup
    calls = s["source"].calls
    out = nodes.KSampler().sample(s["model"], 1, 2, 5.0, "euler", "normal", s["concept"], s["negative"], empty_latent())[0]
    assert torch.isfinite(out["samples"]).all()
    assert s["source"].calls == calls  # nothing recomputed outside the Fusion Guider


def test_promptnet_for_another_model_family_is_refused(lib, sampling_setup):
    s = sampling_setup
    from comfyui_likeness.samplers.fusion_guider import FusionGuider

    other = m.micro_model(context=32)
    with pytest.raises(ValueError, match="cross-attention expects 32"):  # the conditionings' own check comes first
        lib["fusion"].build_guider(other, s["negative"], s["fused"], s["concept"], s["context"], 5.0, 5.0, 0.0)
    with pytest.raises(ValueError, match=r"PromptNet was made for .*cross-attention 64.*\(32\)"):
        FusionGuider(other).set_fusion_conds(s["negative"], s["fused"], s["concept"], s["context"])
