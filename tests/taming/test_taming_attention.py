"""The Taming Encoder's added cross-attention (docs/methods/taming-encoder.md) on the micro model through the host's
sampler: every output of every attn2 site against an independent computation from the adapter's state dict (the
subject's tokens on conditional rows, phi on unconditional rows), weight 0 / zero gates bit-identical to the
unpatched model, mask and sigma window, stacking, several reference images, every site hit, no mutation."""
import pytest
import torch

import micro as m
from fixtures_taming import (combined_tokens, expected_output, key_of, manual_attention, manual_projection,  # noqa: F401
                             micro_cv, random_adapter, random_cond, row_kinds, sample, spy_on, state_of, subject_photo,
                             taming, vision_of)


@pytest.fixture(scope="module")
def setup(taming, micro_cv):  # noqa: F811
    model = m.micro_model()
    vision = vision_of(taming, micro_cv)
    img, mask = subject_photo()
    img2, mask2 = subject_photo(seed=9)
    embedding = taming["obj"].encode_object(micro_cv, img, mask)
    two = taming["obj"].encode_object(micro_cv, torch.cat([img, img2.flip(2)]), torch.cat([mask, mask2.flip(2)]))
    adapter = random_adapter(taming, model, vision, queries=4, depth=2, seed=1, gate=0.7)
    return {"model": model, "vision": vision, "embedding": embedding, "two": two, "adapter": adapter,
            "layout": taming["layout"].attention_layout(model)}


def test_every_site_output_equals_the_independent_computation(taming, setup):
    weight = 0.6
    adapter, emb = setup["adapter"], setup["embedding"]
    patched = taming["att"].apply_taming_encoder(setup["model"], adapter, emb, weight=weight)
    spied, log = spy_on(taming, patched)
    sample(spied, random_cond(64, 1), random_cond(64, 2), steps=2, batch=2)
    state = state_of(adapter)
    tokens = manual_projection(state, adapter.module.spec, emb.features)
    kinds_seen = set()
    for e in log:
        expected = expected_output(taming, e, state, tokens, weight)
        assert torch.allclose(e["out"].double(), expected, atol=1e-4, rtol=1e-4), key_of(e["eo"])
        kinds_seen.update(row_kinds(e["eo"], e["q"].shape[0]))
    assert kinds_seen == {"cond", "uncond"}
    assert {key_of(e["eo"]) for e in log} == set(setup["layout"].keys)  # every registered site is hit


def test_uncond_rows_without_adapter(taming, setup):
    weight = 1.3
    adapter, emb = setup["adapter"], setup["embedding"]
    patched = taming["att"].apply_taming_encoder(setup["model"], adapter, emb, weight=weight, uncond="no adapter")
    spied, log = spy_on(taming, patched)
    sample(spied, random_cond(64, 1), random_cond(64, 2), steps=1)
    state = state_of(adapter)
    tokens = manual_projection(state, adapter.module.spec, emb.features)
    assert log
    for e in log:
        expected = expected_output(taming, e, state, tokens, weight, uncond="no adapter")
        assert torch.allclose(e["out"].double(), expected, atol=1e-4, rtol=1e-4)


def test_weight_zero_is_bit_identical_to_the_unpatched_model(taming, setup):
    model = setup["model"]
    pos, neg = random_cond(64, 1), random_cond(64, 2)
    ref = sample(model, pos, neg, steps=3)
    off = taming["att"].apply_taming_encoder(model, setup["adapter"], setup["embedding"], weight=0.0)
    assert off is model  # weight 0 registers nothing (docs/stacking.md)
    assert torch.equal(sample(off, pos, neg, steps=3), ref)
    on = taming["att"].apply_taming_encoder(model, setup["adapter"], setup["embedding"], weight=0.5)
    assert not torch.allclose(sample(on, pos, neg, steps=3), ref)


def test_zero_gates_at_training_start_are_bit_identical(taming, setup):
    """At the start of training: K/V copied from attn2's to_k/to_v and gates at 0: the adapted model starts as the base model."""
    model, layout = setup["model"], setup["layout"]
    spec = setup["adapter"].module.spec
    module = taming["enc"].TamingEncoder(spec, dtype=torch.float32, device="cpu").init_from_model(model, layout)
    sd = model.model.diffusion_model.state_dict()
    for site in layout.sites:
        assert torch.equal(module.layers[site.name].to_k.weight, sd[f"{site.path}.attn2.to_k.weight"])
        assert torch.equal(module.layers[site.name].to_v.weight, sd[f"{site.path}.attn2.to_v.weight"])
        assert float(module.layers[site.name].gate.detach()) == 0.0
    zeros = torch.zeros(1, spec.vision.tokens, spec.vision.hidden_size)
    assert torch.allclose(module.null_tokens, module.project(zeros))  # phi starts as the projection of zeros
    adapter = taming["file"].TamingAdapter(module, "fresh")
    pos, neg = random_cond(64, 1), random_cond(64, 2)
    patched = taming["att"].apply_taming_encoder(model, adapter, setup["embedding"], weight=1.0)
    assert torch.equal(sample(patched, pos, neg, steps=2), sample(model, pos, neg, steps=2))


def test_attention_mask_limits_the_term_to_the_masked_tokens(taming, setup):
    weight = 1.0
    adapter, emb = setup["adapter"], setup["embedding"]
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half
    patched = taming["att"].apply_taming_encoder(setup["model"], adapter, emb, weight=weight, mask=mask)
    spied, log = spy_on(taming, patched)
    sample(spied, random_cond(64, 1), random_cond(64, 2), steps=1)
    state = state_of(adapter)
    tokens = manual_projection(state, adapter.module.spec, emb.features)
    for e in log:
        h, w = e["eo"]["activations_shape"][-2:]
        left = (torch.arange(h * w) % w < w // 2).double()[:, None]  # the mask at this block's token grid
        expected = expected_output(taming, e, state, tokens, weight, row_factor=lambda e, r: left)
        assert torch.allclose(e["out"].double(), expected, atol=1e-4, rtol=1e-4)
        base = manual_attention(e["q"], e["k"], e["v"], e["eo"]["n_heads"])
        right = left[:, 0] == 0
        assert torch.allclose(e["out"].double()[:, right], base[:, right], atol=1e-5)
        assert not torch.allclose(e["out"].double()[:, ~right], base[:, ~right], atol=1e-3)


def test_sigma_window(taming, setup):
    model = setup["model"]
    ms = model.get_model_object("model_sampling")
    start = 0.3
    patched = taming["att"].apply_taming_encoder(model, setup["adapter"], setup["embedding"], weight=0.9,
                                                 start_percent=start, end_percent=1.0)
    spied, log = spy_on(taming, patched)
    sample(spied, random_cond(64, 1), random_cond(64, 2), steps=4)
    threshold = float(ms.percent_to_sigma(start))
    state = state_of(setup["adapter"])
    tokens = manual_projection(state, setup["adapter"].module.spec, setup["embedding"].features)
    seen = {"in": 0, "out": 0}
    for e in log:
        inside = float(e["eo"]["sigmas"][0]) <= threshold
        seen["in" if inside else "out"] += 1
        expected = expected_output(taming, e, state, tokens, 0.9 if inside else 0.0)
        assert torch.allclose(e["out"].double(), expected, atol=1e-4, rtol=1e-4)
    assert seen["in"] and seen["out"]


def test_several_images_average_concat_or_norm_average(taming, setup):
    adapter, two = setup["adapter"], setup["two"]
    state = state_of(adapter)
    per_image = manual_projection(state, adapter.module.spec, two.features)
    assert per_image.shape[0] == 2
    for combine in taming["att"].COMBINES:
        tokens = combined_tokens(per_image, combine)
        patched = taming["att"].apply_taming_encoder(setup["model"], adapter, two, weight=0.8, combine=combine)
        spied, log = spy_on(taming, patched)
        sample(spied, random_cond(64, 1), random_cond(64, 2), steps=1)
        assert log
        for e in log:
            # uncond rows see phi once: repeating phi to the concatenated length must not change the result
            expected = expected_output(taming, e, state, tokens, 0.8)
            assert torch.allclose(e["out"].double(), expected, atol=1e-4, rtol=1e-4), combine


def test_norm_average_keeps_the_photos_mean_norm(taming):
    """norm average = the mean rescaled token by token to the mean of the photos' norms; average shrinks when the
    photos disagree, norm average does not; one photo is left as it is by every mode."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 5, 16, generator=g)
    t[1] *= 4.0
    out = taming["att"].combine_tokens(t, "norm average")
    mean = t.mean(0)
    assert torch.allclose(out[0].norm(dim=-1), t.norm(dim=-1).mean(0), atol=1e-5)
    assert torch.allclose(torch.nn.functional.cosine_similarity(out[0], mean, dim=-1), torch.ones(5), atol=1e-6)
    assert bool((taming["att"].combine_tokens(t, "average")[0].norm(dim=-1) < t.norm(dim=-1).mean(0)).all())
    for combine in taming["att"].COMBINES:
        assert torch.equal(taming["att"].combine_tokens(t[:1], combine), t[:1])
    with pytest.raises(ValueError, match="combine must be one of average, concat, norm average"):
        taming["att"].combine_tokens(t, "sum")


def test_two_adapters_stack_on_the_same_sites(taming, setup):
    model, emb = setup["model"], setup["embedding"]
    a1, a2 = setup["adapter"], random_adapter(taming, model, setup["vision"], queries=0, seed=4, gate=0.5)
    patched = taming["att"].apply_taming_encoder(model, a1, emb, weight=0.6)
    patched = taming["att"].apply_taming_encoder(patched, a2, emb, weight=0.4)
    assert all(len(d.contributions) == 2 for d in taming["d"].dispatchers(patched, "attn2").values())
    spied, log = spy_on(taming, patched)
    sample(spied, random_cond(64, 1), random_cond(64, 2), steps=1)
    s1, s2 = state_of(a1), state_of(a2)
    t1 = manual_projection(s1, a1.module.spec, emb.features)
    t2 = manual_projection(s2, a2.module.spec, emb.features)
    assert t2.shape[1] == emb.features.shape[1]  # queries = 0: every CLIP token is an object token
    for e in log:
        base = manual_attention(e["q"], e["k"], e["v"], e["eo"]["n_heads"])
        term1 = expected_output(taming, e, s1, t1, 0.6) - base
        term2 = expected_output(taming, e, s2, t2, 0.4) - base
        expected = base + term1 + term2
        assert torch.allclose(e["out"].double(), expected, atol=1e-4, rtol=1e-4)


def test_apply_clones_and_leaves_the_input_model_alone(taming, setup):
    model = setup["model"]
    before = repr(model.model_options)
    patched = taming["att"].apply_taming_encoder(model, setup["adapter"], setup["embedding"], weight=1.0)
    assert patched is not model and repr(model.model_options) == before
    assert not taming["d"].dispatchers(model)
    # the adapter's weights travel with the model so the host loads and offloads them with the UNet
    assert all(setup["adapter"].patcher in d.models() for d in taming["d"].dispatchers(patched).values())
    other = taming["enc"].VisionSpec(48, 257, 24)
    bad = random_adapter(taming, model, other, queries=2, depth=1)
    with pytest.raises(ValueError, match="48 wide.*32 wide"):
        taming["att"].apply_taming_encoder(patched, bad, setup["embedding"], weight=1.0)
    assert repr(model.model_options) == before


def test_deeper_layouts_get_every_block(taming, setup, micro_cv):  # noqa: F811
    """Sites come from the model: three levels, two transformer blocks per SpatialTransformer, context 96."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = m.unet_config(context=96)
    config.update({"num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [2, 2, 2],
                   "transformer_depth_output": [2] * 6, "transformer_depth_middle": 2})
    sd_config = comfy.supported_models.SD15(config)
    sd_config.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(sd_config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    m._fill(base.diffusion_model, 3)
    model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                             offload_device=mm.unet_offload_device())
    layout = taming["layout"].attention_layout(model)
    assert any(k[2] == 1 for k in layout.keys) and layout.context_dim == 96
    adapter = random_adapter(taming, model, setup["vision"], queries=3, depth=1, seed=2)
    patched = taming["att"].apply_taming_encoder(model, adapter, setup["embedding"], weight=0.7)
    spied, log = spy_on(taming, patched)
    sample(spied, random_cond(96, 1), random_cond(96, 2), steps=1)
    assert {key_of(e["eo"]) for e in log} == set(layout.keys)
    state = state_of(adapter)
    tokens = manual_projection(state, adapter.module.spec, setup["embedding"].features)
    for e in log:
        assert torch.allclose(e["out"].double(), expected_output(taming, e, state, tokens, 0.7), atol=1e-4, rtol=1e-4)
