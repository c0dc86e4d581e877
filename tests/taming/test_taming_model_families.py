"""The Taming Encoder on SDXL and SD2-768 (issue 13), through the host's sampler on micro models built from the
host's classes: SDXL (two text encoders, the pooled output and size conditioning in `y`, three levels, transformer
depth 2) with CLIP vision towers of ViT-H/14 and ViT-bigG/14 depth, and SD2-768 (v-prediction, linear
transformer projections, 64-channel heads, context 96). Weight 0 is bit-identical to the unpatched model; every
attn2 output equals an independent computation from the adapter's tensors; each combine mode of several photos
equals its direct computation. SD2-base (eps) runs the same checks."""
import pytest
import torch

import micro as m
from fixtures_taming import (combined_tokens, expected_output, key_of, manual_projection, micro_sd2_768,  # noqa: F401
                             random_adapter, random_cond, sample, spy_on, state_of, subject_photo, taming, vision_of)

FAMILIES = {"sdxl-vit-h": ("sdxl", 32), "sdxl-vit-bigg": ("sdxl", 48), "sd2-768-v": ("sd2_768", 32),
            "sd2-base": ("sd2_base", 32)}


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, taming):  # noqa: F811
    kind, layers = FAMILIES[request.param]
    cv = m.micro_clip_vision(layers=layers)
    if kind == "sdxl":
        model, clip = m.micro_sdxl_model(), m.micro_sdxl_clip()
        conds = (m.sdxl_conditioning(clip, "a photo of a dog on the beach", 64, 64),
                 m.sdxl_conditioning(clip, "blurry", 64, 64))
    else:
        model = micro_sd2_768(v_prediction=kind == "sd2_768")
        conds = (random_cond(96, 1), random_cond(96, 2))
    img, mask = subject_photo()
    img2, mask2 = subject_photo(seed=9)
    vision = vision_of(taming, cv)
    return {"name": request.param, "model": model, "conds": conds, "vision": vision, "layers": layers,
            "one": taming["obj"].encode_object(cv, img, mask),
            "two": taming["obj"].encode_object(cv, torch.cat([img, img2.flip(2)]), torch.cat([mask, mask2.flip(2)])),
            "adapter": random_adapter(taming, model, vision, queries=4, depth=2, seed=3, gate=0.7),
            "layout": taming["layout"].attention_layout(model)}


def test_the_family_is_what_it_claims(family):
    layout, model = family["layout"], family["model"]
    assert family["vision"].layers == family["layers"]
    if family["name"].startswith("sdxl"):
        assert layout.model_name == "SDXL" and model.model.model_config.unet_config["adm_in_channels"] == m.SDXL_ADM
        assert any(k[2] == 1 for k in layout.keys)                       # transformer depth above 1
    else:
        assert layout.model_type == ("V_PREDICTION" if family["name"] == "sd2-768-v" else "EPS")
        assert layout.model_name == "SD20" and layout.context_dim == 96
        assert {s.heads for s in layout.sites} == {1, 2}                 # heads follow each level's width
    spec = family["adapter"].module.spec
    assert set(spec.blocks) == {s.name for s in layout.sites} and spec.context_dim == layout.context_dim


def test_weight_zero_is_bit_identical_to_the_unpatched_model(taming, family):  # noqa: F811
    model, conds = family["model"], family["conds"]
    ref = sample(model, *conds, steps=2)
    off = taming["att"].apply_taming_encoder(model, family["adapter"], family["one"], weight=0.0)
    assert off is model and not taming["d"].dispatchers(off, "attn2")   # weight 0 registers nothing
    assert torch.equal(sample(off, *conds, steps=2), ref)
    on = taming["att"].apply_taming_encoder(model, family["adapter"], family["one"], weight=0.5)
    assert not torch.allclose(sample(on, *conds, steps=2), ref)


def test_every_site_output_equals_the_independent_computation(taming, family):  # noqa: F811
    adapter, emb = family["adapter"], family["one"]
    patched = taming["att"].apply_taming_encoder(family["model"], adapter, emb, weight=0.6)
    spied, log = spy_on(taming, patched)
    sample(spied, *family["conds"], steps=1)
    state = state_of(adapter)
    tokens = manual_projection(state, adapter.module.spec, emb.features)
    assert {key_of(e["eo"]) for e in log} == set(family["layout"].keys)
    for e in log:
        assert torch.allclose(e["out"].double(), expected_output(taming, e, state, tokens, 0.6),
                              atol=1e-4, rtol=1e-4), key_of(e["eo"])


@pytest.mark.parametrize("combine", ["average", "concat", "norm average"])
def test_each_combine_mode_equals_its_direct_computation(taming, family, combine):  # noqa: F811
    adapter, two = family["adapter"], family["two"]
    state = state_of(adapter)
    tokens = combined_tokens(manual_projection(state, adapter.module.spec, two.features), combine)
    patched = taming["att"].apply_taming_encoder(family["model"], adapter, two, weight=0.8, combine=combine)
    spied, log = spy_on(taming, patched)
    sample(spied, *family["conds"], steps=1)
    assert log
    for e in log:
        assert torch.allclose(e["out"].double(), expected_output(taming, e, state, tokens, 0.8),
                              atol=1e-4, rtol=1e-4), (combine, key_of(e["eo"]))
    one = sample(taming["att"].apply_taming_encoder(family["model"], adapter, family["one"], weight=0.8),
                 *family["conds"], steps=1)
    assert not torch.allclose(sample(patched, *family["conds"], steps=1), one)   # the second photo counts
