"""Inv-Adapter nodes in the real host (PromptExecutor, stand-in checkpoint): extract -> save -> load -> apply
round trip, weight 0 equals the plain KSampler image, and bad input fails with the input named and nothing else
changed."""
import json
import os

import numpy as np
import torch
from PIL import Image

from fixtures_inv_adapter import face_image, layout_model, random_cond
import standins

CKPT = standins.CHECKPOINT_NAME


def graph(features_node: dict, weight=0.8, prefix="inv_nodes", extra=None, latent=64):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear", "width": 64,
                                                     "height": 80, "crop": "center"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a face"}},
        "5": features_node,
        "6": {"class_type": "LikenessInvAdapterApply", "inputs": {
            "model": ["1", 0], "inv_features": ["5", 0], "weight": weight, "self_attention": True,
            "cross_attention": True, "start_percent": 0.0, "end_percent": 1.0, "apply_to": "cond and uncond"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a person in a garden"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": latent, "height": latent, "batch_size": 1}},
        "10": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 3, "steps": 3, "cfg": 6.0, "sampler_name": "euler", "scheduler": "ddim_uniform",
            "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["9", 0], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": prefix}},
    }
    g.update(extra or {})
    return g


def extract_node(steps=3, store="trajectory only", image=("3", 0)):
    return {"class_type": "LikenessInvAdapterExtract", "inputs": {
        "model": ["1", 0], "vae": ["1", 2], "image": list(image), "caption": ["4", 0], "steps": steps,
        "scheduler": "ddim_uniform", "size": 64, "store": store}}


def load_node(name):
    return {"class_type": "LikenessInvFeaturesLoad", "inputs": {"features_name": name}}


def image_of(outputs, base_dir, node="12"):
    info = outputs[node]["images"][0]
    path = os.path.join(base_dir, info["type"], info["subfolder"], info["filename"])
    return np.asarray(Image.open(path)).astype(np.int16)


def error_of(messages):
    errors = [m for m in messages if m[0] in ("execution_error", "validation")]
    assert errors, messages
    return json.dumps(errors[0][1], default=str)


def concepts_dir(base_dir):
    return os.path.join(base_dir, "models", "likeness_identities")


def test_extract_save_load_apply_round_trip(host, base_dir):
    save = {"13": {"class_type": "LikenessInvFeaturesSave",
                   "inputs": {"inv_features": ["5", 0], "filename_prefix": "tests/roundtrip"}}}
    ok, outputs, messages = host.run(graph(extract_node(), prefix="inv_direct", extra=save))
    assert ok, messages
    direct = image_of(outputs, base_dir)
    saved = sorted(f for f in os.listdir(os.path.join(concepts_dir(base_dir), "tests")) if f.startswith("roundtrip"))
    assert saved and "saved tests/roundtrip" in json.dumps(outputs["13"])
    ok, outputs, messages = host.run(graph(load_node(f"tests/{saved[-1]}"), prefix="inv_loaded"))
    assert ok, messages
    assert np.array_equal(image_of(outputs, base_dir), direct)  # the file gives back the very same image


def test_weight_zero_gives_the_plain_ksampler_image(host, base_dir):
    plain = graph(extract_node(), prefix="inv_plain")
    plain["10"]["inputs"]["model"] = ["1", 0]
    del plain["6"], plain["5"]
    ok, outputs, messages = host.run(plain)
    assert ok, messages
    reference = image_of(outputs, base_dir)
    ok, outputs, messages = host.run(graph(extract_node(store="per-step features"), weight=0.0, prefix="inv_zero"))
    assert ok, messages
    assert np.array_equal(image_of(outputs, base_dir), reference)
    ok, outputs, messages = host.run(graph(extract_node(store="per-step features"), weight=1.0, prefix="inv_one"))
    assert ok, messages
    assert np.abs(image_of(outputs, base_dir) - reference).max() > 0


def test_features_of_another_model_fail_clearly_and_change_nothing(host, base_dir, pack):
    import micro as m
    from comfyui_likeness.attention.inv_adapter import extract_inv_features
    from comfyui_likeness.weights.inv_features_file import save_inv_features

    foreign = extract_inv_features(layout_model("micro"), m.micro_vae(), face_image(), random_cond(64, 1), 2, size=64)
    os.makedirs(concepts_dir(base_dir), exist_ok=True)
    path = save_inv_features(os.path.join(concepts_dir(base_dir), "micro_face.safetensors"), foreign)
    before = open(path, "rb").read()
    ok, _, messages = host.run(graph(load_node("micro_face.safetensors"), prefix="inv_wrong"))
    assert not ok
    message = error_of(messages)
    assert "extracted with SD15" in message and "run Inv-Adapter Extract with this model" in message
    assert open(path, "rb").read() == before
    ok, _, messages = host.run(graph(extract_node(), prefix="inv_after_error"))  # the queue still works
    assert ok, messages


def test_tiny_image_is_refused_with_the_input_named(host):
    tiny = {"20": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear",
                                                          "width": 24, "height": 24, "crop": "center"}}}
    ok, _, messages = host.run(graph(extract_node(image=("20", 0)), extra=tiny))
    assert not ok
    assert "image is only 24x24 pixels" in error_of(messages)


def test_foreign_file_in_the_features_folder_is_refused(host, base_dir):
    from safetensors.torch import save_file

    os.makedirs(concepts_dir(base_dir), exist_ok=True)
    save_file({"emb_params": torch.zeros(1, 768)}, os.path.join(concepts_dir(base_dir), "an_embedding.safetensors"))
    ok, _, messages = host.run(graph(load_node("an_embedding.safetensors")))
    assert not ok
    assert "not an Inv-Adapter features file written by ComfyUI-Likeness" in error_of(messages)


def test_nodes_are_registered_with_their_types(host):
    import nodes

    for name in ("LikenessInvAdapterExtract", "LikenessInvAdapterApply", "LikenessInvFeaturesSave",
                 "LikenessInvFeaturesLoad", "LikenessEAALoader"):
        cls = nodes.NODE_CLASS_MAPPINGS[name]
        assert cls.GET_SCHEMA().category == "Likeness/inv_adapter"
    apply_inputs = nodes.NODE_CLASS_MAPPINGS["LikenessInvAdapterApply"].INPUT_TYPES()
    assert set(apply_inputs["optional"]) == {"adapter", "attn_mask", "combine", "speed"}
    assert apply_inputs["optional"]["speed"][1]["default"] == "exact"  # the fast mode is opt-in
    assert apply_inputs["required"]["weight"][1]["default"] == 0.8


def test_the_two_photo_workflow_changes_its_image_when_the_second_photo_is_added(host, workflow_assets, base_dir):
    import workflow_tools as wt

    two = wt.shrink(wt.load(os.path.join(wt.API_DIR, "inv_adapter_two_photos.json")))
    one = json.loads(json.dumps(two))
    extract = next(k for k, v in one.items() if v["class_type"] == "LikenessInvAdapterExtract")
    batch = one[extract]["inputs"]["image"][0]
    assert two[batch]["class_type"] == "ImageBatch"
    one[extract]["inputs"]["image"] = two[batch]["inputs"]["image1"]  # the first photo alone
    save = next(k for k, v in one.items() if v["class_type"] == "SaveImage")
    one[save]["inputs"]["filename_prefix"] = "inv_one_photo"
    two[save]["inputs"]["filename_prefix"] = "inv_two_photos"
    images = []
    for prompt in (one, two):
        ok, outputs, messages = host.run(prompt)
        assert ok, messages
        images.append(image_of(outputs, base_dir, save))
    assert np.abs(images[0] - images[1]).max() > 0
