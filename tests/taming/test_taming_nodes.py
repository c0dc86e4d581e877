"""Taming Encoder nodes in the real host (PromptExecutor, stand-in checkpoint, the host's CLIPVisionLoader on the
full-size stand-in ViT-L/14): encode -> save -> load -> apply round trip, weight 0 equals the plain KSampler image,
and wrong pairings or bad input fail with the input named while the next prompt still runs."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import micro as m
from fixtures_taming import micro_cv, taming, taming_assets  # noqa: F401
import standins

CKPT = standins.CHECKPOINT_NAME
CLIP_VISION = standins.CLIP_VISION_NAME
ADAPTER = "taming_encoder_sd15_vitl14.safetensors"


def graph(embeds_node: dict, weight=0.8, adapter=ADAPTER, prefix="taming_nodes", extra=None, apply=True):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "5": embeds_node,
        "6": {"class_type": "LikenessTamingLoader", "inputs": {"adapter_name": adapter}},
        "7": {"class_type": "LikenessTamingApply", "inputs": {
            "model": ["1", 0], "taming": ["6", 0], "object_embeds": ["5", 0], "weight": weight,
            "start_percent": 0.0, "end_percent": 1.0, "uncond": "null embedding", "combine": "average"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat on a bookshelf"}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["7", 0] if apply else ["1", 0], "seed": 5, "steps": 3, "cfg": 6.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["8", 0], "negative": ["9", 0], "latent_image": ["10", 0],
            "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": prefix}},
    }
    if not apply:
        for k in ("5", "6", "7"):
            g.pop(k)
    g.update(extra or {})
    return g


def encode_nodes(image="chelsea.png", mask=True):
    return {
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION}},
        "3": {"class_type": "LoadImage", "inputs": {"image": image}},
        "5": {"class_type": "LikenessTamingEncode", "inputs": {
            "clip_vision": ["2", 0], "image": ["3", 0], "background": "black", "crop": "subject box",
            "margin": 0.1, **({"mask": ["3", 1]} if mask else {})}},
    }


def load_node(name):
    return {"class_type": "LikenessObjectEmbedsLoad", "inputs": {"embeds_name": name}}


def image_of(outputs, base_dir, node="13"):
    info = outputs[node]["images"][0]
    path = os.path.join(base_dir, info["type"], info["subfolder"], info["filename"])
    return np.asarray(Image.open(path)).astype(np.int16)


def error_of(messages):
    errors = [msg for msg in messages if msg[0] in ("execution_error", "validation")]
    assert errors, messages
    return json.dumps(errors[0][1], default=str)


def concepts(base_dir, *parts):
    return os.path.join(base_dir, "models", "likeness_identities", *parts)


@pytest.fixture(scope="module")
def saved_embeds(host, taming_assets, base_dir):  # noqa: F811
    """Encode the painted cat once through the real loader and save it; returns (name, image of that run)."""
    extra = {**encode_nodes(),
             "14": {"class_type": "LikenessObjectEmbedsSave",
                    "inputs": {"object_embeds": ["5", 0], "filename_prefix": "tests/cat"}},
             "15": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}}}
    ok, outputs, messages = host.run(graph(encode_nodes()["5"], prefix="taming_direct", extra=extra))
    assert ok, messages
    saved = sorted(f for f in os.listdir(concepts(base_dir, "tests")) if f.startswith("cat"))
    assert saved and "saved tests/cat" in json.dumps(outputs["14"])
    assert outputs["15"]["images"], "the subject preview is missing"
    return f"tests/{saved[-1]}", image_of(outputs, base_dir)


def test_encode_save_load_apply_round_trip(host, base_dir, saved_embeds, taming):  # noqa: F811
    name, direct = saved_embeds
    emb = taming["embeds_file"].load_object_embeds(concepts(base_dir, name))
    assert emb.features.shape == (1, 257, 1024) and emb.vision.name == "ViT-L/14" and emb.info["masked"]
    ok, outputs, messages = host.run(graph(load_node(name), prefix="taming_loaded"))
    assert ok, messages
    assert np.array_equal(image_of(outputs, base_dir), direct)  # the file gives back the very same image


def test_weight_zero_gives_the_plain_ksampler_image(host, base_dir, saved_embeds):
    name, _ = saved_embeds
    ok, outputs, messages = host.run(graph(None, apply=False, prefix="taming_plain"))
    assert ok, messages
    plain = image_of(outputs, base_dir)
    ok, outputs, messages = host.run(graph(load_node(name), weight=0.0, prefix="taming_w0"))
    assert ok, messages
    assert np.array_equal(image_of(outputs, base_dir), plain)
    ok, outputs, messages = host.run(graph(load_node(name), weight=1.5, prefix="taming_w15"))
    assert ok, messages
    assert not np.array_equal(image_of(outputs, base_dir), plain)


def test_adapter_for_another_model_fails_clearly_and_changes_nothing(host, base_dir, saved_embeds,
                                                                     taming):  # noqa: F811
    name, _ = saved_embeds
    micro_adapter = "taming_micro_context64.safetensors"
    taming["file"].write_random_taming(os.path.join(base_dir, "models", "likeness", micro_adapter), m.micro_model(),
                                       taming["enc"].VisionSpec(1024, 257, 24), queries=2, depth=1)
    before = sorted(os.listdir(os.path.join(base_dir, "models", "likeness")))
    ok, _, messages = host.run(graph(load_node(name), adapter=micro_adapter))
    assert not ok
    text = error_of(messages)
    assert "LikenessTamingApply" in text and "context 64" in text and "context 768" in text
    assert sorted(os.listdir(os.path.join(base_dir, "models", "likeness"))) == before
    ok, _, messages = host.run(graph(load_node(name), prefix="taming_after_error"))  # the host still works
    assert ok, messages


def test_adapter_for_another_clip_vision_fails_clearly(host, base_dir, saved_embeds, taming):  # noqa: F811
    import assets_taming

    name, _ = saved_embeds
    vit_h = "taming_sd15_vith14.safetensors"
    path = os.path.join(base_dir, "models", "likeness", vit_h)
    if not os.path.exists(path):
        assets_taming.write_standin_taming(path, os.path.join(base_dir, "models", "checkpoints", CKPT),
                                           vision=taming["enc"].VisionSpec(1280, 257, 32))
    ok, _, messages = host.run(graph(load_node(name), adapter=vit_h))
    assert not ok
    text = error_of(messages)
    assert "trained on ViT-H/14" in text and "comes from ViT-L/14" in text


def test_empty_mask_is_refused_with_the_input_named(host, taming_assets):  # noqa: F811
    # coffee.png has no alpha channel: LoadImage gives an all-zero MASK, as when a user forgot to paint
    extra = encode_nodes(image="coffee.png", mask=True)
    ok, _, messages = host.run(graph(extra["5"], extra=extra))
    assert not ok
    text = error_of(messages)
    assert "LikenessTamingEncode" in text and "mask 0 is empty" in text and "MaskEditor" in text


def test_foreign_file_in_the_adapter_folder_is_refused(host, base_dir, saved_embeds):
    from safetensors.torch import save_file

    name, _ = saved_embeds
    foreign = "some_other_pack_adapter.safetensors"
    save_file({"ip_adapter.1.to_k_ip.weight": torch.zeros(4, 4)}, os.path.join(base_dir, "models", "likeness", foreign))
    ok, _, messages = host.run(graph(load_node(name), adapter=foreign))
    assert not ok
    text = error_of(messages)
    assert "LikenessTamingLoader" in text and "not a Taming Encoder adapter file written by ComfyUI-Likeness" in text


def test_nodes_are_registered_with_their_types(host):
    import nodes

    apply = nodes.NODE_CLASS_MAPPINGS["LikenessTamingApply"].GET_NODE_INFO_V1()
    required, optional = apply["input"]["required"], apply["input"].get("optional", {})
    assert required["model"][0] == "MODEL" and required["taming"][0] == "LIKENESS_TAMING"
    assert required["object_embeds"][0] == "LIKENESS_OBJECT_EMBEDS" and "attn_mask" in optional
    assert apply["output"] == ["MODEL"] and apply["category"] == "Likeness/taming"
    assert required["combine"][1]["options"] == ["average", "concat", "norm average"]
    encode = nodes.NODE_CLASS_MAPPINGS["LikenessTamingEncode"].GET_NODE_INFO_V1()
    assert encode["input"]["required"]["clip_vision"][0] == "CLIP_VISION" and "mask" in encode["input"]["optional"]
    assert encode["input"]["optional"]["add_to"][0] == "LIKENESS_OBJECT_EMBEDS"
    assert encode["output"] == ["LIKENESS_OBJECT_EMBEDS", "IMAGE"]
    for node_id in ("LikenessTamingLoader", "LikenessObjectEmbedsSave", "LikenessObjectEmbedsLoad"):
        assert nodes.NODE_CLASS_MAPPINGS[node_id].GET_NODE_INFO_V1()["category"] == "Likeness/taming"


def test_second_photo_added_through_add_to_changes_the_image(host, base_dir, saved_embeds):
    """Several photos of different sizes: a second Encode adds the coffee photo to the saved cat embedding; Apply
    combines them (norm average), and the image differs from the one-photo image."""
    name, one_photo = saved_embeds
    extra = {"2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION}},
             "3": {"class_type": "LoadImage", "inputs": {"image": "coffee.png"}},
             "4": load_node(name)}
    second = {"class_type": "LikenessTamingEncode", "inputs": {
        "clip_vision": ["2", 0], "image": ["3", 0], "background": "white", "crop": "pad to square", "margin": 0.1,
        "add_to": ["4", 0]}}
    g = graph(second, prefix="taming_two_photos", extra=extra)
    g["7"]["inputs"]["combine"] = "norm average"
    ok, outputs, messages = host.run(g)
    assert ok, messages
    assert not np.array_equal(image_of(outputs, base_dir), one_photo)


def test_add_to_appends_photos_and_refuses_another_tower(taming, micro_cv):  # noqa: F811
    from fixtures_taming import subject_photo

    from comfyui_likeness.nodes.taming import LikenessTamingEncode

    small, small_mask = subject_photo(h=60, w=80, seed=3)
    big, big_mask = subject_photo(h=90, w=120, seed=5)
    first = LikenessTamingEncode.execute(micro_cv, small, "black", "subject box", 0.1, mask=small_mask).result[0]
    out = LikenessTamingEncode.execute(micro_cv, big, "black", "subject box", 0.1, mask=big_mask, add_to=first).result
    alone = taming["obj"].encode_object(micro_cv, big, big_mask)
    assert out[0].images == 2 and out[1].shape[0] == 2 and len(out[0].info["photos"]) == 2
    assert torch.equal(out[0].features[0], first.features[0]) and torch.equal(out[0].features[1], alone.features[0])
    other = m.micro_clip_vision(width=48)
    with pytest.raises(ValueError, match="add_to was encoded with .*32 wide.* but this clip_vision is .*48 wide"):
        LikenessTamingEncode.execute(other, big, "black", "subject box", 0.1, mask=big_mask, add_to=first)
    with pytest.raises(ValueError, match="add_to must come from Taming Encode"):
        LikenessTamingEncode.execute(micro_cv, big, "black", "subject box", 0.1, add_to="not an embedding")
