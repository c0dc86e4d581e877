"""Inv-Adapter's reference branch: extraction equals a direct computation, the trajectory and its Euler steps,
cache and live modes agree, step counts that differ from the extraction, files, and bad input."""
import os

import pytest
import torch

from fixtures_inv_adapter import direct_norm_features, face_image, layout_model, random_cond, sample


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.attention import dispatcher, inv_adapter, reference_features
    from comfyui_likeness.core import layout
    from comfyui_likeness.samplers import inversion
    from comfyui_likeness.weights import eaa, inv_features_file, safetensors_file
    return {"d": dispatcher, "ia": inv_adapter, "layout": layout, "rf": reference_features, "inv": inversion,
            "eaa": eaa, "file": inv_features_file, "st": safetensors_file}


@pytest.fixture(scope="module")
def model():
    return layout_model("micro")


@pytest.fixture(scope="module")
def vae():
    import micro as m
    return m.micro_vae()


CAPTION = random_cond(64, 7)
POS, NEG = random_cond(64, 1), random_cond(64, 2)


@pytest.fixture(scope="module")
def feats32(lib, model, vae):
    return lib["ia"].extract_inv_features(model, vae, face_image(), CAPTION, 4, size=64, feature_dtype=torch.float32)


@pytest.fixture(scope="module")
def feats16(lib, model, vae):
    return lib["ia"].extract_inv_features(model, vae, face_image(), CAPTION, 4, size=64)


def test_extracted_features_equal_a_direct_reference_branch(lib, model, feats32, feats16):
    layout = lib["layout"].attention_layout(model)
    assert set(feats32.features) == {1, 2, 3, 4}
    for k in (1, 2, 4):
        direct = direct_norm_features(model, layout, feats32.latents[k], float(feats32.sigmas[k]), CAPTION[0][0])
        assert set(direct) == set(feats32.features[k]) and len(direct) == 2 * len(layout.sites)
        for key, t in direct.items():
            assert torch.allclose(feats32.features[k][key], t, atol=1e-5, rtol=1e-5), (k, key)
            assert feats16.features[k][key].dtype == torch.float16
            assert torch.allclose(feats16.features[k][key].float(), t, atol=2e-2, rtol=2e-3), (k, key)


def test_live_reference_branch_equals_the_cache(lib, model, feats32):
    provider = lib["rf"].ReferenceProvider(feats32)
    for k in (1, 3):
        sigma = float(feats32.sigmas[k])
        live = lib["rf"].run_reference_branch(model.model, feats32.latents[k], sigma, feats32.caption)
        assert set(live) == set(feats32.features[k])
        for key in live:
            assert torch.allclose(live[key], feats32.features[k][key], atol=1e-5)
        assert provider.features_at(model.model, sigma, torch.device("cpu")) is not None
    assert provider.live_passes == 0


def test_trajectory_is_the_inversion(lib, model, vae, feats32):
    f = feats32
    for i in range(f.steps):
        step = f.latents[i] + (f.sigmas[i + 1] - f.sigmas[i]) * f.eps[i]
        assert torch.allclose(step, f.latents[i + 1], atol=1e-5)
    # the lead's ddim_invert reaches the same top latent
    pixels = lib["ia"].prepare_reference_image(face_image(), 64)
    latent = {"samples": vae.encode(pixels)}
    inverted, _ = lib["inv"].ddim_invert(model, CAPTION, latent, 4)
    top = model.model.process_latent_out(f.latents[-1])
    assert torch.allclose(inverted["samples"], top, atol=1e-5)


def test_latent_at_takes_the_inversion_step_from_the_point_below(lib, feats32):
    f = feats32
    for k in range(f.steps + 1):
        assert torch.equal(f.latent_at(float(f.sigmas[k])), f.latents[k])
    mid = 0.5 * float(f.sigmas[1] + f.sigmas[2])
    expected = f.latents[1] + (mid - float(f.sigmas[1])) * f.eps[1]
    assert torch.allclose(f.latent_at(mid), expected)
    above = float(f.sigmas[-1]) * 1.5
    assert torch.allclose(f.latent_at(above), f.latents[-1] + (above - float(f.sigmas[-1])) * f.eps[-1])


def _features_without_cache(f):
    from dataclasses import replace
    return replace(f, features=None, uid="live")


def test_cache_and_live_modes_give_the_same_image(lib, model, feats32):
    cached = lib["ia"].apply_inv_adapter(model, feats32, weight=1.0)
    live = lib["ia"].apply_inv_adapter(model, _features_without_cache(feats32), weight=1.0)
    a, b = sample(cached, POS, NEG, steps=4), sample(live, POS, NEG, steps=4)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(a, sample(model, POS, NEG, steps=4), atol=1e-3)


def _provider(patched):
    from comfy.patcher_extension import WrappersMP
    wrappers = [w for ws in patched.wrappers.get(WrappersMP.APPLY_MODEL, {}).values() for w in ws]
    assert len(wrappers) == 1
    return wrappers[0].provider


@pytest.mark.parametrize("steps,sampler,live_expected", [(4, "euler", False), (6, "euler", True), (4, "heun", False),
                                                         (3, "dpm_2", True)])
def test_other_step_counts_and_samplers_are_handled(lib, model, feats16, steps, sampler, live_expected):
    patched = lib["ia"].apply_inv_adapter(model, feats16, weight=1.0)
    out = sample(patched, POS, NEG, steps=steps, sampler=sampler)
    assert torch.isfinite(out).all()
    provider = _provider(patched)
    assert (provider.live_passes > 0) == live_expected
    # cond and uncond share one reference pass per sigma
    assert provider.live_passes <= 2 * steps + 1


def test_cond_only_and_window_skip_the_reference_branch(lib, model, feats16):
    ref = sample(model, POS, NEG, steps=4)
    off = lib["ia"].apply_inv_adapter(model, _features_without_cache(feats16), weight=1.0, start_percent=0.999,
                                      end_percent=1.0)
    assert torch.equal(sample(off, POS, NEG, steps=4), ref)
    assert _provider(off).live_passes == 0
    zero = lib["ia"].apply_inv_adapter(model, feats16, weight=0.0, self_attention=True)
    assert torch.equal(sample(zero, POS, NEG, steps=4), ref)


def test_features_round_trip_through_their_file(lib, model, feats16, tmp_path):
    path = str(tmp_path / "face.safetensors")
    lib["file"].save_inv_features(path, feats16)
    back = lib["file"].load_inv_features(path)
    assert back.fingerprint == feats16.fingerprint and back.info == feats16.info
    for name in ("sigmas", "latents", "eps", "caption"):
        assert torch.equal(getattr(back, name), getattr(feats16, name)), name
    assert set(back.features) == set(feats16.features)
    for k in back.features:
        assert set(back.features[k]) == set(feats16.features[k])
        for key, t in back.features[k].items():
            assert torch.equal(t, feats16.features[k][key])
    a = sample(lib["ia"].apply_inv_adapter(model, feats16), POS, NEG)
    b = sample(lib["ia"].apply_inv_adapter(model, back), POS, NEG)
    assert torch.equal(a, b)
    lib["file"].save_inv_features(str(tmp_path / "live.safetensors"), _features_without_cache(feats16))
    small = lib["file"].load_inv_features(str(tmp_path / "live.safetensors"))
    assert small.features is None and os.path.getsize(tmp_path / "live.safetensors") < os.path.getsize(path) / 2


def test_features_refuse_another_model(lib, feats16):
    with pytest.raises(ValueError, match="different checkpoint"):
        lib["ia"].apply_inv_adapter(layout_model("micro", seed=9), feats16)
    with pytest.raises(ValueError, match="extracted with SD15 .*32 channels.* but the model here is .*context 96"):
        lib["ia"].apply_inv_adapter(layout_model("deep"), feats16)


def test_adapter_must_fit_the_model_and_the_reference(lib, model, feats16, tmp_path):
    WeightFileError = lib["st"].WeightFileError
    deep = layout_model("deep")
    path = lib["eaa"].write_random_eaa(str(tmp_path / "deep.safetensors"), deep, reference_size=64, s_c=16)
    with pytest.raises(WeightFileError, match="built for SD15 .*context 96.* but the model is SD15 .*context 64"):
        lib["ia"].apply_inv_adapter(model, feats16, adapter=lib["eaa"].load_eaa(path))
    path = lib["eaa"].write_random_eaa(str(tmp_path / "big.safetensors"), model, reference_size=128, s_c=16)
    with pytest.raises(WeightFileError, match="trained on 128x128 references .* size 128"):
        lib["ia"].apply_inv_adapter(model, feats16, adapter=lib["eaa"].load_eaa(path))
    ok = lib["eaa"].write_random_eaa(str(tmp_path / "ok.safetensors"), model, reference_size=64, s_c=16)
    adapter = lib["eaa"].load_eaa(ok)
    patched = lib["ia"].apply_inv_adapter(model, feats16, adapter=adapter)
    assert {s for (s, _) in lib["d"].dispatchers(patched)} == {"attn1", "attn2"}
    assert torch.isfinite(sample(patched, POS, NEG)).all()
    # the adapter's weights ride in their own ModelPatcher, which the host loads with the UNet; clones share it
    extra = set(patched.model_patches_models())  # one entry per site; the host makes a set of them too
    assert len(extra) == 1 and next(iter(extra)).model is adapter
    again = lib["ia"].apply_inv_adapter(model, feats16, adapter=adapter)
    assert set(again.clone().model_patches_models()) == extra


def test_bad_files_are_named_in_plain_words(lib, model, feats16, tmp_path):
    WeightFileError = lib["st"].WeightFileError
    good = lib["file"].save_inv_features(str(tmp_path / "good.safetensors"), feats16)
    data = open(good, "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="cut.safetensors' is not a readable safetensors file"):
        lib["file"].load_inv_features(str(tmp_path / "cut.safetensors"))
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + os.urandom(200))
    with pytest.raises(WeightFileError, match="not a readable safetensors"):
        lib["file"].load_inv_features(str(tmp_path / "pickle.safetensors"))
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(WeightFileError, match="not an Inv-Adapter features file written by ComfyUI-Likeness"):
        lib["file"].load_inv_features(str(tmp_path / "foreign.safetensors"))
    eaa = lib["eaa"].write_random_eaa(str(tmp_path / "adapter.safetensors"), model, reference_size=64, s_c=16)
    with pytest.raises(WeightFileError, match="is an Inv-Adapter EAA adapter file, not an Inv-Adapter features file"):
        lib["file"].load_inv_features(eaa)
    with pytest.raises(WeightFileError, match="is an Inv-Adapter features file, not an Inv-Adapter EAA adapter file"):
        lib["eaa"].load_eaa(good)
    with pytest.raises(WeightFileError, match="does not exist"):
        lib["eaa"].load_eaa(str(tmp_path / "missing.safetensors"))
    # an EAA file whose tensors do not match its own metadata
    tensors, meta = lib["st"].load_file(eaa, lib["eaa"].FORMAT, (1,))
    tensors.pop(next(k for k in tensors if k.endswith("self_k.weight")))
    raw = {k: v for k, v in meta.items() if k not in ("likeness_format", "likeness_format_version")}
    lib["st"].save_file(str(tmp_path / "damaged.safetensors"), tensors, lib["eaa"].FORMAT, 1, raw)
    with pytest.raises(WeightFileError, match="1 tensors are missing"):
        lib["eaa"].load_eaa(str(tmp_path / "damaged.safetensors"))


@pytest.mark.parametrize("shape,match", [((1, 20, 40, 3), "only 40x20 pixels"), ((0, 64, 64, 3), "empty batch"),
                                         ((1, 64, 64, 2), "2 channels")])
def test_bad_images_are_refused(lib, model, vae, shape, match):
    with pytest.raises(ValueError, match=match):
        lib["ia"].extract_inv_features(model, vae, torch.rand(shape), CAPTION, 2, size=64)


def test_non_square_grey_and_rgba_images_are_accepted(lib):
    wide = lib["ia"].prepare_reference_image(face_image(48, 96), 64)
    assert wide.shape == (1, 64, 64, 3)
    centre = lib["ia"].prepare_reference_image(face_image(48, 96)[:, :, 24:72], 64)
    assert torch.allclose(wide, centre)
    assert lib["ia"].prepare_reference_image(face_image(channels=1), 64).shape == (1, 64, 64, 3)
    assert lib["ia"].prepare_reference_image(face_image(channels=4), 64).shape == (1, 64, 64, 3)


def test_caption_from_another_clip_is_refused(lib, model, vae):
    with pytest.raises(ValueError, match="caption has width 768 but the model's cross-attention expects 64"):
        lib["ia"].extract_inv_features(model, vae, face_image(), random_cond(768, 1), 2, size=64)


def test_extraction_leaves_the_input_model_untouched(lib, model, vae):
    before = repr(model.model_options)
    lib["ia"].extract_inv_features(model, vae, face_image(), CAPTION, 2, size=64)
    assert repr(model.model_options) == before
    patched = lib["ia"].apply_inv_adapter(model, lib["ia"].extract_inv_features(model, vae, face_image(), CAPTION, 2, size=64))
    assert repr(model.model_options) == before and patched is not model
