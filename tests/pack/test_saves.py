"""Every Save node of the pack, in the real host: two identities saved under one prefix give two numbered files
(the host's <prefix>_00001_ convention), files written by earlier versions in models/likeness/concepts still
load, the saved identities live in models/likeness_identities which the adapter loaders do not list, and bad
prefixes are refused when the prompt is queued, naming filename_prefix, with nothing written."""
import json
import os

import pytest
import torch

import micro as m
from fixtures_inv_adapter import face_image, layout_model, random_cond
from fixtures_taming import subject_photo


def identities(base_dir, *parts):
    return os.path.join(base_dir, "models", "likeness_identities", *parts)


def legacy(base_dir, *parts):
    return os.path.join(base_dir, "models", "likeness", "concepts", *parts)


def inv_features(seed):
    from comfyui_likeness.attention.inv_adapter import extract_inv_features
    return extract_inv_features(layout_model("micro"), m.micro_vae(), face_image(seed=seed), random_cond(64, seed), 2, size=64)


def object_embeds(seed):
    from comfyui_likeness.encoders.taming_object import encode_object
    img, mask = subject_photo(seed=seed)
    return encode_object(m.micro_clip_vision(), img, mask)


def photoverse_concept(seed, base_dir):
    from comfyui_likeness.concepts.photoverse_concept import make_concept
    from comfyui_likeness.weights.photoverse import load_photoverse
    import assets_photoverse

    adapter = load_photoverse(os.path.join(base_dir, "models", "likeness", assets_photoverse.ADAPTER_NAME))
    g = torch.Generator().manual_seed(seed)
    return make_concept(torch.randn(1, 768, generator=g) * 0.02, torch.randn(5, 768, generator=g),
                        torch.randn(5, 768, generator=g), adapter)


def _writers():
    from comfyui_likeness.concepts.photoverse_concept_file import load_photoverse_concept, save_photoverse_concept
    from comfyui_likeness.weights.inv_features_file import load_inv_features, save_inv_features
    from comfyui_likeness.weights.taming_embeds_file import load_object_embeds, save_object_embeds

    # kind -> (Load node, its file input, its output input name on the Save node, Save node, make, save, load, same)
    return {
        "inv_features": ("LikenessInvFeaturesLoad", "features_name", "inv_features", "LikenessInvFeaturesSave",
                         lambda seed, _: inv_features(seed), save_inv_features, load_inv_features,
                         lambda a, b: torch.equal(a.latents, b.latents)),
        "object_embeds": ("LikenessObjectEmbedsLoad", "embeds_name", "object_embeds", "LikenessObjectEmbedsSave",
                          lambda seed, _: object_embeds(seed), save_object_embeds, load_object_embeds,
                          lambda a, b: torch.equal(a.features, b.features)),
        "photoverse_concept": ("LikenessPhotoVerseConceptLoad", "concept_name", "concept", "LikenessPhotoVerseConceptSave",
                               photoverse_concept, save_photoverse_concept, load_photoverse_concept,
                               lambda a, b: torch.equal(a.vectors[768], b.vectors[768])),
    }


KINDS = ["inv_features", "object_embeds", "photoverse_concept"]


def save_graph(kind, name, prefix):
    load, file_input, out_input, save, *_ = _writers()[kind]
    return {"1": {"class_type": load, "inputs": {file_input: name}},
            "2": {"class_type": save, "inputs": {out_input: ["1", 0], "filename_prefix": prefix}}}


@pytest.mark.parametrize("kind", KINDS)
def test_two_identities_under_one_prefix_give_two_files(kind, host, workflow_assets, base_dir):
    load, file_input, _, _, make, save, read, same = _writers()[kind]
    os.makedirs(legacy(base_dir, "old"), exist_ok=True)
    sources = []
    for seed in (1, 2):   # identities saved by an earlier version of the pack, in models/likeness/concepts
        obj = make(seed, base_dir)
        save(legacy(base_dir, "old", f"{kind}_{seed}.safetensors"), obj)
        sources.append(obj)
    prefix = f"dup_{kind}/alice"
    for seed in (1, 2):
        ok, outputs, messages = host.run(save_graph(kind, f"old/{kind}_{seed}.safetensors", prefix))
        assert ok, json.dumps(messages, default=str)[-2000:]
        assert f"saved {prefix}_0000{seed}_.safetensors" in json.dumps(outputs["2"])
    folder = identities(base_dir, f"dup_{kind}")
    assert sorted(os.listdir(folder)) == ["alice_00001_.safetensors", "alice_00002_.safetensors"]
    for seed, obj in zip((1, 2), sources):
        assert same(read(os.path.join(folder, f"alice_0000{seed}_.safetensors")), obj)   # the first was not overwritten
    # the saved files are listed by their Load node, and never by an adapter loader
    listed = host.nodes.NODE_CLASS_MAPPINGS[load].INPUT_TYPES()["required"][file_input][1]["options"]
    assert f"dup_{kind}/alice_00002_.safetensors" in listed and f"old/{kind}_1.safetensors" in listed
    for loader in ("LikenessPhotoVerseLoader", "LikenessTamingLoader", "LikenessEAALoader"):
        adapters = host.nodes.NODE_CLASS_MAPPINGS[loader].INPUT_TYPES()["required"]["adapter_name"][1]["options"]
        assert not [a for a in adapters if "alice" in a or a.startswith("concepts/") or a.startswith("old/")], adapters


def test_the_counter_skips_a_name_taken_by_another_save(host, workflow_assets, base_dir, pack):
    """The number is reserved with an exclusive create: a file that appears between the count and the write
    (another save, another process) moves the save to the next number instead of replacing it."""
    from comfyui_likeness.nodes import files
    from comfyui_likeness.weights.taming_embeds_file import save_object_embeds

    folder = identities(base_dir, "race")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "bob_00001_.safetensors"), "wb") as f:
        f.write(b"someone else's file")
    real = files.folder_paths.get_save_image_path
    stale = lambda prefix, root: (*real(prefix, root)[:2], 1, *real(prefix, root)[3:])  # noqa: E731  a count from before
    files.folder_paths.get_save_image_path = stale
    try:
        path, rel = files.save_numbered("likeness_identities", "race/bob", lambda p: save_object_embeds(p, object_embeds(3)))
    finally:
        files.folder_paths.get_save_image_path = real
    assert rel == "race/bob_00002_.safetensors"
    assert open(os.path.join(folder, "bob_00001_.safetensors"), "rb").read() == b"someone else's file"

    def broken(path):
        raise OSError("disk full (test)")
    with pytest.raises(OSError, match="disk full"):
        files.save_numbered("likeness_identities", "race/bob", broken)
    assert sorted(os.listdir(folder)) == ["bob_00001_.safetensors", "bob_00002_.safetensors"]   # nothing left over


@pytest.mark.parametrize("prefix, says", [
    ("", "gives no file name"), ("   ", "gives no file name"), ("faces/", "gives no file name"),
    (".", "leaves the folder"), ("..", "leaves the folder"), ("../../escape", "leaves the folder"),
    ("faces/../../x", "leaves the folder"), ("/tmp/alice", "absolute path"), ("C:\\\\Users\\\\x", "absolute path"),
    (".hidden", "hidden file"), ("faces/.secret/alice", "hidden file"), ("a//b", "empty folder name"),
    ("what?", "not allowed in file names"),
])
def test_bad_prefixes_are_refused_at_queue_time(prefix, says, host, workflow_assets, base_dir):
    from comfyui_likeness.weights.taming_embeds_file import save_object_embeds

    os.makedirs(legacy(base_dir, "old"), exist_ok=True)
    source = legacy(base_dir, "old", "prefix_source.safetensors")
    if not os.path.exists(source):
        save_object_embeds(source, object_embeds(4))
    before = sorted(os.walk(os.path.dirname(identities(base_dir))))
    valid = host.validate(save_graph("object_embeds", "old/prefix_source.safetensors", prefix))
    assert valid[0] is False
    errors = json.dumps(valid[3])
    assert "filename_prefix" in errors and says in errors, errors
    assert sorted(os.walk(os.path.dirname(identities(base_dir)))) == before


def test_a_bad_prefix_that_reaches_the_node_is_refused_there(pack):
    """The node's own code checks again (a prefix that came over a link is not known at queue time)."""
    from comfyui_likeness.nodes import files

    with pytest.raises(ValueError, match="filename_prefix: '../x' leaves the folder"):
        files.save_numbered("likeness_identities", "../x", lambda p: None)
