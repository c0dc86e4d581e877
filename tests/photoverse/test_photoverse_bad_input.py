"""Bad input to PhotoVerse gets an error in plain words naming what is wrong, and changes nothing: adapters for
another base model or CLIP vision, a concept from another adapter or not from PhotoVerse, no placeholder in the
prompt, damaged or foreign files, bad images, masks and settings."""
import os

import pytest
import torch

import micro as m
from fixtures_photoverse import face_image, loaded_adapter, random_adapter_file, unet_model


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.attention import photoverse as attn
    from comfyui_likeness.concepts import concept, prompt_injection
    from comfyui_likeness.concepts import photoverse_concept as pvc
    from comfyui_likeness.weights import photoverse as pv_file, safetensors_file
    from comfyui_likeness.concepts import photoverse_concept_file as concept_file
    return {"attn": attn, "pvc": pvc, "file": pv_file, "concept_file": concept_file, "st": safetensors_file,
            "concept": concept, "prompt": prompt_injection}


@pytest.fixture(scope="module")
def setup(lib, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pv_bad")
    model, cv = m.micro_model(), m.micro_clip_vision()
    path = random_adapter_file(tmp / "a.safetensors", model, cv, seed=1)
    loaded = lib["file"].load_photoverse(path)
    concept = lib["pvc"].encode_photoverse_concept(loaded, cv, face_image())
    return {"tmp": tmp, "model": model, "cv": cv, "path": path, "loaded": loaded, "concept": concept}


def _state(model):
    return (dict(model.patches), repr(model.model_options), model.patches_uuid)


def test_adapter_for_another_context_width_names_both_models(lib, setup):
    other = unet_model(96)
    before = _state(other)
    with pytest.raises(ValueError, match=r"trained for SD15 .*context 64.* but the model is SD15 .*context 96"):
        lib["attn"].apply_photoverse(other, setup["loaded"], setup["concept"])
    assert _state(other) == before


def test_adapter_for_another_block_layout_is_refused(lib, setup):
    wider = unet_model(64, channels=64)
    with pytest.raises(ValueError, match=r"has width 32 .* at block input_1_0 but the model has 64"):
        lib["attn"].apply_photoverse(wider, setup["loaded"], setup["concept"])
    import fixtures_inv_adapter as fia
    deeper = fia.layout_model("sd15")  # SD1.5's block list at micro width: other blocks than the micro UNet
    with pytest.raises(ValueError, match=r"cross-attention blocks differ"):
        lib["attn"].apply_photoverse(deeper, setup["loaded"], setup["concept"])


@pytest.mark.parametrize("kind", ["width", "layers"])
def test_adapter_for_another_clip_vision_is_refused(lib, setup, kind):
    cv = m.micro_clip_vision(width=48) if kind == "width" else m.micro_clip_vision(layers=32)
    expected = "width 48, 24 layers" if kind == "width" else "width 32, 32 layers"
    with pytest.raises(ValueError, match=rf"reads features of .*width 32, 24 layers.* connected CLIP vision is .*{expected}"):
        lib["pvc"].encode_photoverse_concept(setup["loaded"], cv, face_image())


def test_clip_vision_too_shallow_for_the_papers_layers(lib, setup):
    with pytest.raises(ValueError, match="layers 4, 8, 12 and 16.*only 12 layers"):
        random_adapter_file(setup["tmp"] / "shallow.safetensors", setup["model"], m.micro_clip_vision(layers=12))


def test_concept_from_another_adapter_is_refused(lib, setup):
    other = loaded_adapter(setup["tmp"] / "b.safetensors", setup["model"], setup["cv"], seed=2)
    before = _state(setup["model"])
    with pytest.raises(ValueError, match=r"made with another PhotoVerse adapter \('a.safetensors'\), not with 'b.safetensors'"):
        lib["attn"].apply_photoverse(setup["model"], other, setup["concept"])
    assert _state(setup["model"]) == before


def test_concept_that_is_not_from_photoverse_is_refused(lib, setup):
    text = lib["concept"].LikenessConcept(text="a woman with red hair", source="text")
    with pytest.raises(ValueError, match="was not made by PhotoVerse Encode"):
        lib["attn"].apply_photoverse(setup["model"], setup["loaded"], text)
    with pytest.raises(ValueError, match="must be a LIKENESS_CONCEPT"):
        lib["attn"].apply_photoverse(setup["model"], setup["loaded"], "a string")
    with pytest.raises(ValueError, match="must be a PhotoVerse adapter"):
        lib["attn"].apply_photoverse(setup["model"], None, setup["concept"])


def test_prompt_without_the_placeholder_is_refused(lib, setup):
    clip = m.micro_clip()
    with pytest.raises(ValueError, match="placeholder 'holder' does not appear in the prompt"):
        lib["prompt"].encode_likeness_prompt(clip, "a photo of a man on the beach", setup["concept"], "holder", "person", 1.0)


def test_concept_for_another_text_encoder_width_is_refused(lib, setup):
    clip = m.micro_clip(width=48)
    with pytest.raises(ValueError, match="width 64.* text encoder is 48 wide"):
        lib["prompt"].encode_likeness_prompt(clip, "a photo of holder", setup["concept"], "holder", "person", 1.0)


@pytest.mark.parametrize("name,value", [("lora_strength", -0.1), ("text_scale", 3.5), ("visual_scale", -1.0)])
def test_scales_out_of_range(lib, setup, name, value):
    kw = {"lora_strength": 1.0, "text_scale": 1.0, "visual_scale": 1.0, name: value}
    with pytest.raises(ValueError, match=f"{name} must be between 0 and 3"):
        lib["attn"].apply_photoverse(setup["model"], setup["loaded"], setup["concept"], **kw)


def test_bad_window_and_mask(lib, setup):
    with pytest.raises(ValueError, match="start_percent .* must not exceed end_percent"):
        lib["attn"].apply_photoverse(setup["model"], setup["loaded"], setup["concept"], start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="attn_mask must be a MASK"):
        lib["attn"].apply_photoverse(setup["model"], setup["loaded"], setup["concept"], mask=torch.ones(1, 1, 8, 8))


@pytest.mark.parametrize("image,match", [
    (torch.rand(1, 8, 8, 3), "only 8x8 pixels"),
    (torch.rand(1, 64, 64, 5), "5 channels is not an image"),
    (torch.rand(64, 64), "expected an IMAGE"),
])
def test_bad_images_are_refused(lib, setup, image, match):
    with pytest.raises(ValueError, match=match):
        lib["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], image)


def test_grey_rgba_and_non_square_images_are_accepted(lib, setup):
    rgb = face_image(96, 80)
    for image in (rgb.mean(-1, keepdim=True), torch.cat([rgb, torch.ones_like(rgb[..., :1])], -1)):
        concept = lib["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], image)
        assert torch.isfinite(concept.vectors[64]).all()


def test_mask_of_another_size_and_bad_settings(lib, setup):
    with pytest.raises(ValueError, match="mask: the mask is 32x32 but the image is 80x96"):
        lib["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], face_image(), mask=torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="words must be between 1 and 5"):
        lib["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], face_image(), words=6)
    with pytest.raises(ValueError, match="visual_tokens must be one of"):
        lib["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], face_image(), visual_tokens="half")
    with pytest.raises(ValueError, match="is not a CLIP vision model"):
        lib["pvc"].encode_photoverse_concept(setup["loaded"], object(), face_image())


def test_damaged_and_foreign_adapter_files(lib, setup):
    tmp, load = setup["tmp"], lib["file"].load_photoverse
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(open(setup["path"], "rb").read()[:5000])
    with pytest.raises(ValueError, match="'truncated.safetensors' is not a readable safetensors file"):
        load(str(truncated))
    pickle = tmp / "pickle.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(ValueError, match="'pickle.safetensors' is not a readable safetensors file"):
        load(str(pickle))
    from safetensors.torch import save_file
    foreign = tmp / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a PhotoVerse adapter file written by ComfyUI-Likeness"):
        load(str(foreign))
    concept_path = lib["concept_file"].save_photoverse_concept(str(tmp / "c.safetensors"), setup["concept"])
    with pytest.raises(ValueError, match="'c.safetensors' is a PhotoVerse concept file, not a PhotoVerse adapter file"):
        load(concept_path)
    with pytest.raises(ValueError, match="does not exist"):
        load(str(tmp / "missing.safetensors"))


def test_adapter_file_with_wrong_shapes_or_metadata(lib, setup):
    version = lib["file"].VERSION
    tensors, meta = lib["st"].load_file(setup["path"], lib["file"].FORMAT, (version,))
    bad = dict(tensors)
    bad["layers.input_1_0.visual_k.weight"] = torch.zeros(3, 3, dtype=torch.float16)
    path = os.path.join(setup["tmp"], "shapes.safetensors")
    lib["st"].save_file(path, bad, lib["file"].FORMAT, version,
                        {k: v for k, v in meta.items() if not k.startswith("likeness_format")})
    with pytest.raises(ValueError, match=r"wrong shapes: layers.input_1_0.visual_k.weight is \[3, 3\], expected \[32, 64\]"):
        lib["file"].load_photoverse(path)
    path2 = os.path.join(setup["tmp"], "meta.safetensors")
    meta2 = {k: v for k, v in meta.items() if not k.startswith("likeness_format") and k != "clip_vision"}
    lib["st"].save_file(path2, tensors, lib["file"].FORMAT, version, meta2)
    with pytest.raises(ValueError, match="unreadable PhotoVerse metadata"):
        lib["file"].load_photoverse(path2)


def test_damaged_concept_files(lib, setup):
    tmp = setup["tmp"]
    from safetensors.torch import save_file
    good = lib["concept_file"].save_photoverse_concept(str(tmp / "good.safetensors"), setup["concept"])
    version = lib["concept_file"].VERSION
    tensors, meta = lib["st"].load_file(good, lib["concept_file"].FORMAT, (version,))
    tensors["visual"] = torch.zeros(1, 5, 7)
    bad = str(tmp / "bad_concept.safetensors")
    lib["st"].save_file(bad, tensors, lib["concept_file"].FORMAT, version,
                        {k: v for k, v in meta.items() if not k.startswith("likeness_format")})
    with pytest.raises(ValueError, match=r"visual should be \(photos, n, 64\)"):
        lib["concept_file"].load_photoverse_concept(bad)
    with pytest.raises(ValueError, match="is a PhotoVerse adapter file, not a PhotoVerse concept file"):
        lib["concept_file"].load_photoverse_concept(setup["path"])
    save_file({"emb_params": torch.zeros(1, 64)}, str(tmp / "ti.safetensors"))
    with pytest.raises(ValueError, match="not a PhotoVerse concept file written by ComfyUI-Likeness"):
        lib["concept_file"].load_photoverse_concept(str(tmp / "ti.safetensors"))
