"""How INV_FEATURES are stored and read: self-attention-only features, the memory budget (points left out run the
reference branch live and give the same image), K'/V' shared by the two halves of a split batch, and the opt-in
fast mode against a direct computation of its pooled reference."""
import pytest
import torch

import fixtures_inv_adapter as fia
from fixtures_inv_adapter import face_image, layout_model, manual_attention, random_cond, sample

CAPTION = random_cond(64, 7)
POS, NEG = random_cond(64, 1), random_cond(64, 2)
STEPS = 4


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.attention import dispatcher, inv_adapter, reference_features
    from comfyui_likeness.core import layout
    from comfyui_likeness.encoders import embedded_attention_adapter
    return {"d": dispatcher, "ia": inv_adapter, "rf": reference_features, "layout": layout,
            "eaa": embedded_attention_adapter}


@pytest.fixture(scope="module")
def setup(lib):
    import micro as m

    model, vae = layout_model("micro"), m.micro_vae()

    def extract(**kw):
        return lib["ia"].extract_inv_features(model, vae, face_image(), CAPTION, STEPS, size=64,
                                              feature_dtype=torch.float32, **kw)

    layout = lib["layout"].attention_layout(model)
    spec = lib["eaa"].EAASpec.for_layout(layout, (8, 8), s_c=16)
    adapter = lib["eaa"].EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu").init_random(6)
    return {"model": model, "extract": extract, "all": extract(store="all"), "layout": layout, "adapter": adapter}


def provider(patched):
    from comfy.patcher_extension import WrappersMP
    return next(w for ws in patched.wrappers[WrappersMP.APPLY_MODEL].values() for w in ws).provider


def run(lib, setup, feats, **kw):
    patched = lib["ia"].apply_inv_adapter(setup["model"], feats, weight=1.0, **kw)
    return sample(patched, POS, NEG, steps=STEPS), provider(patched).live_passes


def test_self_attention_features_serve_training_free_apply(lib, setup):
    own = setup["extract"](store="self")
    assert own.stored_keys() == {("attn1", s.key) for s in setup["layout"].sites}
    assert own.feature_bytes_per_step() * 2 == setup["all"].feature_bytes_per_step()
    full, _ = run(lib, setup, setup["all"])
    half, live = run(lib, setup, own)
    assert live == 0 and torch.equal(half, full)
    # an adapter with a cross side needs attn2 features: those steps run the reference branch live, same image
    with_adapter, _ = run(lib, setup, setup["all"], adapter=setup["adapter"])
    mixed, live = run(lib, setup, own, adapter=setup["adapter"])
    assert live == STEPS and torch.allclose(mixed, with_adapter, atol=1e-4, rtol=1e-4)


def test_the_memory_budget_stores_what_fits_and_runs_the_rest_live(lib, setup):
    ia = lib["ia"]
    per_point = ia.feature_bytes_per_point(setup["layout"], ("attn1", "attn2"), 1, (8, 8), torch.float32)
    assert per_point == setup["all"].feature_bytes_per_step()
    budget = 2.5 * per_point / 2**30
    capped = setup["extract"](memory_gb=budget)
    assert sorted(capped.features) == [1, STEPS] and capped.nbytes() <= setup["all"].nbytes()
    assert capped.info["stored_points"] == 2
    full, _ = run(lib, setup, setup["all"])
    out, live = run(lib, setup, capped)
    assert live == STEPS - 2 and torch.allclose(out, full, atol=1e-4, rtol=1e-4)
    assert setup["extract"](memory_gb=0.5 * per_point / 2**30).features is None  # nothing fits: trajectory only
    with pytest.raises(ValueError, match="memory_gb must be 0"):
        setup["extract"](memory_gb=float("nan"))


def test_stored_points_spread_over_the_grid():
    from comfyui_likeness.attention.inv_adapter import stored_points

    gib = 2**30
    assert stored_points(50, gib, 0) == list(range(1, 51))          # 0: no limit
    assert stored_points(50, gib, 50) == list(range(1, 51))
    kept = stored_points(50, gib, 10)
    assert len(kept) == 10 and kept[0] == 1 and kept[-1] == 50 and all(b - a >= 5 for a, b in zip(kept, kept[1:]))
    assert stored_points(50, gib, 1) == [50] and stored_points(50, gib, 0.5) == []


def test_split_batches_share_one_projection_per_step(lib, setup):
    """A positive of 385 tokens and a negative of 77 cannot be batched: the host runs cond and uncond apart."""

    class Counting(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            return self.inner(x)

    model, feats = setup["model"], setup["all"]
    site = setup["layout"].sites[0]
    block = lib["layout"].transformer_block(model, site)
    long_pos = random_cond(64, 1, length=385)
    patched = lib["ia"].apply_inv_adapter(model, feats, weight=1.0)
    disp = lib["d"].dispatchers(patched)[("attn1", site.key)]
    contribution = disp.contributions[0]
    counter = Counting(block.attn1.to_k)
    contribution.project_k = counter
    try:
        spied, log = fia.spy_on(lib["d"], patched)
        sample(spied, long_pos, NEG, steps=STEPS)
    finally:
        contribution.project_k = block.attn1.to_k
    calls_at_site = [e for e in log if fia.call_site(e) == ("attn1", site.key)]
    assert len(calls_at_site) == 2 * STEPS and all(e["q"].shape[0] == 1 for e in calls_at_site)
    assert counter.calls == STEPS
    sd = {k: v.double() for k, v in model.model.diffusion_model.state_dict().items()}
    for e in calls_at_site:  # and each half still equals the formula
        F = fia.handed_features(lib["rf"], e["eo"], "attn1", site.key)
        Kp, Vp = F @ sd[f"{site.path}.attn1.to_k.weight"].t(), F @ sd[f"{site.path}.attn1.to_v.weight"].t()
        h = e["eo"]["n_heads"]
        assert torch.allclose(e["out"].double(), manual_attention(e["q"], e["k"], e["v"], h)
                              + manual_attention(e["q"], Kp, Vp, h), atol=1e-5, rtol=1e-4)


def pooled_2x2(F, side):
    """(1, side*side, d) -> (1, (side/2)^2, d): the mean of each 2 x 2 window, written out."""
    d = F.shape[-1]
    g = F.reshape(side // 2, 2, side // 2, 2, d)
    return g.mean(dim=(1, 3)).reshape(1, -1, d)


def test_fast_mode_pools_the_largest_grid_and_equals_a_direct_computation(lib, setup):
    model, feats, layout = setup["model"], setup["all"], setup["layout"]
    finest = min(s.downscale for s in layout.sites)
    assert {s.downscale for s in layout.sites} == {1, 2}  # micro: the 8x8 and 4x4 grids
    patched = lib["ia"].apply_inv_adapter(model, feats, weight=0.9, speed="fast")
    spied, log = fia.spy_on(lib["d"], patched)
    fast = sample(spied, POS, NEG, steps=STEPS)
    sd = {k: v.double() for k, v in model.model.diffusion_model.state_dict().items()}
    pooled_sites = set()
    for e in log:
        site, key = fia.call_site(e)
        s = layout.site(key)
        F = fia.handed_features(lib["rf"], e["eo"], site, key)
        if s.downscale == finest:
            F = pooled_2x2(F, 8 // s.downscale)
            pooled_sites.add(key)
        Kp, Vp = F @ sd[f"{s.path}.attn1.to_k.weight"].t(), F @ sd[f"{s.path}.attn1.to_v.weight"].t()
        h = e["eo"]["n_heads"]
        expected = manual_attention(e["q"], e["k"], e["v"], h) + 0.9 * manual_attention(e["q"], Kp, Vp, h)
        assert torch.allclose(e["out"].double(), expected, atol=1e-5, rtol=1e-4), key
    assert pooled_sites == {s.key for s in layout.sites if s.downscale == finest}
    exact = sample(lib["ia"].apply_inv_adapter(model, feats, weight=0.9), POS, NEG, steps=STEPS)
    assert not torch.allclose(fast, exact, atol=1e-4)
    with pytest.raises(ValueError, match="speed must be one of exact, fast"):
        lib["ia"].apply_inv_adapter(model, feats, speed="turbo")
