"""PhotoVerse nodes in the real host (PromptExecutor, stand-in checkpoint, the host's CLIPVisionLoader with the
stand-in ViT-L/14, the random adapter of assets_photoverse): encode -> save -> load round trip, alpha 0 / gamma 1 /
sigma 0 gives the plain KSampler image, and bad input fails with the problem named and nothing written."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from assets_photoverse import ADAPTER_NAME
from standins import CLIP_VISION_NAME, CHECKPOINT_NAME as CKPT

NODE_IDS = ["LikenessPhotoVerseLoader", "LikenessPhotoVerseEncode", "LikenessPhotoVerseApply",
            "LikenessPhotoVerseConceptSave", "LikenessPhotoVerseConceptLoad"]


def concepts_dir(base_dir):
    return os.path.join(base_dir, "models", "likeness_identities")


def sample_graph(concept_node, alpha=1.0, gamma=1.0, sigma=1.0, text="a photo of holder in a garden", prefix="pv_nodes",
                 apply=True):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": concept_node,
        "3": {"class_type": "LikenessPhotoVerseLoader", "inputs": {"adapter_name": ADAPTER_NAME}},
        "4": {"class_type": "LikenessPhotoVerseApply", "inputs": {
            "model": ["1", 0], "adapter": ["3", 0], "concept": ["2", 0], "lora_strength": alpha, "text_scale": gamma,
            "visual_scale": sigma, "start_percent": 0.0, "end_percent": 1.0}},
        "5": {"class_type": "LikenessPrompt", "inputs": {"clip": ["1", 1], "concept": ["2", 0], "text": text,
                                                         "placeholder": "holder", "class_word": "person", "gamma": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0] if apply else ["1", 0], "seed": 5, "steps": 3, "cfg": 6.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["5", 1], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": prefix}},
    }
    return g


def load_concept(name):
    return {"class_type": "LikenessPhotoVerseConceptLoad", "inputs": {"concept_name": name}}


def image_of(outputs, base_dir, node="10"):
    info = outputs[node]["images"][0]
    return np.asarray(Image.open(os.path.join(base_dir, info["type"], info["subfolder"], info["filename"]))).astype(np.int16)


def error_of(messages):
    errors = [m for m in messages if m[0] in ("execution_error", "validation")]
    assert errors, messages
    return json.dumps(errors[0][1], default=str)


@pytest.fixture(scope="module")
def adapter(workflow_assets, base_dir, pack):
    from comfyui_likeness.weights.photoverse import load_photoverse
    return load_photoverse(os.path.join(base_dir, "models", "likeness", ADAPTER_NAME))


def write_concept(base_dir, loaded, name, seed=0):
    """A concept for the asset adapter with random words and tokens (its identity is the adapter's digest)."""
    from comfyui_likeness.concepts.photoverse_concept import make_concept
    from comfyui_likeness.concepts.photoverse_concept_file import save_photoverse_concept

    g = torch.Generator().manual_seed(seed)
    concept = make_concept(torch.randn(1, 768, generator=g) * 0.02, torch.randn(5, 768, generator=g),
                           torch.randn(5, 768, generator=g), loaded)
    path = os.path.join(concepts_dir(base_dir), "photoverse_tests", name)
    save_photoverse_concept(path, concept)
    return f"photoverse_tests/{name}", concept


def test_nodes_are_registered_with_their_types(host):
    mapping = host.nodes.NODE_CLASS_MAPPINGS
    for node_id in NODE_IDS:
        assert node_id in mapping, node_id
        assert mapping[node_id].GET_SCHEMA().category == "Likeness/photoverse"
    encode = mapping["LikenessPhotoVerseEncode"].INPUT_TYPES()
    assert encode["required"]["clip_vision"][0] == "CLIP_VISION" and encode["optional"]["mask"][0] == "MASK"
    assert list(mapping["LikenessPhotoVerseEncode"].RETURN_TYPES) == ["LIKENESS_CONCEPT"]
    assert list(mapping["LikenessPhotoVerseApply"].RETURN_TYPES) == ["MODEL"]
    assert list(mapping["LikenessPhotoVerseLoader"].RETURN_TYPES) == ["LIKENESS_PHOTOVERSE"]


def test_encode_save_load_round_trip_with_the_hosts_clip_vision(host, base_dir, adapter):
    """The real CLIPVisionLoader feeds PhotoVerse Encode; the saved concept loads back bit-exactly (load -> save gives
    the same tensors) and drives PhotoVerse Apply + Likeness Prompt + KSampler. (The encoder's numbers are pinned
    against an independent computation in test_photoverse_math.py.)"""
    from comfyui_likeness.concepts.photoverse_concept_file import load_photoverse_concept

    encode = {
        "1": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_NAME}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "3": {"class_type": "LikenessPhotoVerseLoader", "inputs": {"adapter_name": ADAPTER_NAME}},
        "4": {"class_type": "LikenessPhotoVerseEncode", "inputs": {
            "adapter": ["3", 0], "clip_vision": ["1", 0], "image": ["2", 0], "words": 2, "visual_tokens": "all"}},
        "5": {"class_type": "LikenessPhotoVerseConceptSave", "inputs": {"concept": ["4", 0], "filename_prefix": "pv_round/face"}},
    }
    ok, outputs, messages = host.run(encode)
    assert ok, messages
    folder = os.path.join(concepts_dir(base_dir), "pv_round")
    saved = sorted(os.listdir(folder))
    assert len(saved) == 1 and saved[0].endswith(".safetensors")
    assert "saved pv_round/" in json.dumps(outputs["5"])
    first = load_photoverse_concept(os.path.join(folder, saved[0]))
    data = first.metadata["photoverse"]
    assert first.vectors[768].shape == (2, 768) and torch.isfinite(first.vectors[768]).all()
    assert data["visual"].shape == data["visual_uncond"].shape == (5, 768)
    assert data["adapter"] == adapter.digest and data["adapter_name"] == ADAPTER_NAME

    ok, _, messages = host.run({
        "1": load_concept(f"pv_round/{saved[0]}"),
        "2": {"class_type": "LikenessPhotoVerseConceptSave", "inputs": {"concept": ["1", 0], "filename_prefix": "pv_round/again"}},
    })
    assert ok, messages
    again = load_photoverse_concept(os.path.join(folder, sorted(set(os.listdir(folder)) - set(saved))[0]))
    assert torch.equal(again.vectors[768], first.vectors[768])
    for key in ("visual", "visual_uncond"):
        assert torch.equal(again.metadata["photoverse"][key], data[key])

    ok, outputs, messages = host.run(sample_graph(load_concept(f"pv_round/{saved[0]}")))
    assert ok, messages
    assert outputs["10"]["images"]


def test_off_settings_give_the_plain_ksampler_image(host, base_dir, adapter):
    name, _ = write_concept(base_dir, adapter, "off.safetensors")
    ok, out_plain, messages = host.run(sample_graph(load_concept(name), apply=False, prefix="pv_plain"))
    assert ok, messages
    ok, out_off, messages = host.run(sample_graph(load_concept(name), 0.0, 1.0, 0.0, prefix="pv_off"))
    assert ok, messages
    ok, out_on, messages = host.run(sample_graph(load_concept(name), 1.0, 1.0, 1.0, prefix="pv_on"))
    assert ok, messages
    plain = image_of(out_plain, base_dir)
    assert np.array_equal(image_of(out_off, base_dir), plain)
    assert np.abs(image_of(out_on, base_dir) - plain).max() > 0


def test_concept_from_another_adapter_fails_in_the_host(host, base_dir, adapter, tmp_path, pack):
    from comfyui_likeness.weights.photoverse import load_photoverse
    from assets_photoverse import write_standin_photoverse

    other_path = write_standin_photoverse(str(tmp_path / "other.safetensors"),
                                          os.path.join(base_dir, "models", "checkpoints", CKPT), seed=99)
    name, _ = write_concept(base_dir, load_photoverse(other_path), "other_adapter.safetensors")
    before = set(os.listdir(os.path.join(base_dir, "output")))
    ok, _, messages = host.run(sample_graph(load_concept(name), prefix="pv_bad"))
    assert not ok
    text = error_of(messages)
    assert "made with another PhotoVerse adapter" in text and ADAPTER_NAME in text
    assert set(os.listdir(os.path.join(base_dir, "output"))) == before


def test_prompt_without_placeholder_fails_in_the_host(host, base_dir, adapter):
    name, _ = write_concept(base_dir, adapter, "no_placeholder.safetensors")
    ok, _, messages = host.run(sample_graph(load_concept(name), text="a photo of a person in a garden"))
    assert not ok
    assert "placeholder 'holder' does not appear in the prompt" in error_of(messages)


def test_foreign_file_in_the_adapter_folder_is_refused(host, base_dir, adapter):
    from safetensors.torch import save_file

    name, _ = write_concept(base_dir, adapter, "foreign_case.safetensors")
    path = os.path.join(base_dir, "models", "likeness", "not_photoverse.safetensors")
    save_file({"w": torch.zeros(3)}, path)
    ok, _, messages = host.run({
        "1": {"class_type": "LikenessPhotoVerseLoader", "inputs": {"adapter_name": "not_photoverse.safetensors"}},
        "2": {"class_type": "LikenessPhotoVerseConceptLoad", "inputs": {"concept_name": name}},
        "3": {"class_type": "LikenessPhotoVerseApply", "inputs": {
            "model": ["4", 0], "adapter": ["1", 0], "concept": ["2", 0], "lora_strength": 1.0, "text_scale": 1.0,
            "visual_scale": 1.0, "start_percent": 0.0, "end_percent": 1.0}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": 5, "steps": 1, "cfg": 6.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["7", 0], "denoise": 1.0}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["4", 1], "text": ""}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
    })
    os.remove(path)
    assert not ok
    assert "not a PhotoVerse adapter file written by ComfyUI-Likeness" in error_of(messages)


def _workflow(name):
    import workflow_tools as wt
    return wt.shrink(wt.load(os.path.join(wt.API_DIR, f"{name}.json")))


def test_multi_photo_workflow_changes_when_the_second_photo_is_added(host, workflow_assets, base_dir):
    """The shipped multi-photo workflow against the same graph with only the first photo reaching Face Crop."""
    both = _workflow("photoverse_multi_photo")
    one = _workflow("photoverse_multi_photo")
    crop = next(n for n in one.values() if n["class_type"] == "LikenessFaceCrop")
    crop["inputs"]["image"] = ["3", 0]
    for prompt, prefix in ((both, "pv_two"), (one, "pv_one")):
        next(n for n in prompt.values() if n["class_type"] == "SaveImage")["inputs"]["filename_prefix"] = prefix
    ok, out_both, messages = host.run(both)
    assert ok, messages
    ok, out_one, messages = host.run(one)
    assert ok, messages
    save = next(k for k, n in both.items() if n["class_type"] == "SaveImage")
    assert np.abs(image_of(out_both, base_dir, save) - image_of(out_one, base_dir, save)).max() > 0


def test_elite_loader_converts_once_into_a_file_the_adapter_loader_lists(host, workflow_assets, base_dir):
    from comfyui_likeness.weights.photoverse import read_spec

    ok, _, messages = host.run(_workflow("photoverse_elite"))
    assert ok, messages
    folder = os.path.join(base_dir, "models", "likeness", "elite", "converted")
    converted = sorted(os.listdir(folder))
    assert len(converted) == 1 and converted[0].startswith("elite_") and converted[0].endswith(".safetensors")
    spec = read_spec(os.path.join(folder, converted[0]))
    assert spec.text_kv == "replace" and spec.image_mapper == "elite_local" and "no face training" in spec.source
    import folder_paths
    assert f"elite/converted/{converted[0]}" in folder_paths.get_filename_list("likeness")
    listed = host.nodes.NODE_CLASS_MAPPINGS["LikenessEliteLoader"].INPUT_TYPES()["required"]
    options = {k: listed[k][1]["options"] for k in ("global_mapper", "local_mapper")}
    assert "global_mapper.pt" in options["global_mapper"] and "local_mapper.pt" in options["local_mapper"]
