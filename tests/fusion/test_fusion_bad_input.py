"""Bad input to the Fusion nodes gets a clear error that names the input, and leaves the model untouched."""
import pytest
import torch

import micro as m
from fixtures_fusion import conds, empty_latent


@pytest.fixture(scope="module")
def fusion(pack):
    from comfyui_likeness.nodes import fusion
    return fusion


@pytest.fixture(scope="module")
def model():
    return m.micro_model()


@pytest.fixture(scope="module")
def c():
    return conds(m.micro_clip())


def call(fusion, model, c, latent=None, **kw):
    args = dict(seed=0, steps=2, sampler_name="euler", scheduler="normal", denoise=1.0, w_fusion=7.0, w_concept=7.0,
                w_context=5.0, fusion_steps=1, eta=1.0, refine=True, start_percent=0.0, end_percent=1.0)
    args.update(kw)
    named = {k: kw.pop(k, c[k]) for k in ("negative", "fused", "concept", "context")}
    for k in named:
        args.pop(k, None)
    return fusion.ksampler_fusion(model, args["seed"], args["steps"], args["sampler_name"], args["scheduler"],
                                  named["negative"], named["fused"], named["concept"], named["context"],
                                  latent or empty_latent(), args["denoise"], args["w_fusion"], args["w_concept"],
                                  args["w_context"], args["fusion_steps"], args["eta"], args["refine"],
                                  args["start_percent"], args["end_percent"])


def test_missing_conditioning_names_the_input(fusion, model, c):
    with pytest.raises(ValueError, match="'context' conditioning is missing"):
        call(fusion, model, c, context=None)


def test_mismatched_widths_name_both_inputs(fusion, model, c):
    wide = [[torch.zeros(1, 77, 768), {"pooled_output": torch.zeros(1, 768)}]]
    with pytest.raises(ValueError, match=r"'fused' conditioning is 768 wide but 'negative' is 64 wide|'negative' conditioning is 64 wide but 'fused' is 768 wide"):
        call(fusion, model, c, fused=wide)
    with pytest.raises(ValueError, match="cross-attention expects 64"):
        call(fusion, model, {k: wide for k in c})


def test_batch_mismatch(fusion, model, c):
    two = [[torch.cat([c["concept"][0][0]] * 2), dict(c["concept"][0][1])]]
    with pytest.raises(ValueError, match=r"'concept' conditioning has batch 2 but the latent has batch 3"):
        call(fusion, model, c, concept=two, latent=empty_latent(batch=3))
    assert call(fusion, model, c, concept=two, latent=empty_latent(batch=2))["samples"].shape[0] == 2


@pytest.mark.parametrize("kw,msg", [
    ({"steps": 0}, "steps must be at least 1"),
    ({"w_fusion": -1.0}, "w_fusion must be between 0 and 30"),
    ({"w_context": 31.0}, "w_context must be between 0 and 30"),
    ({"eta": 1.5}, "eta must be between 0 and 1"),
    ({"fusion_steps": 11}, r"fusion_steps \(m\) must be between 0 and 10"),
    ({"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
    ({"sampler_name": "lms"}, "refinement sampler 'lms' is not supported"),
    ({"scheduler": "bogus"}, "unknown scheduler"),
])
def test_out_of_range_options(fusion, model, c, kw, msg):
    with pytest.raises(ValueError, match=msg):
        call(fusion, model, c, **kw)


def test_a_failed_call_leaves_the_model_as_it_was(fusion, model, c):
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    options = repr(model.model_options)
    with pytest.raises(ValueError):
        call(fusion, model, c, w_fusion=-1.0)
    assert repr(model.model_options) == options
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
