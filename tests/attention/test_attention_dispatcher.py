"""The shared attention-patch mechanism on the real host: layout from the model, every key hit on several
architectures, weight 0 bit-identical, cond/uncond routing (batched and separate passes), stacking, chaining
another pack's replace patch, clone semantics, masks, sigma windows, pre-projection inputs."""
import copy
import math

import pytest
import torch

from fixtures_inv_adapter import (SD15_DOWNSCALE, SD15_KEYS, SD15_OUT_DOWNSCALE, RecordingContribution, context_of,
                                  layout_model, random_cond, sample)


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.attention import dispatcher
    from comfyui_likeness.core import layout
    return {"d": dispatcher, "layout": layout}


@pytest.fixture(scope="module", params=["sd15", "micro", "deep"])
def arch(request):
    return request.param, layout_model(request.param)


def conds(kind, seed=0):
    c = context_of(kind)
    return random_cond(c, seed), random_cond(c, seed + 1)


def register_everywhere(lib, model, make, sites=("attn1", "attn2")):
    m = model.clone()
    for site in sites:
        for s in lib["layout"].attention_layout(model).sites:
            lib["d"].add_contribution(m, site, s.key, make())
    return m


def test_sd15_layout_is_derived_from_the_model(lib):
    layout = lib["layout"].attention_layout(layout_model("sd15"))
    assert layout.keys == SD15_KEYS
    for s in layout.sites:
        expected = {"input": SD15_DOWNSCALE, "output": SD15_OUT_DOWNSCALE}.get(s.key[0], {}).get(s.key[1], 8)
        assert s.downscale == expected, s
        assert s.tokens(64, 64) == (64 // expected) ** 2
        assert s.context_dim == 64 and s.inner_dim == s.query_dim == s.heads * s.dim_head


def test_deep_layout_has_second_transformer_index(lib):
    layout = lib["layout"].attention_layout(layout_model("deep"))
    keys = layout.keys
    assert ("input", 1, 1) in keys and ("middle", 0, 1) in keys and ("output", 5, 1) in keys
    assert layout.context_dim == 96
    assert len(keys) == 2 * (3 + 1 + 6)


def test_every_registered_key_is_hit(lib, arch):
    kind, model = arch
    log = []
    m = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 0.0, log))
    pos, neg = conds(kind)
    sample(m, pos, neg, steps=2)
    registered = {(site, k) for (site, k) in lib["d"].dispatchers(m)}
    hit = {(e["site"], e["key"]) for e in log}
    assert registered == {(site, s) for site in ("attn1", "attn2") for s in lib["layout"].attention_layout(model).keys}
    assert hit == registered
    # the token grid each contribution sees matches the layout's downscale
    layout = lib["layout"].attention_layout(model)
    for e in log:
        f = layout.site(e["key"]).downscale
        assert e["grid"] == (math.ceil(8 / f), math.ceil(8 / f)), e


def test_weight_zero_and_outside_window_are_bit_identical(lib, arch):
    kind, model = arch
    pos, neg = conds(kind)
    ref = sample(model, pos, neg)
    m0 = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 3.0, weight=0.0))
    assert torch.equal(sample(m0, pos, neg), ref)
    outside = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 3.0, sigma_start=1e-4, sigma_end=0.0))
    assert torch.equal(sample(outside, pos, neg), ref)
    m1 = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 0.05))
    assert not torch.allclose(sample(m1, pos, neg), ref)


def _denoised_pair(model, pos, neg, cfg=5.0):
    """(cond_denoised, uncond_denoised) of the first sampler step, read through the host's post-CFG hook."""
    seen = {}

    def post(args):
        seen.setdefault("cond", args["cond_denoised"].clone())
        seen.setdefault("uncond", None if args["uncond_denoised"] is None else args["uncond_denoised"].clone())
        return args["denoised"]

    m = model.clone()
    m.set_model_sampler_post_cfg_function(post)
    sample(m, pos, neg, steps=1, cfg=cfg)
    return seen["cond"], seen["uncond"]


@pytest.mark.parametrize("separate", [False, True], ids=["batched", "separate_passes"])
def test_cond_uncond_rows_follow_the_host_order(lib, separate):
    model = layout_model("micro")
    pos, neg = conds("micro")
    if separate:  # a model_conds key only on the positive side makes the host run cond and uncond apart
        import comfy.conds
        pos = [[pos[0][0], {**pos[0][1], "model_conds": {"likeness_probe": comfy.conds.CONDConstant(1)}}]]
    log, cond_log = [], []
    base_c, base_u = _denoised_pair(model, pos, neg)
    cond_only = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 0.5, cond_log, apply_to="cond"))
    c, u = _denoised_pair(cond_only, pos, neg)
    assert torch.equal(u, base_u) and not torch.allclose(c, base_c)
    uncond_only = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 0.5, apply_to="uncond"))
    c, u = _denoised_pair(uncond_only, pos, neg)
    assert torch.equal(c, base_c) and not torch.allclose(u, base_u)
    everywhere = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 0.0, log))
    _denoised_pair(everywhere, pos, neg)
    kinds = {tuple(e["kinds"]) for e in log}
    assert cond_log and all("cond" in e["kinds"] for e in cond_log)
    if separate:
        assert kinds == {("cond",), ("uncond",)}
    else:
        assert kinds == {("uncond", "cond")}  # the host batches uncond first (cond_or_uncond [1, 0])


def test_cfg_one_runs_the_cond_pass_only(lib):
    model = layout_model("micro")
    pos, neg = conds("micro")
    log = []
    m = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 0.0, log))
    sample(m, pos, neg, steps=1, cfg=1.0)
    assert log and {tuple(e["kinds"]) for e in log} == {("cond",)}
    ref = sample(model, pos, neg, steps=2, cfg=1.0)
    uncond_only = register_everywhere(lib, model, lambda: RecordingContribution.make(lib["d"], 1.0, apply_to="uncond"))
    assert torch.equal(sample(uncond_only, pos, neg, steps=2, cfg=1.0), ref)


def _extra_options(q, heads, sigma=1.0, cond_or_uncond=(1, 0), grid=(4, 4)):
    return {"n_heads": heads, "dim_head": q.shape[-1] // heads, "attn_precision": None,
            "cond_or_uncond": list(cond_or_uncond), "sigmas": torch.tensor([sigma]),
            "activations_shape": [q.shape[0], q.shape[-1], *grid]}


def test_two_contributions_on_one_key_both_apply_in_order(lib):
    d = lib["d"]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 16, 32, generator=g) for _ in range(3))
    eo = _extra_options(q, 4)
    base = d.host_attention(q, k, v, 4, eo)

    class Add(d.Contribution):
        def __init__(self, t, **kw):
            super().__init__(**kw)
            self.t = t

        def compute(self, call):
            return self.t.expand_as(call.q)

    class Scale(d.Contribution):
        replaces = True

        def compute(self, call):
            return call.current * 3.0

    a, b = torch.randn(1, 16, 32, generator=g), torch.randn(1, 16, 32, generator=g)
    disp = d.AttentionDispatcher("attn2", ("input", 1, 0), (Add(a, weight=0.5), Add(b, weight=2.0), Scale(weight=0.25)))
    out = disp(q, k, v, eo)
    summed = base + 0.5 * a + 2.0 * b
    assert torch.allclose(out, summed + 0.25 * (3.0 * summed - summed), atol=1e-6)


def test_mask_and_row_selection_scale_the_term(lib):
    d = lib["d"]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 16, 8, generator=g) for _ in range(3))  # latent batch 2, uncond then cond
    eo = _extra_options(q, 2)

    class One(d.Contribution):
        def compute(self, call):
            return torch.ones_like(call.q)

    mask = torch.zeros(1, 32, 32)
    mask[:, :, 16:] = 1.0  # right half of the image
    out = d.AttentionDispatcher("attn1", ("input", 1, 0), (One(mask=mask, apply_to="cond"),))(q, k, v, eo)
    diff = (out - d.host_attention(q, k, v, 2, eo))
    grid = diff[..., 0].reshape(4, 4, 4)
    assert torch.allclose(grid[:2], torch.zeros_like(grid[:2]), atol=1e-6)          # uncond rows untouched
    assert torch.allclose(grid[2:, :, 2:], torch.ones_like(grid[2:, :, 2:]), atol=1e-6)  # cond, right half
    assert torch.allclose(grid[2:, :, :2], torch.zeros_like(grid[2:, :, :2]), atol=1e-6)


def test_another_packs_replace_patch_still_runs(lib):
    model = layout_model("micro")
    pos, neg = conds("micro")
    calls = {"two": 0, "three": 0}

    def foreign(name):
        def patch(q, k, v, extra_options):
            calls[name] += 1
            from comfy.ldm.modules.attention import optimized_attention
            return optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5
        return patch

    other = model.clone()
    other.set_model_attn1_replace(foreign("two"), "input", 1)      # 2-tuple key, as some packs register
    other.set_model_attn2_replace(foreign("three"), "output", 2, 0)  # 3-tuple key
    foreign_only = sample(other, pos, neg, steps=1)
    log = []
    m = other.clone()
    lib["d"].add_contribution(m, "attn1", ("input", 1, 0), RecordingContribution.make(lib["d"], 0.0, log))
    lib["d"].add_contribution(m, "attn2", ("output", 2, 0), RecordingContribution.make(lib["d"], 0.0, log))
    calls.update(two=0, three=0)
    out = sample(m, pos, neg, steps=1)
    assert calls["two"] > 0 and calls["three"] > 0 and len(log) == calls["two"] + calls["three"]
    assert torch.equal(out, foreign_only)  # zero terms: the foreign patches alone decide the output


def test_clone_shares_contributions_and_never_touches_the_original(lib):
    model = layout_model("micro")

    class Heavy(lib["d"].Contribution):
        def __init__(self):
            super().__init__()
            self.tensor = torch.randn(256, 256)

        def compute(self, call):
            return torch.zeros_like(call.q)

    m = model.clone()
    lib["d"].add_contribution(m, "attn1", ("input", 1, 0), Heavy())
    first = lib["d"].dispatchers(m)[("attn1", ("input", 1, 0))]
    c = m.clone()
    cloned = lib["d"].dispatchers(c)[("attn1", ("input", 1, 0))]
    assert cloned is not first
    assert cloned.contributions[0] is first.contributions[0]
    assert cloned.contributions[0].tensor.data_ptr() == first.contributions[0].tensor.data_ptr()
    lib["d"].add_contribution(c, "attn1", ("input", 1, 0), Heavy())
    assert len(lib["d"].dispatchers(c)[("attn1", ("input", 1, 0))].contributions) == 2
    assert len(lib["d"].dispatchers(m)[("attn1", ("input", 1, 0))].contributions) == 1
    assert lib["d"].dispatchers(model) == {}
    # deepcopy of the whole options (what the host does) keeps sharing
    deep = copy.deepcopy(m.model_options)
    assert deep["transformer_options"]["patches_replace"]["attn1"][("input", 1, 0)].contributions[0] is first.contributions[0]


def test_contributions_can_read_the_pre_projection_inputs(lib):
    model = layout_model("micro")
    pos, neg = conds("micro")
    log = []

    class WithInputs(lib["d"].Contribution):
        needs_inputs = True

        def compute(self, call):
            n, context, _ = call.inputs
            log.append((call.site, tuple(n.shape), tuple(context.shape), call.q.shape[1]))
            return torch.zeros_like(call.q)

    m = model.clone()
    for site in ("attn1", "attn2"):
        lib["d"].add_contribution(m, site, ("middle", 0, 0), WithInputs())
        lib["d"].add_contribution(m, site, ("middle", 0, 0), WithInputs())  # the recorder is registered once
    assert sum(isinstance(p, lib["d"].InputRecorder) for p in m.model_options["transformer_options"]["patches"]["attn1_patch"]) == 1
    sample(m, pos, neg, steps=1)
    a1 = [e for e in log if e[0] == "attn1"]
    a2 = [e for e in log if e[0] == "attn2"]
    assert a1 and a2
    assert a1[0][1] == (2, 16, 64) and a1[0][2] == (2, 16, 64)  # self-attention: context is the hidden state
    assert a2[0][1] == (2, 16, 64) and a2[0][2] == (2, 77, 64)  # cross-attention: the text context


def test_bad_registration_is_refused(lib):
    m = layout_model("micro").clone()
    with pytest.raises(ValueError, match="site"):
        lib["d"].add_contribution(m, "attn3", ("input", 1, 0), RecordingContribution.make(lib["d"]))
    with pytest.raises(ValueError, match="apply_to"):
        RecordingContribution.make(lib["d"], apply_to="sometimes")
    with pytest.raises(ValueError, match="window"):
        RecordingContribution.make(lib["d"], sigma_start=0.1, sigma_end=1.0)


def test_unet_free_models_are_refused_in_plain_words(lib):
    class NotAUnet:
        def get_model_object(self, name):
            return torch.nn.Linear(2, 2)

    with pytest.raises(lib["layout"].UnsupportedModelError, match="not a UNet"):
        lib["layout"].attention_layout(NotAUnet())
