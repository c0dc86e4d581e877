"""The Taming Encoder adapter file and the object-embedding file: round trips, and every kind of bad file or
wrong pairing refused in plain words (model, CLIP vision, format, version, keys, shapes, truncation)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file as raw_save

import micro as m
from fixtures_taming import micro_cv, random_adapter, subject_photo, taming, vision_of  # noqa: F401


@pytest.fixture(scope="module")
def model():
    return m.micro_model()


@pytest.fixture(scope="module")
def adapter(taming, model, micro_cv):  # noqa: F811
    return random_adapter(taming, model, vision_of(taming, micro_cv), queries=4, depth=1, seed=7)


@pytest.fixture(scope="module")
def saved(taming, adapter, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("taming") / "adapter.safetensors")
    taming["file"].save_taming(path, adapter.module, origin="random", extra={"lr": 1e-5})
    return path


def rewrite(path, out, tensors=None, meta=None):
    """Copy a safetensors file with some tensors or metadata changed."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        md = dict(f.metadata())
    t.update(tensors or {})
    t = {k: v for k, v in t.items() if v is not None}
    md.update(meta or {})
    md = {k: v for k, v in md.items() if v is not None}
    raw_save(t, out, metadata=md)
    return out


def test_adapter_round_trip(taming, adapter, saved, model):
    loaded = taming["file"].load_taming(saved)
    assert loaded.module.spec == adapter.module.spec
    assert loaded.name == "adapter.safetensors" and loaded.meta["origin"] == "random"
    assert float(loaded.meta["lr"]) == 1e-5
    for k, v in adapter.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[k], v.to(torch.float16)), k
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert taming["file"].read_spec(saved) == adapter.module.spec
    # fp16 weights run in the features' dtype (the host's manual-cast ops)
    feats = torch.randn(1, 257, 32)
    assert loaded.module.project(feats).dtype == torch.float32


def test_the_file_records_its_null_embedding_and_older_files_load_as_learned(taming, model, micro_cv, tmp_path):  # noqa: F811
    """Files written before the null_embedding field hold a learned phi: they load as learned, and Apply's
    unconditional rows attend to their stored null tokens; a fixed-phi file holds the projection of zeros."""
    from fixtures_taming import expected_output, manual_projection, random_cond, sample, spy_on, state_of

    vision = vision_of(taming, micro_cv)
    learned = random_adapter(taming, model, vision, queries=4, depth=1, seed=8, null="learned")
    path = taming["file"].save_taming(str(tmp_path / "learned.safetensors"), learned.module, origin="random")
    old = rewrite(path, str(tmp_path / "old.safetensors"), meta={"null_embedding": None})
    meta, _ = taming["st"].read_header(old, "x")
    assert "null_embedding" not in meta
    loaded = taming["file"].load_taming(old)
    assert loaded.module.spec.null == "learned" and isinstance(loaded.module.null_tokens, torch.nn.Parameter)
    assert torch.equal(loaded.module.null_tokens, learned.module.null_tokens.to(torch.float16))
    img, mask = subject_photo()
    emb = taming["obj"].encode_object(micro_cv, img, mask)
    spied, log = spy_on(taming, taming["att"].apply_taming_encoder(model, loaded, emb, weight=0.7))
    sample(spied, random_cond(64, 1), random_cond(64, 2), steps=1)
    state = state_of(loaded)
    tokens = manual_projection(state, loaded.module.spec, emb.features)
    assert log and all(torch.allclose(e["out"].double(), expected_output(taming, e, state, tokens, 0.7), atol=1e-3)
                       for e in log)
    fixed = random_adapter(taming, model, vision, queries=4, depth=1, seed=8)
    path = taming["file"].save_taming(str(tmp_path / "fixed.safetensors"), fixed.module, origin="random")
    spec = taming["file"].read_spec(path)
    assert spec.null == "fixed"
    back = taming["file"].load_taming(path).module
    zeros = manual_projection(state_of(fixed), spec, torch.zeros(1, 257, 32))
    assert torch.allclose(back.null_tokens.double(), zeros, atol=1e-2)   # fp16 copy of the projection of phi
    assert "null_tokens" not in dict(back.named_parameters())


def test_random_writer_sizes_from_model_and_vision(taming, model, tmp_path):
    vision = taming["enc"].VisionSpec(1280, 257, 32)
    path = taming["file"].write_random_taming(str(tmp_path / "r.safetensors"), model, vision, queries=5, depth=1)
    spec = taming["file"].read_spec(path)
    assert spec.vision == vision and spec.tokens == 5 and spec.context_dim == 64
    assert set(spec.blocks) == {s.name for s in taming["layout"].attention_layout(model).sites}


@pytest.mark.parametrize("case, message", [
    ("missing file", "does not exist"),
    ("empty", "empty or truncated"),
    ("truncated", "not a readable safetensors file"),
    ("pickle", "not a readable safetensors file"),
    ("foreign", "not a Taming Encoder adapter file written by ComfyUI-Likeness"),
    ("embeds file", "is a Taming Encoder object embedding file, not a Taming Encoder adapter file"),
    ("version", "format version 7"),
    ("missing tensor", "1 tensors are missing"),
    ("extra tensor", "1 tensors are not expected"),
    ("wrong shape", "wrong shapes: layers.input_1_0.to_k.weight"),
    ("no blocks", "without blocks in its metadata"),
    ("bad projection", "unreadable Taming Encoder metadata"),
    ("bad null", "null_embedding 'zero' is neither fixed nor learned"),
])
def test_bad_adapter_files_are_refused(taming, saved, tmp_path, case, message):
    out = str(tmp_path / "bad.safetensors")
    data = open(saved, "rb").read()
    if case == "missing file":
        out = str(tmp_path / "nothing.safetensors")
    elif case == "empty":
        open(out, "wb").close()
    elif case == "truncated":
        open(out, "wb").write(data[: len(data) // 2])
    elif case == "pickle":
        open(out, "wb").write(b"\x80\x02}q\x00(X\x05\x00\x00\x00torch" + b"\x00" * 64)
    elif case == "foreign":
        raw_save({"weight": torch.zeros(2, 2)}, out)
    elif case == "embeds file":
        taming["embeds_file"].save_object_embeds(out, taming["obj"].ObjectEmbedding(
            torch.zeros(1, 257, 32), taming["enc"].VisionSpec(32, 257, 24)))
    elif case == "version":
        rewrite(saved, out, meta={"likeness_format_version": "7"})
    elif case == "missing tensor":
        rewrite(saved, out, tensors={"layers.input_1_0.gate": None})
    elif case == "extra tensor":
        rewrite(saved, out, tensors={"layers.input_1_0.bias": torch.zeros(3)})
    elif case == "wrong shape":
        rewrite(saved, out, tensors={"layers.input_1_0.to_k.weight": torch.zeros(5, 64, dtype=torch.float16)})
    elif case == "no blocks":
        rewrite(saved, out, meta={"blocks": None})
    elif case == "bad projection":
        rewrite(saved, out, meta={"projection": json.dumps({"queries": 4})})
    elif case == "bad null":
        rewrite(saved, out, meta={"null_embedding": "zero"})
    with pytest.raises(taming["st"].WeightFileError, match=message):
        taming["file"].load_taming(out)


def test_adapter_for_another_model_is_refused_in_plain_words(taming, adapter):
    import micro as mm

    layout_mod, f = taming["layout"], taming["file"]
    wide = layout_mod.attention_layout(mm.micro_model(context=96))
    expected = (r"trained for SD15 \(EPS, 32 channels, context 64, 7 attention blocks\) "
                r"but the model is SD15 \(EPS, 32 channels, context 96")
    with pytest.raises(f.WeightFileError, match=expected):
        f.check_taming_for_model(adapter.module.spec, wide, "the adapter")
    # same context width, other blocks: a model with three levels
    import comfy.model_base
    import comfy.model_management as mgmt
    import comfy.model_patcher
    import comfy.supported_models

    config = mm.unet_config()
    config.update({"num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [1, 1, 1],
                   "transformer_depth_output": [1] * 6})
    c = comfy.supported_models.SD15(config)
    c.set_inference_dtype(torch.float32, None)
    deep = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(c, device="cpu"),
                                            load_device=mgmt.get_torch_device(),
                                            offload_device=mgmt.unet_offload_device())
    with pytest.raises(f.WeightFileError, match="attention blocks differ from this model"):
        f.check_taming_for_model(adapter.module.spec, layout_mod.attention_layout(deep), "the adapter")


def test_adapter_for_another_clip_vision_is_refused(taming, adapter):
    enc, f = taming["enc"], taming["file"]
    vit_h = enc.VisionSpec(1280, 257, 32)
    vit_l = enc.VisionSpec(1024, 257, 24)
    spec = enc.TamingSpec(blocks={"input_1_0": {"inner": 32, "heads": 1}}, context_dim=64, vision=vit_h)
    with pytest.raises(f.WeightFileError, match=r"trained on ViT-H/14 \(1280 wide, 32 layers, 257 tokens\) features "
                                                r"but the object embedding comes from ViT-L/14"):
        f.check_taming_for_vision(spec, vit_l)
    f.check_taming_for_vision(spec, enc.VisionSpec(1280, 257, 0))  # unknown depth, same shape: accepted


def test_object_embeds_round_trip_and_errors(taming, micro_cv, tmp_path):  # noqa: F811
    ef, st = taming["embeds_file"], taming["st"]
    img, mask = subject_photo()
    emb = taming["obj"].encode_object(micro_cv, torch.cat([img, img.flip(2)]), mask, background="white")
    path = ef.save_object_embeds(str(tmp_path / "e.safetensors"), emb)
    back = ef.load_object_embeds(path)
    assert torch.equal(back.features, emb.features)  # float32: the loaded embedding gives the very same image
    assert back.vision == emb.vision and back.info["background"] == "white" and back.images == 2
    assert torch.allclose(back.subject, emb.subject, atol=0.5 / 255 + 1e-6)
    bad = str(tmp_path / "bad.safetensors")
    rewrite(path, bad, tensors={"features": torch.zeros(2, 257, 31)})
    with pytest.raises(st.WeightFileError, match="features are 257x32 but they are 257x31"):
        ef.load_object_embeds(bad)
    rewrite(path, bad, tensors={"extra": torch.zeros(1)})
    with pytest.raises(st.WeightFileError, match="does not have"):
        ef.load_object_embeds(bad)
    rewrite(path, bad, meta={"vision": "{}"})
    with pytest.raises(st.WeightFileError, match="unreadable CLIP vision metadata"):
        ef.load_object_embeds(bad)
    taming["file"].save_taming(bad, random_adapter(taming, m.micro_model(), emb.vision, queries=1, depth=1).module)
    with pytest.raises(st.WeightFileError, match="is a Taming Encoder adapter file, not a Taming Encoder object"):
        ef.load_object_embeds(bad)
    assert os.path.exists(path)


def test_object_embeds_file_holds_several_photos_and_apply_combines_them_alike(taming, micro_cv, model, tmp_path):  # noqa: F811
    """Several photos in one file (one row each); every combine mode gives the same tokens from the loaded file as
    from the encoded embedding."""
    ef = taming["embeds_file"]
    photos = [subject_photo(seed=s) for s in (3, 5, 9)]
    emb = taming["obj"].encode_object(micro_cv, torch.cat([p[0] for p in photos]), torch.cat([p[1] for p in photos]))
    back = ef.load_object_embeds(ef.save_object_embeds(str(tmp_path / "three.safetensors"), emb))
    assert back.images == 3 and torch.equal(back.features, emb.features) and back.subject.shape[0] == 3
    adapter = random_adapter(taming, model, vision_of(taming, micro_cv), queries=4, depth=1, seed=2)
    for combine in taming["att"].COMBINES:
        a = taming["att"].apply_taming_encoder(model, adapter, emb, combine=combine)
        b = taming["att"].apply_taming_encoder(model, adapter, back, combine=combine)
        ta = next(iter(taming["d"].dispatchers(a, "attn2").values())).contributions[0].source.tokens
        tb = next(iter(taming["d"].dispatchers(b, "attn2").values())).contributions[0].source.tokens
        assert torch.equal(ta, tb) and ta.shape[1] == (12 if combine == "concat" else 4)


def test_adapter_trained_with_a_tuned_unet_warns_on_another_model(taming, adapter, model, micro_cv,  # noqa: F811
                                                                  caplog):
    """The paper tunes the whole UNet; a file may name the UNet it was trained with, and Apply says when the
    connected model is another one (a warning: the adapter still runs)."""
    import dataclasses
    import logging

    from comfyui_likeness.core.layout import weights_digest

    img, mask = subject_photo()
    emb = taming["obj"].encode_object(micro_cv, img, mask)
    for digest, warns in (("0123456789abcdef01234567", True), (weights_digest(model), False)):
        spec = dataclasses.replace(adapter.module.spec, extra={"tuned_unet_digest": digest})
        module = taming["enc"].TamingEncoder(spec, dtype=torch.float32, device="cpu")
        module.load_state_dict(adapter.module.state_dict())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="likeness"):
            taming["att"].apply_taming_encoder(model, taming["file"].TamingAdapter(module, "tuned"), emb, 1.0)
        assert any("fine-tuned UNet" in r.getMessage() for r in caplog.records) == warns
