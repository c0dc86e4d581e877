"""Inv-Adapter's equations (docs/methods/inv-adapter.md, eqs. 2-5) against an independent computation on the q/k/v the host
actually passed, and the token aggregation against plain average pooling."""
import pytest
import torch

import fixtures_inv_adapter as fia
from fixtures_inv_adapter import face_image, layout_model, manual_attention, random_cond, sample


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.attention import dispatcher, inv_adapter, reference_features
    from comfyui_likeness.core import layout
    from comfyui_likeness.encoders import embedded_attention_adapter, token_aggregation
    return {"d": dispatcher, "ia": inv_adapter, "layout": layout, "rf": reference_features,
            "eaa": embedded_attention_adapter, "agg": token_aggregation}


@pytest.fixture(scope="module")
def setup(lib):
    import micro as m

    model = layout_model("micro")
    vae = m.micro_vae()
    caption = random_cond(64, 7)
    feats = lib["ia"].extract_inv_features(model, vae, face_image(), caption, 3, size=64, feature_dtype=torch.float32)
    layout = lib["layout"].attention_layout(model)
    spec = lib["eaa"].EAASpec.for_layout(layout, feats.reference_latent, s_c=16)
    adapter = lib["eaa"].EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu").init_random(3)
    return {"model": model, "feats": feats, "layout": layout, "adapter": adapter}


def spy_on(lib, model):
    return fia.spy_on(lib["d"], model)


def reference_features(lib, eo, site, key):
    return fia.handed_features(lib["rf"], eo, site, key)


def test_trained_mode_equals_equations_2_to_5(lib, setup):
    weight = 0.7
    patched = lib["ia"].apply_inv_adapter(setup["model"], setup["feats"], adapter=setup["adapter"], weight=weight)
    spied, log = spy_on(lib, patched)
    pos, neg = random_cond(64, 1), random_cond(64, 2)
    sample(spied, pos, neg, steps=2)
    sites = {(e["eo"]["block"][0], e["eo"]["block"][1]) for e in log}
    assert len(sites) == len(setup["layout"].sites)
    state = {k: v.double() for k, v in setup["adapter"].state_dict().items()}
    checked = {"attn1": 0, "attn2": 0, "aggregated": 0}
    for e in log:
        q, k, v, eo = e["q"], e["k"], e["v"], e["eo"]
        key = (eo["block"][0], eo["block"][1], eo.get("block_index", 0))
        # The spy does not know the site; the context length tells (self-attention: k has q's tokens).
        site = "attn1" if k.shape[1] == q.shape[1] else "attn2"
        heads = eo["n_heads"]
        name = lib["layout"].site_name(key)
        F = reference_features(lib, eo, site, key)
        side = "self" if site == "attn1" else "cross"
        if side == "cross" and f"layers.{name}.aggregate.proj.weight" in state:
            A, b = state[f"layers.{name}.aggregate.proj.weight"], state[f"layers.{name}.aggregate.proj.bias"]
            F = torch.einsum("ji,bid->bjd", A, F) + b[None, :, None]  # F'[:, j] = sum_i A_ji F[:, i] + b_j
            checked["aggregated"] += 1
        Kp = F @ state[f"layers.{name}.{side}_k.weight"].t()
        Vp = F @ state[f"layers.{name}.{side}_v.weight"].t()
        expected = manual_attention(q, k, v, heads) + weight * manual_attention(q, Kp, Vp, heads)
        assert torch.allclose(e["out"].double(), expected, atol=1e-5, rtol=1e-4), (site, key)
        checked[site] += 1
    assert checked["attn1"] >= len(setup["layout"].sites) and checked["attn2"] >= len(setup["layout"].sites)
    assert checked["aggregated"] > 0


def test_training_free_mode_uses_the_layers_own_projections(lib, setup):
    weight = 0.9
    model = setup["model"]
    patched = lib["ia"].apply_inv_adapter(model, setup["feats"], adapter=None, weight=weight)
    assert {s for (s, _) in lib["d"].dispatchers(patched)} == {"attn1"}  # self side only
    spied, log = spy_on(lib, patched)
    sample(spied, random_cond(64, 1), random_cond(64, 2), steps=2)
    sd = {k: v.double() for k, v in model.model.diffusion_model.state_dict().items()}
    assert log
    for e in log:
        eo = e["eo"]
        key = (eo["block"][0], eo["block"][1], eo.get("block_index", 0))
        path = setup["layout"].site(key).path
        F = reference_features(lib, eo, "attn1", key)
        Kp, Vp = F @ sd[f"{path}.attn1.to_k.weight"].t(), F @ sd[f"{path}.attn1.to_v.weight"].t()
        expected = manual_attention(e["q"], e["k"], e["v"], eo["n_heads"]) + weight * manual_attention(e["q"], Kp, Vp, eo["n_heads"])
        assert torch.allclose(e["out"].double(), expected, atol=1e-5, rtol=1e-4), key


def test_features_handed_to_the_processor_are_those_of_the_current_sigma(lib, setup):
    feats = setup["feats"]
    patched = lib["ia"].apply_inv_adapter(setup["model"], feats, weight=1.0)
    spied, log = spy_on(lib, patched)
    sample(spied, random_cond(64, 1), random_cond(64, 2), steps=3)
    seen = set()
    for e in log:
        eo = e["eo"]
        sigma = float(eo["sigmas"][0])
        k = feats.point_index(sigma)
        assert k is not None, sigma
        key = (eo["block"][0], eo["block"][1], eo.get("block_index", 0))
        assert torch.equal(reference_features(lib, eo, "attn1", key).float(), feats.features[k][("attn1", key)])
        seen.add(k)
    assert seen == {1, 2, 3}  # the sampler's three sigmas are the inversion's grid points


def test_pooling_matrix_is_average_pooling(lib):
    agg = lib["agg"]
    A = agg.pooling_matrix(64, 16)
    assert A.shape == (16, 64) and torch.allclose(A.sum(1), torch.ones(16))
    x = torch.randn(2, 64, 5)
    pooled = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(2, 5, 8, 8), 2).reshape(2, 5, 16).transpose(1, 2)
    assert torch.allclose(torch.einsum("ji,bid->bjd", A, x), pooled, atol=1e-6)
    A1 = agg.pooling_matrix(4096, 512)  # not a square grid: contiguous raster runs of 8
    assert torch.allclose(A1[0, :8], torch.full((8,), 1 / 8)) and A1[0, 8:].abs().sum() == 0
    module = agg.TokenAggregation(64, 16, dtype=torch.float32, device="cpu")
    module.reset_to_pooling()
    assert torch.allclose(module(x), pooled, atol=1e-6)
    with pytest.raises(ValueError, match="expects 64 reference tokens"):
        module(torch.randn(1, 32, 5))


def test_sd15_parameter_count_matches_the_paper(lib):
    """docs/methods/inv-adapter.md: self + cross K/V over SD1.5's 16 blocks is 49.56 M ("48M" in the paper)."""
    layout = lib["layout"]
    # widths of SD1.5 at its real 320 channels, derived the same way as from a loaded model
    widths = {1: 320, 2: 320, 4: 640, 5: 640, 7: 1280, 8: 1280}
    out_widths = {3: 1280, 4: 1280, 5: 1280, 6: 640, 7: 640, 8: 640, 9: 320, 10: 320, 11: 320}
    sites = [layout.TransformerSite(("input", n, 0), "", w, w, 8, w // 8, 768, {320: 1, 640: 2, 1280: 4}[w]) for n, w in widths.items()]
    sites += [layout.TransformerSite(("middle", 0, 0), "", 1280, 1280, 8, 160, 768, 8)]
    sites += [layout.TransformerSite(("output", n, 0), "", w, w, 8, w // 8, 768, {320: 1, 640: 2, 1280: 4}[w]) for n, w in out_widths.items()]
    sd15 = layout.AttentionLayout(tuple(sites), "SD15", "EPS", 320, 768, 4)
    spec = lib["eaa"].EAASpec.for_layout(sd15, (64, 64), s_c=256)
    kv = sum(4 * s.query_dim * s.inner_dim for s in sites)
    assert kv == 49_561_600
    aggregation = spec.parameter_count() - kv
    assert aggregation == 5 * (256 * 4096 + 256) + 5 * (256 * 1024 + 256)  # only the 64x64 and 32x32 layers


def test_every_site_is_hit_on_a_deeper_architecture(lib):
    """Transformer depth 2 (block indices 0 and 1), three levels, context 96: extraction finds every block and
    the trained-mode dispatchers on all of them run."""
    import micro as m

    model = layout_model("deep")
    layout = lib["layout"].attention_layout(model)
    feats = lib["ia"].extract_inv_features(model, m.micro_vae(), face_image(), random_cond(96, 7), 2, size=64)
    assert set(feats.features[1]) == {(site, s.key) for s in layout.sites for site in ("attn1", "attn2")}
    spec = lib["eaa"].EAASpec.for_layout(layout, feats.reference_latent, s_c=16)
    adapter = lib["eaa"].EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu").init_random(4)
    patched = lib["ia"].apply_inv_adapter(model, feats, adapter=adapter)
    spied, log = spy_on(lib, patched)
    sample(spied, random_cond(96, 1), random_cond(96, 2), steps=2)
    hit = {("attn1" if e["k"].shape[1] == e["q"].shape[1] else "attn2",
            (e["eo"]["block"][0], e["eo"]["block"][1], e["eo"].get("block_index", 0))) for e in log}
    assert hit == {(site, s.key) for s in layout.sites for site in ("attn1", "attn2")}
    assert any(key[2] == 1 for _, key in hit)
