"""The face nodes inside the real host: registration, graphs through PromptExecutor, errors as users see them,
and the shipped face workflows (API format) run in-process."""
import copy
import json
import os

import pytest

import host_harness as harness
from fixtures_faces import tiny_packs  # noqa: F401  (fixture)

NODE_IDS = {"LikenessFaceAnalysisLoader", "LikenessFaceCrop", "LikenessFaceEmbed", "LikenessScore"}
WORKFLOWS = os.path.join(harness.REPO, "example_workflows", "api")


def loader(backend="mediapipe", pack="antelopev2", det_thresh=0.5):
    return {"class_type": "LikenessFaceAnalysisLoader",
            "inputs": {"backend": backend, "insightface_pack": pack, "provider": "CPU", "det_size": 640,
                       "det_thresh": det_thresh}}


def crop(image_ref, size=224, no_face="error", mask_source="face_oval"):
    return {"class_type": "LikenessFaceCrop",
            "inputs": {"image": image_ref, "face_analysis": ["fa", 0], "size": size, "factor": 1.3, "order": "largest",
                       "index": 0, "border": "shift", "no_face": no_face, "mask_source": mask_source}}


def errors_of(messages) -> str:
    return json.dumps([m for m in messages if m[0] in ("execution_error", "validation")], default=str)


def test_nodes_are_registered_with_their_category(host):
    import nodes

    assert NODE_IDS <= set(nodes.NODE_CLASS_MAPPINGS)
    for node_id in NODE_IDS:
        assert nodes.NODE_CLASS_MAPPINGS[node_id].GET_SCHEMA().category == "Likeness/faces"


def test_pack_choices_follow_the_insightface_folder(host, tiny_packs):  # noqa: F811
    import nodes

    inputs = nodes.NODE_CLASS_MAPPINGS["LikenessFaceAnalysisLoader"].INPUT_TYPES()["required"]
    packs = inputs["insightface_pack"][1]["options"] if isinstance(inputs["insightface_pack"][0], str) else inputs["insightface_pack"][0]
    assert {"antelopev2", "buffalo_l", "likeness_centre", "likeness_nested"} <= set(packs)


def test_face_crop_graph_runs_and_saves_the_crops(host, input_images):
    prompt = {
        "img": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "fa": loader(),
        "crop": crop(["img", 0]),
        "save": {"class_type": "SaveImage", "inputs": {"images": ["crop", 2], "filename_prefix": "faces_test_crop"}},
        "mask": {"class_type": "MaskToImage", "inputs": {"mask": ["crop", 1]}},
        "save_mask": {"class_type": "SaveImage", "inputs": {"images": ["mask", 0], "filename_prefix": "faces_test_mask"}},
    }
    ok, outputs, messages = host.run(prompt)
    assert ok, errors_of(messages)
    import folder_paths
    from PIL import Image

    saved = outputs["save"]["images"][0]
    with Image.open(os.path.join(folder_paths.get_output_directory(), saved["subfolder"], saved["filename"])) as im:
        assert im.size == (224, 224)
    mask_file = outputs["save_mask"]["images"][0]
    with Image.open(os.path.join(folder_paths.get_output_directory(), mask_file["subfolder"], mask_file["filename"])) as im:
        fraction = (im.convert("L").point(lambda v: 255 if v > 127 else 0).histogram()[255]) / (224 * 224)
    assert 0.25 < fraction < 0.75


def test_no_face_error_reaches_the_user_and_skip_continues(host, input_images):
    prompt = {
        "img": {"class_type": "LoadImage", "inputs": {"image": "coffee.png"}},
        "fa": loader(),
        "crop": crop(["img", 0]),
        "save": {"class_type": "PreviewImage", "inputs": {"images": ["crop", 0]}},
    }
    ok, _, messages = host.run(prompt)
    assert not ok
    assert "no face found in image 0 of 1" in errors_of(messages)
    prompt["crop"]["inputs"]["no_face"] = "original"
    ok, outputs, messages = host.run(prompt)
    assert ok, errors_of(messages)
    assert len(outputs["save"]["images"]) == 1


def test_a_missing_pack_fails_the_loader_with_the_instructions(host, tiny_packs):  # noqa: F811
    prompt = {"fa": loader("insightface", "antelopev2"),
              "img": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
              "crop": crop(["img", 0]),
              "out": {"class_type": "PreviewImage", "inputs": {"images": ["crop", 0]}}}
    ok, _, messages = host.run(prompt)
    errors = errors_of(messages)
    assert not ok and "insightface model pack 'antelopev2' not found" in errors and "antelopev2/antelopev2" in errors


def test_embed_and_score_nodes_with_an_insightface_pack(host, input_images, tiny_packs):  # noqa: F811
    prompt = {
        "img": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["img", 0], "image2": ["img", 0]}},
        "fa": loader("insightface", "likeness_centre"),
        "embed": {"class_type": "LikenessFaceEmbed",
                  "inputs": {"image": ["batch", 0], "face_analysis": ["fa", 0], "order": "largest", "index": 0,
                             "no_face": "error"}},
        "aligned": {"class_type": "PreviewImage", "inputs": {"images": ["embed", 1]}},
        "score": {"class_type": "LikenessScore",
                  "inputs": {"face_analysis": ["fa", 0], "reference": ["img", 0], "images": ["batch", 0]}},
    }
    ok, outputs, messages = host.run(prompt)
    assert ok, errors_of(messages)
    assert len(outputs["aligned"]["images"]) == 2
    text = outputs["score"]["text"][0]
    assert "image 0: 1.0000" in text and "image 1: 1.0000" in text and "mean 1.0000" in text


def test_score_with_a_detection_only_backend_is_a_clear_error(host, input_images):
    prompt = {
        "img": {"class_type": "LoadImage", "inputs": {"image": "astronaut.png"}},
        "fa": loader("opencv"),
        "score": {"class_type": "LikenessScore",
                  "inputs": {"face_analysis": ["fa", 0], "reference": ["img", 0], "images": ["img", 0]}},
    }
    ok, _, messages = host.run(prompt)
    assert not ok and "has no recognition model" in errors_of(messages)


def _shrunk(prompt):
    """What the generic workflow test does: 64x64 latents, at most 3 steps."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(width=64, height=64)
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = min(node["inputs"]["steps"], 3)
    return prompt


@pytest.mark.parametrize("name", ["face_crop", "face_likeness_score"])
def test_shipped_face_workflows_run_in_process(host, workflow_assets, name):
    with open(os.path.join(WORKFLOWS, f"{name}.json")) as f:
        prompt = json.load(f)
    ok, outputs, messages = host.run(_shrunk(prompt))
    assert ok, errors_of(messages)
    assert any("images" in out for out in outputs.values())
    if name == "face_likeness_score":
        score = [out for nid, out in outputs.items() if prompt[nid]["class_type"] == "LikenessScore"][0]
        assert "over 4 image(s)" in score["text"][0]
