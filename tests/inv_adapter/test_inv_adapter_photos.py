"""Several reference photos: one batched extraction equals each photo's own, each combine mode equals a direct
computation (training-free self side and an adapter's aggregated cross side), a second photo changes the image
(and a duplicate does not), and feature files hold several photos (version-1 files still load)."""
import pytest
import torch

import fixtures_inv_adapter as fia
from fixtures_inv_adapter import face_image, layout_model, manual_attention, random_cond, sample

CAPTION = random_cond(64, 7)
POS, NEG = random_cond(64, 1), random_cond(64, 2)


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.attention import dispatcher, inv_adapter, reference_features
    from comfyui_likeness.core import layout
    from comfyui_likeness.encoders import embedded_attention_adapter
    from comfyui_likeness.weights import inv_features_file, safetensors_file
    return {"d": dispatcher, "ia": inv_adapter, "rf": reference_features, "layout": layout,
            "eaa": embedded_attention_adapter, "file": inv_features_file, "st": safetensors_file}


def second_face():
    """Another 'photo' of the face: shifted, a different noise seed and a warmer colour."""
    img = torch.roll(face_image(seed=9), shifts=(3, -2), dims=(1, 2))
    return (img * torch.tensor([1.0, 0.9, 0.8])).clamp(0, 1)


@pytest.fixture(scope="module")
def setup(lib):
    import micro as m

    model, vae = layout_model("micro"), m.micro_vae()
    extract = lambda image: lib["ia"].extract_inv_features(model, vae, image, CAPTION, 3, size=64,  # noqa: E731
                                                           feature_dtype=torch.float32)
    one, other = extract(face_image()), extract(second_face())
    both = extract(torch.cat([face_image(), second_face()]))
    layout = lib["layout"].attention_layout(model)
    spec = lib["eaa"].EAASpec.for_layout(layout, both.reference_latent, s_c=16)
    adapter = lib["eaa"].EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu").init_random(5)
    return {"model": model, "vae": vae, "one": one, "other": other, "both": both, "layout": layout, "adapter": adapter}


def close(a, b, rel=1e-4):
    """Equal up to float32 batching differences, relative to the tensor's scale."""
    return float((a - b).abs().max()) <= rel * max(1.0, float(b.abs().max()))


def test_batched_extraction_equals_each_photo_alone(setup):
    one, other, both = setup["one"], setup["other"], setup["both"]
    assert both.photos == 2 and both.latents.shape[:2] == (4, 2)
    for n, single in enumerate((one, other)):
        assert close(both.latents[:, n], single.latents[:, 0])
        assert close(both.eps[:, n], single.eps[:, 0])
        for k in both.features:
            for key, t in both.features[k].items():
                assert t.shape[0] == 2
                assert close(t[n], single.features[k][key][0]), (k, key)
    mid = 0.5 * float(both.sigmas[1] + both.sigmas[2])
    assert close(both.latent_at(mid)[1], other.latent_at(mid)[0])


def combined(F, mode):
    """Independent statement of the combine modes on (photos, tokens, width)."""
    if mode == "concat":
        return torch.cat(list(F), dim=0)[None]
    if mode == "average":
        return F.mean(0)[None]
    norms = F.norm(dim=-1, keepdim=True)
    direction = (F / norms).sum(0)
    return (direction / direction.norm(dim=-1, keepdim=True) * norms.mean(0))[None]


@pytest.fixture(scope="module")
def sdxl_setup(lib):
    """Two photos on the micro SDXL (depth-2 transformers, `y`)."""
    import micro as m

    model, clip, vae = m.micro_sdxl_model(), m.micro_sdxl_clip(), m.micro_vae()
    caption = m.sdxl_conditioning(clip, "a photo of a face", 64, 64)
    both = lib["ia"].extract_inv_features(model, vae, torch.cat([face_image(), second_face()]), caption, 2, size=64,
                                          feature_dtype=torch.float32)
    layout = lib["layout"].attention_layout(model)
    spec = lib["eaa"].EAASpec.for_layout(layout, both.reference_latent, s_c=8)
    adapter = lib["eaa"].EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu").init_random(7)
    cond = (m.sdxl_conditioning(clip, "a person", 64, 64), m.sdxl_conditioning(clip, "blurry", 64, 64))
    return {"model": model, "both": both, "layout": layout, "adapter": adapter, "cond": cond}


@pytest.mark.parametrize("mode", ["concat", "average", "norm average"])
@pytest.mark.parametrize("trained", [False, True], ids=["training_free", "trained"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_each_combine_mode_equals_a_direct_computation(lib, request, mode, trained, family):
    setup = request.getfixturevalue("setup" if family == "sd15" else "sdxl_setup")
    weight = 0.8
    adapter = setup["adapter"] if trained else None
    patched = lib["ia"].apply_inv_adapter(setup["model"], setup["both"], adapter=adapter, weight=weight, combine=mode)
    spied, log = fia.spy_on(lib["d"], patched)
    sample(spied, *setup.get("cond", (POS, NEG)), steps=2)
    sd = {k: v.double() for k, v in setup["model"].model.diffusion_model.state_dict().items()}
    state = {k: v.double() for k, v in setup["adapter"].state_dict().items()} if trained else None
    sites = set()
    for e in log:
        site, key = fia.call_site(e)
        F = fia.handed_features(lib["rf"], e["eo"], site, key)  # (photos, tokens, width)
        assert F.shape[0] == 2
        aggregate, Wk, Wv = fia.eaa_projection(site, key, setup["layout"], sd, state)
        F = aggregate(F)  # each photo aggregated on its own, then combined
        R = combined(F, mode)
        heads = e["eo"]["n_heads"]
        expected = manual_attention(e["q"], e["k"], e["v"], heads) + weight * manual_attention(e["q"], R @ Wk.t(), R @ Wv.t(), heads)
        assert torch.allclose(e["out"].double(), expected, atol=1e-5, rtol=1e-4), (mode, site, key)
        sites.add(site)
    assert sites == ({"attn1", "attn2"} if trained else {"attn1"})


def test_a_second_photo_changes_the_image_and_a_duplicate_does_not(lib, setup):
    from dataclasses import replace

    model, one, both = setup["model"], setup["one"], setup["both"]
    single = sample(lib["ia"].apply_inv_adapter(model, one, weight=1.0), POS, NEG)
    for mode in ("concat", "average", "norm average"):
        two = sample(lib["ia"].apply_inv_adapter(model, both, weight=1.0, combine=mode), POS, NEG)
        assert not torch.allclose(two, single, atol=1e-3), mode
    # the same photo twice: attention over duplicated keys, and the average of equal tokens, change nothing
    twice = replace(one, latents=one.latents.repeat(1, 2, 1, 1, 1), eps=one.eps.repeat(1, 2, 1, 1, 1), uid="twice",
                    features={k: {key: t.repeat(2, 1, 1) for key, t in v.items()} for k, v in one.features.items()})
    for mode in ("concat", "average", "norm average"):
        same = sample(lib["ia"].apply_inv_adapter(model, twice, weight=1.0, combine=mode), POS, NEG)
        assert torch.allclose(same, single, atol=1e-4, rtol=1e-4), mode


def test_live_reference_branch_runs_every_photo(lib, setup):
    from dataclasses import replace

    model, both = setup["model"], setup["both"]
    cached = sample(lib["ia"].apply_inv_adapter(model, both, weight=1.0), POS, NEG, steps=3)
    live_feats = replace(both, features=None, uid="live2")
    patched = lib["ia"].apply_inv_adapter(model, live_feats, weight=1.0)
    assert torch.allclose(sample(patched, POS, NEG, steps=3), cached, atol=1e-4, rtol=1e-4)


def test_a_file_holds_several_photos_and_version_1_files_load(lib, setup, tmp_path):
    f = lib["file"]
    both = setup["both"]
    back = f.load_inv_features(f.save_inv_features(str(tmp_path / "two.safetensors"), both))
    assert back.photos == 2 and torch.equal(back.latents, both.latents)
    for k in both.features:
        for key, t in both.features[k].items():
            assert torch.equal(back.features[k][key], t)
    model = setup["model"]
    assert torch.equal(sample(lib["ia"].apply_inv_adapter(model, back, combine="average"), POS, NEG),
                       sample(lib["ia"].apply_inv_adapter(model, both, combine="average"), POS, NEG))
    # version 1: one photo, latents (T+1, C, h, w), every point stored
    one = setup["one"]
    tensors = {"sigmas": one.sigmas, "latents": one.latents[:, 0], "eps": one.eps[:, 0], "caption": one.caption}
    for k, per in one.features.items():
        for (site, key), t in per.items():
            tensors[f"features.{k}.{site}.{lib['layout'].site_name(key)}"] = t
    old = lib["st"].save_file(str(tmp_path / "v1.safetensors"), tensors, f.FORMAT, 1,
                              {"method": "inv_adapter", "fingerprint": one.fingerprint, "info": one.info})
    v1 = f.load_inv_features(old)
    assert v1.photos == 1 and v1.y is None and torch.equal(v1.latents, one.latents)
    assert torch.equal(sample(lib["ia"].apply_inv_adapter(model, v1), POS, NEG),
                       sample(lib["ia"].apply_inv_adapter(model, one), POS, NEG))
    del tensors["features.2.attn1.input_1_0"]
    lib["st"].save_file(str(tmp_path / "v1_cut.safetensors"), tensors, f.FORMAT, 1,
                        {"method": "inv_adapter", "fingerprint": one.fingerprint, "info": one.info})
    with pytest.raises(lib["st"].WeightFileError, match="grid points or blocks that do not fit"):
        f.load_inv_features(str(tmp_path / "v1_cut.safetensors"))


def test_unknown_combine_mode_is_refused(lib, setup):
    with pytest.raises(ValueError, match="combine must be one of concat, average, norm average"):
        lib["ia"].apply_inv_adapter(setup["model"], setup["both"], combine="sum")
