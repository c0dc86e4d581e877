"""Every shipped API workflow runs in the real host, in-process and over HTTP; UI files match API files."""
import io
import json
import os
import sys

import pytest
from PIL import Image

import host_harness as harness
import workflow_tools as wt

WORKFLOWS = wt.api_workflows()
IDS = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS]


def _object_info():
    import nodes
    from workflow_convert import object_info

    return object_info(nodes.NODE_CLASS_MAPPINGS)


def test_workflows_are_shipped():
    assert len(WORKFLOWS) >= 3
    for path in WORKFLOWS:
        assert os.path.exists(os.path.join(wt.REPO, "workflows", os.path.basename(path))), f"no UI file for {path}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_ui_file_matches_api_file(path, host):
    from workflow_convert import api_to_ui

    info = _object_info()
    api = wt.load(path)
    ui = wt.load(os.path.join(wt.REPO, "workflows", os.path.basename(path)))
    assert ui == json.loads(json.dumps(api_to_ui(api, info))), "stale UI file: run scripts/build_workflows.py"
    for node in api.values():
        assert node["class_type"] in info, f"{node['class_type']} is neither a core node nor a pack node"
    strip = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}
    assert wt.canonical(wt.ui_to_api(ui, info)) == wt.canonical(strip)


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
def server(workflow_assets, base_dir):
    from comfy_http import ComfyServer

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
    listed = server.get_json("/workflow_templates")
    ours = listed.get(harness.PACK_NAME, [])
    assert set(IDS) <= set(ours), ours


def test_bad_prompt_is_rejected_with_the_input_named(server):
    prompt = wt.shrink(wt.load(WORKFLOWS[0]))
    for node in prompt.values():
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 0
    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": "tests"})
    assert status == 400
    assert "steps" in json.dumps(body)
