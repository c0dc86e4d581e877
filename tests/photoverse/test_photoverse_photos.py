"""Several reference photos in PhotoVerse (docs/methods/photoverse.md, "Several photos"): each combine mode equals a
direct computation on the photos' own words and tokens, one photo is unchanged by every mode, the unconditional
tokens follow the mode, a saved concept keeps every photo, version-1 files still load, and a second photo changes
the sampled image."""
import pytest
import torch

import micro as m
from fixtures_photoverse import face_image, loaded_adapter, random_cond, sample


@pytest.fixture(scope="module")
def setup(pack, tmp_path_factory):
    from comfyui_likeness.concepts import photoverse_concept as pvc

    model, cv = m.micro_model(), m.micro_clip_vision()
    loaded = loaded_adapter(tmp_path_factory.mktemp("pv_photos") / "adapter.safetensors", model, cv, seed=8)
    photos = torch.cat([face_image(seed=s) for s in (1, 2, 3)])
    singles = [pvc.encode_photoverse_concept(loaded, cv, photos[i:i + 1], words=2) for i in range(3)]
    return {"model": model, "cv": cv, "loaded": loaded, "photos": photos, "singles": singles, "pvc": pvc}


def by_hand(x: torch.Tensor, mode: str) -> torch.Tensor:
    """The combine modes written out per vector position (docs/methods/photoverse.md)."""
    if mode == "average":
        return x.mean(0)
    if mode == "concat":
        return torch.cat(list(x))
    out = torch.empty_like(x[0])
    for j in range(x.shape[1]):
        units = [x[p, j] / x[p, j].norm() for p in range(x.shape[0])]
        direction = sum(units) / len(units)
        out[j] = direction / direction.norm() * sum(float(x[p, j].norm()) for p in range(x.shape[0])) / x.shape[0]
    return out


@pytest.mark.parametrize("mode", ["average", "concat", "norm_average"])
def test_each_combine_mode_equals_a_direct_computation(setup, mode):
    concept = setup["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], setup["photos"], words=2, combine=mode)
    words = torch.stack([c.vectors[64] for c in setup["singles"]])                           # (3, 2, 64)
    visual = torch.stack([c.metadata["photoverse"]["visual"] for c in setup["singles"]])     # (3, 5, 64)
    data = concept.metadata["photoverse"]
    assert torch.allclose(concept.vectors[64], by_hand(words, mode), atol=1e-5)
    assert torch.allclose(data["visual"], by_hand(visual, mode), atol=1e-5)
    assert concept.vectors[64].shape[0] == (6 if mode == "concat" else 2)
    uncond = setup["singles"][0].metadata["photoverse"]["visual_uncond"]
    assert torch.allclose(data["visual_uncond"], torch.cat([uncond] * 3) if mode == "concat" else uncond, atol=1e-6)
    assert data["images"] == 3 and data["combine"] == mode


@pytest.mark.parametrize("mode", ["average", "concat", "norm_average"])
def test_one_photo_is_unchanged_by_every_mode(setup, mode):
    one = setup["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], setup["photos"][:1], words=2, combine=mode)
    single = setup["singles"][0]
    assert torch.allclose(one.vectors[64], single.vectors[64], atol=1e-5)
    assert torch.allclose(one.metadata["photoverse"]["visual"], single.metadata["photoverse"]["visual"], atol=1e-5)


def test_norm_average_keeps_the_mean_length_and_is_not_the_average(setup):
    x = torch.tensor([[[3.0, 0.0]], [[0.0, 1.0]]])
    from comfyui_likeness.concepts.combine import combine_photos

    got = combine_photos(x, "norm_average")
    assert torch.allclose(got, torch.tensor([[2.0 / 2 ** 0.5, 2.0 / 2 ** 0.5]]), atol=1e-6)
    assert not torch.allclose(got, combine_photos(x, "average"))
    with pytest.raises(ValueError, match="combine must be one of average, concat, norm_average"):
        combine_photos(x, "sum")


def test_a_second_photo_changes_the_sampled_image(setup):
    from comfyui_likeness.attention.photoverse import apply_photoverse

    pvc, loaded, cv = setup["pvc"], setup["loaded"], setup["cv"]
    pos, neg = random_cond(64, 1), random_cond(64, 2)
    one = pvc.encode_photoverse_concept(loaded, cv, setup["photos"][:1])
    two = pvc.encode_photoverse_concept(loaded, cv, setup["photos"][:2])
    concat = pvc.encode_photoverse_concept(loaded, cv, setup["photos"][:2], combine="concat")
    outs = [sample(apply_photoverse(setup["model"], loaded, c, 0.0), pos, neg) for c in (one, two, concat)]
    assert not torch.allclose(outs[0], outs[1], atol=1e-5)
    assert not torch.allclose(outs[1], outs[2], atol=1e-5)


def test_saved_concept_keeps_every_photo_and_its_combine_mode(setup, tmp_path):
    from comfyui_likeness.concepts.photoverse_concept import recombine
    from comfyui_likeness.concepts.photoverse_concept_file import load_photoverse_concept, save_photoverse_concept

    concept = setup["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], setup["photos"], words=2,
                                                     combine="norm_average")
    back = load_photoverse_concept(save_photoverse_concept(str(tmp_path / "three.safetensors"), concept))
    a, b = concept.metadata["photoverse"], back.metadata["photoverse"]
    assert b["images"] == 3 and b["combine"] == "norm_average"
    assert b["photos"]["words"][64].shape == (3, 2, 64) and b["photos"]["visual"].shape == (3, 5, 64)
    assert torch.equal(b["photos"]["words"][64], a["photos"]["words"][64])
    assert torch.allclose(back.vectors[64], concept.vectors[64], atol=1e-6)
    assert torch.allclose(b["visual"], a["visual"], atol=1e-6) and torch.equal(b["visual_uncond"], a["visual_uncond"])
    concat = recombine(back, "concat")
    assert concat.vectors[64].shape == (6, 64)
    assert back.metadata["photoverse"]["combine"] == "norm_average"   # recombine leaves its input as it was


def test_version_1_files_still_load(setup, tmp_path):
    """Files written before format version 2: an adapter with ELITE's mappers under text_adapter.* and one text
    width, and a concept of one combined photo."""
    from comfyui_likeness.concepts.photoverse_concept_file import FORMAT as CONCEPT_FORMAT, load_photoverse_concept
    from comfyui_likeness.weights import photoverse as pv_file
    from comfyui_likeness.weights.safetensors_file import save_file

    adapter = pv_file.new_adapter_for(setup["model"], {"width": 32, "layers": 24, "image_size": 224, "patch": 14},
                                      hidden=16, mapper="elite").init_random(3)
    meta = adapter.spec.to_metadata()
    v1_meta = {k: meta[k] for k in ("context_dim", "clip_vision", "clip_layers", "sites", "hidden", "lora_rank",
                                    "base_model", "model_name", "model_channels")}
    v1_meta.update({"text_width": 64, "method": "photoverse", "origin": "random"})
    tensors = {k.replace("text_adapters.64.", "text_adapter."): v for k, v in adapter.state_dict().items()}
    assert any(k.startswith("text_adapter.mapping_0.") for k in tensors)
    path = save_file(str(tmp_path / "v1.safetensors"), tensors, pv_file.FORMAT, 1, v1_meta)
    loaded = pv_file.load_photoverse(path)
    assert loaded.spec.text_mapper == loaded.spec.image_mapper == "elite" and loaded.spec.text_widths == (64,)
    feats = torch.randn(1, 5, 257, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module.words(feats)[64], adapter.words(feats)[64], atol=1e-6)

    g = torch.Generator().manual_seed(0)
    words, visual, uncond = torch.randn(1, 64, generator=g), torch.randn(5, 64, generator=g), torch.randn(5, 64, generator=g)
    concept_meta = {"adapter": loaded.digest, "adapter_name": "v1.safetensors", "base_model": "", "model_name": "",
                    "clip_vision": "", "method": "photoverse", "text_width": 64, "context_dim": 64, "images": 1,
                    "source": "old"}
    cpath = save_file(str(tmp_path / "c1.safetensors"), {"words": words, "visual": visual, "visual_uncond": uncond},
                      CONCEPT_FORMAT, 1, concept_meta)
    concept = load_photoverse_concept(cpath)
    data = concept.metadata["photoverse"]
    assert torch.equal(concept.vectors[64], words) and torch.equal(data["visual"], visual)
    assert torch.equal(data["visual_uncond"], uncond) and data["images"] == 1
    from comfyui_likeness.attention.photoverse import apply_photoverse
    assert apply_photoverse(setup["model"], loaded, concept) is not setup["model"]
