"""Inv-Adapter on the micro SDXL architecture (two text encoders, the vector conditioning `y`, transformer depth 2,
attention from the second level on) and on an SD2-768-style model (v-prediction, linear transformer projections,
64-channel heads): weight 0 equals the unpatched model, the processors equal an independent computation at these
shapes, the reference branch's `y` equals a direct computation, cached and live features agree, and the EAA
layout follows SDXL's blocks."""
import pytest
import torch

import fixtures_inv_adapter as fia
import micro as m
from fixtures_inv_adapter import face_image, manual_attention, random_cond, sample

SIZE = 64  # reference size: an 8 x 8 reference latent


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.attention import dispatcher, inv_adapter, reference_features
    from comfyui_likeness.core import layout
    from comfyui_likeness.encoders import embedded_attention_adapter
    from comfyui_likeness.weights import eaa
    return {"d": dispatcher, "ia": inv_adapter, "rf": reference_features, "layout": layout,
            "eaa_module": embedded_attention_adapter, "eaa": eaa}


@pytest.fixture(scope="module")
def sdxl(lib):
    model, clip, vae = m.micro_sdxl_model(), m.micro_sdxl_clip(), m.micro_vae()
    # The caption as CLIPTextEncodeSDXL writes it for a 1024 image: the reference branch must use its own size.
    caption = m.sdxl_conditioning(clip, "a photo of a face", width=1024, height=1024)
    pos = m.sdxl_conditioning(clip, "a person in a garden", width=64, height=64)
    neg = m.sdxl_conditioning(clip, "blurry", width=64, height=64)
    feats = lib["ia"].extract_inv_features(model, vae, face_image(), caption, 3, size=SIZE, feature_dtype=torch.float32)
    layout = lib["layout"].attention_layout(model)
    spec = lib["eaa_module"].EAASpec.for_layout(layout, feats.reference_latent, s_c=8)
    adapter = lib["eaa_module"].EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu").init_random(2)
    return {"model": model, "clip": clip, "vae": vae, "caption": caption, "pos": pos, "neg": neg, "feats": feats,
            "layout": layout, "adapter": adapter}


def record_y(model):
    """Every (batch, y) the diffusion model is called with, through a forward pre-hook."""
    seen = []
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args[0].shape[0], kwargs.get("y"))), with_kwargs=True)
    return seen, handle


def direct_reference_y(sdxl):
    """The host's own y for the caption at the reference size (CLIPTextEncodeSDXL at size x size)."""
    cond = m.sdxl_conditioning(sdxl["clip"], "a photo of a face", width=SIZE, height=SIZE)
    return sdxl["model"].model.extra_conds(**cond[0][1], cross_attn=cond[0][0], device="cpu")["y"].cond


def test_the_reference_branch_y_equals_a_direct_computation(lib, sdxl):
    want = direct_reference_y(sdxl)
    wrong = sdxl["model"].model.extra_conds(**sdxl["caption"][0][1], cross_attn=sdxl["caption"][0][0], device="cpu")["y"].cond
    assert not torch.allclose(want, wrong)  # the caption's own 1024 size is not the reference's
    seen, handle = record_y(sdxl["model"])
    try:
        feats = lib["ia"].extract_inv_features(sdxl["model"], sdxl["vae"], face_image(), sdxl["caption"], 3, size=SIZE,
                                               store="none")
        assert torch.equal(feats.y, want)
        assert len(seen) == 4 and all(torch.allclose(y, want) for _, y in seen)  # T + 1 inversion evaluations
        seen.clear()
        patched = lib["ia"].apply_inv_adapter(sdxl["model"], feats, weight=1.0)
        sample(patched, sdxl["pos"], sdxl["neg"], steps=4)  # another step count: live passes between grid points
    finally:
        handle.remove()
    live = [y for batch, y in seen if batch == 1]
    generation = [y for batch, y in seen if batch == 2]
    assert live and generation
    assert all(torch.allclose(y, want) for y in live)
    gen_y = sdxl["model"].model.extra_conds(**sdxl["pos"][0][1], cross_attn=sdxl["pos"][0][0], device="cpu")["y"].cond
    assert all(any(torch.allclose(row, gen_y[0]) for row in y) for y in generation)  # the prompt's own y


def test_weight_zero_equals_the_unpatched_model(lib, sdxl):
    ref = sample(sdxl["model"], sdxl["pos"], sdxl["neg"], steps=3)
    for adapter in (None, sdxl["adapter"]):
        zero = lib["ia"].apply_inv_adapter(sdxl["model"], sdxl["feats"], adapter=adapter, weight=0.0)
        assert torch.equal(sample(zero, sdxl["pos"], sdxl["neg"], steps=3), ref)
    one = lib["ia"].apply_inv_adapter(sdxl["model"], sdxl["feats"], weight=1.0)
    assert not torch.allclose(sample(one, sdxl["pos"], sdxl["neg"], steps=3), ref, atol=1e-4)


@pytest.mark.parametrize("trained", [False, True], ids=["training_free", "trained"])
def test_processors_equal_an_independent_computation_at_sdxl_shapes(lib, sdxl, trained):
    weight = 0.7
    adapter = sdxl["adapter"] if trained else None
    patched = lib["ia"].apply_inv_adapter(sdxl["model"], sdxl["feats"], adapter=adapter, weight=weight)
    spied, log = fia.spy_on(lib["d"], patched)
    sample(spied, sdxl["pos"], sdxl["neg"], steps=3)
    sd = {k: v.double() for k, v in sdxl["model"].model.diffusion_model.state_dict().items()}
    state = {k: v.double() for k, v in sdxl["adapter"].state_dict().items()} if trained else None
    hit = set()
    for e in log:
        site, key = fia.call_site(e)
        aggregate, Wk, Wv = fia.eaa_projection(site, key, sdxl["layout"], sd, state)
        F = aggregate(fia.handed_features(lib["rf"], e["eo"], site, key))
        heads = e["eo"]["n_heads"]
        expected = manual_attention(e["q"], e["k"], e["v"], heads) + weight * manual_attention(e["q"], F @ Wk.t(), F @ Wv.t(), heads)
        assert torch.allclose(e["out"].double(), expected, atol=1e-5, rtol=1e-4), (site, key)
        hit.add((site, key))
    want = {("attn1", s.key) for s in sdxl["layout"].sites}
    if trained:
        want |= {("attn2", s.key) for s in sdxl["layout"].sites}
    assert hit == want
    assert any(key[2] == 1 for _, key in hit)  # transformer depth 2: the second block of each transformer


def test_cached_and_live_features_agree_on_sdxl(lib, sdxl):
    from dataclasses import replace

    live = replace(sdxl["feats"], features=None, uid="live")
    for adapter in (None, sdxl["adapter"]):
        a = sample(lib["ia"].apply_inv_adapter(sdxl["model"], sdxl["feats"], adapter=adapter, weight=1.0), sdxl["pos"], sdxl["neg"])
        b = sample(lib["ia"].apply_inv_adapter(sdxl["model"], live, adapter=adapter, weight=1.0), sdxl["pos"], sdxl["neg"])
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_eaa_layout_follows_sdxl_blocks(lib, sdxl, tmp_path):
    layout, spec = sdxl["layout"], sdxl["adapter"].spec
    # micro SDXL: no attention on the first level, two transformer blocks per SpatialTransformer on the others
    assert {s.downscale for s in layout.sites} == {2, 4}
    assert {k[2] for k in layout.keys} == {0, 1}
    assert set(spec.blocks) == {s.name for s in layout.sites}
    for s in layout.sites:
        b = spec.blocks[s.name]
        assert (b["width"], b["inner"], b["tokens"]) == (s.query_dim, s.inner_dim, (8 // s.downscale) ** 2)
    assert spec.context_dim == m.SDXL_CONTEXT
    init = lib["eaa_module"].EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu")
    init.init_from_model(sdxl["model"], layout)
    sd = sdxl["model"].model.diffusion_model.state_dict()
    for s in layout.sites:
        assert torch.equal(init.layer(s.key).cross_k.weight, sd[f"{s.path}.attn1.to_k.weight"])
    path = lib["eaa"].save_eaa(str(tmp_path / "sdxl.safetensors"), sdxl["adapter"], origin="random")
    loaded = lib["eaa"].load_eaa(path)
    lib["eaa"].check_eaa_for_model(loaded.spec, layout)
    with pytest.raises(ValueError, match="built for SDXL"):
        lib["eaa"].check_eaa_for_model(loaded.spec, lib["layout"].attention_layout(m.micro_model()))


def test_sdxl_caption_without_pooled_output_is_refused(lib, sdxl):
    bare = [[sdxl["caption"][0][0], {}]]
    with pytest.raises(ValueError, match="caption has no pooled text output"):
        lib["ia"].extract_inv_features(sdxl["model"], sdxl["vae"], face_image(), bare, 2, size=SIZE)


# --- SD2-768 (v-prediction) ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd2v(lib):
    model, vae = fia.micro_sd2_v(), m.micro_vae()
    feats = lib["ia"].extract_inv_features(model, vae, face_image(), random_cond(64, 7), 3, size=SIZE,
                                           feature_dtype=torch.float32)
    return {"model": model, "feats": feats, "pos": random_cond(64, 1), "neg": random_cond(64, 2)}


def test_v_prediction_trajectory_is_the_inversion(lib, sd2v):
    f, model = sd2v["feats"], sd2v["model"]
    assert model.model.model_type.name == "V_PREDICTION"
    for i in range(f.steps):
        assert torch.allclose(f.latents[i] + (f.sigmas[i + 1] - f.sigmas[i]) * f.eps[i], f.latents[i + 1], atol=1e-5)
    # eps is the host's eps for a v model: (x - D(x, sigma)) / sigma, at the evaluated point
    import comfy.model_management
    comfy.model_management.load_models_gpu([model])
    k = 2
    x, sigma = f.latents[k], float(f.sigmas[k])
    denoised = model.model.apply_model(x, torch.tensor([sigma]), c_crossattn=f.caption)
    assert torch.allclose((x - denoised) / sigma, f.eps[k], atol=1e-4, rtol=1e-4)


def test_v_prediction_processor_cache_live_and_weight_zero(lib, sd2v):
    from dataclasses import replace

    model, feats = sd2v["model"], sd2v["feats"]
    ref = sample(model, sd2v["pos"], sd2v["neg"], steps=3)
    assert torch.equal(sample(lib["ia"].apply_inv_adapter(model, feats, weight=0.0), sd2v["pos"], sd2v["neg"], steps=3), ref)
    patched = lib["ia"].apply_inv_adapter(model, feats, weight=0.9)
    spied, log = fia.spy_on(lib["d"], patched)
    out = sample(spied, sd2v["pos"], sd2v["neg"], steps=3)
    sd = {k: v.double() for k, v in model.model.diffusion_model.state_dict().items()}
    layout = lib["layout"].attention_layout(model)
    assert log
    for e in log:
        site, key = fia.call_site(e)
        path = layout.site(key).path
        F = fia.handed_features(lib["rf"], e["eo"], site, key)
        Kp, Vp = F @ sd[f"{path}.attn1.to_k.weight"].t(), F @ sd[f"{path}.attn1.to_v.weight"].t()
        heads = e["eo"]["n_heads"]
        assert heads == layout.site(key).inner_dim // 64
        expected = manual_attention(e["q"], e["k"], e["v"], heads) + 0.9 * manual_attention(e["q"], Kp, Vp, heads)
        assert torch.allclose(e["out"].double(), expected, atol=1e-5, rtol=1e-4), key
    live = lib["ia"].apply_inv_adapter(model, replace(feats, features=None, uid="live"), weight=0.9)
    assert torch.allclose(sample(live, sd2v["pos"], sd2v["neg"], steps=3), out, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, ref, atol=1e-4)
