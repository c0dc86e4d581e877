"""Every shipped API workflow: its template is generated and current, names public files with download metadata or
a Note, is laid out readably, and runs in the real host in-process and over HTTP (stand-ins under the public
names)."""
import io
import json
import os
import sys
import urllib.parse

import pytest
from PIL import Image

import host_harness as harness
import model_files
import standins
import workflow_tools as wt
from workflow_layout import STAGES

WORKFLOWS = wt.api_workflows()
IDS = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS]


@pytest.fixture(scope="module")
def info(host):
    import nodes
    from workflow_convert import object_info

    return object_info(nodes.NODE_CLASS_MAPPINGS)


@pytest.fixture(scope="module")
def generated(info):
    import build_workflows

    return build_workflows.build(info)


def test_workflows_are_shipped_in_the_template_folder():
    assert len(WORKFLOWS) >= 3
    old = os.path.join(wt.REPO, "workflows")
    assert not os.path.isdir(old), ("workflows/ is the old folder: move API files to example_workflows/api/ and "
                                    "add example_workflows/about/<name>.json (docs/workflows.md)")


@pytest.mark.parametrize("name", IDS)
def test_workflow_has_its_words(name):
    import build_workflows

    problems = build_workflows.about_problems(name)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", IDS)
def test_generated_files_are_current(name, generated):
    """The template, its thumbnail and its docs section are what build_workflows.py makes from the API file."""
    import build_workflows
    from workflow_thumbnail import digest, thumbnail_digest

    title = wt.about(name)["title"]
    ui_rel = os.path.join("example_workflows", title + ".json")
    assert os.path.exists(os.path.join(wt.REPO, ui_rel)), f"no template {ui_rel}: run make workflows"
    assert wt.load(os.path.join(wt.REPO, ui_rel)) == json.loads(generated[ui_rel][1]), \
        f"stale {ui_rel}: run make workflows"
    jpg = os.path.join("example_workflows", title + ".jpg")
    ui, t = generated[jpg][1][:2]
    assert thumbnail_digest(os.path.join(wt.REPO, jpg)) == digest(ui, t), f"stale or missing {jpg}: run make workflows"
    with Image.open(os.path.join(wt.REPO, jpg)) as img:
        assert img.format == "JPEG" and img.size[0] == img.size[1] >= 256
    docs = build_workflows._current(os.path.relpath(build_workflows.DOCS, wt.REPO), "docs")
    assert docs is not None and f"### {title}\n" in docs, "docs/workflows.md is stale: run make workflows"


def test_no_stray_templates(generated):
    import build_workflows

    assert not build_workflows.stray_files(generated), "templates no API workflow makes: run make workflows"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_template_reads_back_as_its_api_twin(path, info):
    api = wt.load(path)
    ui = wt.template_of(path)
    for node in api.values():
        assert node["class_type"] in info, f"{node['class_type']} is neither a core node nor a pack node"
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert wt.canonical(wt.ui_to_api(ui, info)) == wt.canonical(strip)


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_names_public_files(path):
    """Every model file is in the catalog (never a test stand-in), has a stand-in builder for the tests, and its
    loader carries the frontend's download metadata, or the graph has a Note that says where the file comes from."""
    api, ui = wt.load(path), wt.template_of(path)
    ids = wt.ui_ids(api)
    notes = [n["widgets_values"][0] for n in ui["nodes"] if n["properties"].get("likeness_note") == "model file"]
    named = model_files.files_named(api)
    assert named, "the workflow names no model file"
    for nid, input_name, value in named:
        where = f"node {nid} {api[nid]['class_type']}.{input_name} = {value!r}"
        assert not value.startswith(standins.TEST_ONLY_PREFIXES), f"{where} names a test stand-in"
        assert value in model_files.CATALOG, f"{where}: not in scripts/model_files.py (add its url, or a Note text)"
        assert value in standins.STANDINS, f"{where}: no stand-in builder in tests/support/standins.py"
        model = model_files.CATALOG[value]
        node = next(n for n in ui["nodes"] if n["id"] == ids[nid])
        if model.url:
            assert model_files.frontend_metadata(model) in node["properties"].get("models", []), \
                f"{where}: the loader has no properties.models entry for it"
            assert model.url.startswith("https://") and model.directory
        else:
            assert any(value in text and model.how.split("\n")[0][:40] in text for text in notes), \
                f"{where}: no Note in the graph says what the file is and how to get it"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_layout_is_readable(path):
    """At the saved sizes: no two nodes overlap, each node is in one stage group below its title bar, every link
    runs left to right, one Note explains the method, and the saved view fits the graph."""
    ui = wt.template_of(path)
    th = 30
    boxes = {n["id"]: (n["pos"][0], n["pos"][1] - th, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in ui["nodes"]}
    items = list(boxes.items())
    for i, (a, ba) in enumerate(items):
        for b, bb in items[i + 1:]:
            assert not (min(ba[2], bb[2]) > max(ba[0], bb[0]) and min(ba[3], bb[3]) > max(ba[1], bb[1])), \
                f"nodes {a} and {b} overlap"
    groups = [g["bounding"] for g in ui["groups"]]
    assert {g["title"] for g in ui["groups"]} <= {t for _, t in STAGES}
    method = [n for n in ui["nodes"] if n["properties"].get("likeness_note") == "method"]
    assert len(method) == 1 and len(method[0]["widgets_values"][0]) > 200, "no Note explains the method"
    for node in ui["nodes"]:
        if node is method[0]:
            continue  # it stands left of the groups
        x0, y0, x1, y1 = boxes[node["id"]]
        inside = [g for g in groups if g[0] <= x0 and g[1] + 34 <= y0 and x1 <= g[0] + g[2] and y1 <= g[1] + g[3]]
        assert len(inside) == 1, f"node {node['id']} {node['type']} is in {len(inside)} groups"
    for link in ui["links"]:
        assert boxes[link[1]][2] < boxes[link[3]][0], f"link {link[0]} runs right to left"
    ds = ui["extra"]["ds"]
    assert 0.1 <= ds["scale"] <= 1.0


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_runs_in_process(path, host, workflow_assets, base_dir):
    before = set(os.listdir(os.path.join(base_dir, "output")))
    ok, outputs, messages = host.run(wt.shrink(wt.load(path)))
    assert ok, json.dumps(messages, default=str)[-3000:]
    images = [i for out in outputs.values() for i in out.get("images", [])]
    assert images, "the workflow produced no image"
    new = set(os.listdir(os.path.join(base_dir, "output"))) - before
    assert any(f.endswith(".png") for f in new) or any(i["type"] == "temp" for i in images)


@pytest.fixture(scope="module")
def server(workflow_assets, base_dir, free_memory):
    from comfy_http import ComfyServer

    free_memory()
    srv = ComfyServer(harness.comfy_dir(), base_dir, python=sys.executable).start()
    yield srv
    srv.stop()
    assert srv.proc.poll() is not None, "the server is still running after stop()"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_workflow_runs_over_http(path, server):
    entry = server.run(wt.shrink(wt.load(path)))
    images = server.images(entry)
    assert images, "no image came back"
    for _, data in images:
        img = Image.open(io.BytesIO(data))
        img.load()
        assert img.size[0] >= 16 and img.size[1] >= 16


def test_templates_are_listed_over_http(server):
    """The host lists every template by its title, and neither the API twins nor the sidecars."""
    listed = server.get_json("/workflow_templates")
    ours = listed.get(harness.PACK_NAME, [])
    titles = {wt.about(name)["title"] for name in IDS}
    assert titles == set(ours), ours
    first = sorted(titles)[0]
    served = json.loads(server.get(f"/api/workflow_templates/{harness.PACK_NAME}/{urllib.parse.quote(first)}.json"))
    assert served["nodes"]


def test_bad_prompt_is_rejected_with_the_input_named(server):
    prompt = wt.shrink(wt.load(WORKFLOWS[0]))
    for node in prompt.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 0
    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": "tests"})
    assert status == 400
    assert "steps" in json.dumps(body)
