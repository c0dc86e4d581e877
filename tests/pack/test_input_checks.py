"""Inputs checked when the prompt is queued, for every pack node by one mechanism (nodes/validation.py): NaN
and infinity refused for every FLOAT input with the input named, a missing adapter refused at /prompt with the
folder named, and the queue still runs the next prompt. Over HTTP on a real server, and in-process."""
import json
import math
import sys

import pytest

import host_harness as harness
import workflow_tools as wt


def pack_nodes(host):
    return {k: v for k, v in host.nodes.NODE_CLASS_MAPPINGS.items()
            if getattr(v, "RELATIVE_PYTHON_MODULE", "").endswith(harness.PACK_NAME)}


def float_inputs(cls):
    from comfy_api.latest import io
    return [i for i in cls.define_schema().inputs if isinstance(i, io.Float.Input)]


def test_every_float_input_of_every_pack_node_refuses_nan_and_infinity(host):
    nodes = pack_nodes(host)
    assert len(nodes) > 20, sorted(nodes)
    checked = 0
    for node_id, cls in nodes.items():
        for spec in float_inputs(cls):
            for bad in (math.nan, math.inf, -math.inf):
                message = cls.validate_inputs(**{spec.id: bad})
                assert isinstance(message, str) and message.startswith(f"{spec.id}: "), (node_id, spec.id, message)
                assert ("NaN" in message) == math.isnan(bad), message
            assert cls.validate_inputs(**{spec.id: spec.default}) is True, (node_id, spec.id)
            checked += 1
    assert checked >= 30, checked


def test_every_combo_and_file_input_refuses_a_value_that_is_not_there(host, workflow_assets):
    """Adapters, saved identities, PromptNet files, embeddings and plain choices alike, named in the message;
    pack file inputs also name their folder."""
    from comfy_api.latest import io

    from comfyui_likeness.nodes.files import FileInput

    checked = set()
    for node_id, cls in pack_nodes(host).items():
        for spec in cls.define_schema().inputs:
            if not isinstance(spec, io.Combo.Input):
                continue
            message = cls.validate_inputs(**{spec.id: "not_there.safetensors"})
            assert isinstance(message, str) and message.startswith(f"{spec.id}: 'not_there.safetensors' is not"), (node_id, message)
            if isinstance(spec, FileInput):
                assert "models/likeness" in message, message
            if spec.options:
                assert cls.validate_inputs(**{spec.id: spec.options[0]}) is True, (node_id, spec.id)
            checked.add(node_id)
    assert {"LikenessPromptNetLoader", "LikenessEAALoader", "LikenessPhotoVerseLoader", "LikenessTamingLoader",
            "LikenessInvFeaturesLoad", "LikenessObjectEmbedsLoad", "LikenessPhotoVerseConceptLoad"} <= checked


def test_the_host_sees_one_validator_that_names_the_checked_inputs(host):
    """The host passes a validator only the inputs its signature names: every FLOAT and combo input is there."""
    import inspect

    from comfy_api.latest import io

    for node_id, cls in pack_nodes(host).items():
        spec = inspect.getfullargspec(cls.validate_inputs) if float_inputs(cls) else None
        if spec is None:
            continue
        assert spec.varkw is None, node_id       # **kwargs would switch off every host check of the node
        wanted = {i.id for i in cls.define_schema().inputs if isinstance(i, (io.Float.Input, io.Combo.Input))}
        assert wanted <= set(spec.args), (node_id, wanted - set(spec.args))


def test_a_nan_over_a_link_is_refused_before_the_node_runs(host, workflow_assets):
    """A value from another node is unknown at queue time; the node refuses it before its own code runs."""
    prompt = wt.shrink(wt.load(_workflow_with_input("weight")[0]))
    node_id = _node_with_input(prompt, "weight")
    prompt["900"] = {"class_type": "PrimitiveFloat", "inputs": {"value": math.nan}}
    prompt[node_id]["inputs"]["weight"] = ["900", 0]
    ok, _, messages = host.run(prompt)
    assert not ok
    errors = [m for m in messages if m[0] == "execution_error"]
    assert errors and errors[0][1]["node_id"] == node_id, messages
    assert "weight: NaN (not a number) is not allowed" in errors[0][1]["exception_message"]


def _workflow_with_input(name):
    for path in wt.api_workflows():
        prompt = wt.load(path)
        if _node_with_input(prompt, name, adapter=True):
            return path, prompt
    pytest.fail(f"no shipped workflow has a pack node with '{name}' and an adapter loader")


def _node_with_input(prompt, name, adapter=False):
    if adapter and not any("adapter_name" in n["inputs"] for n in prompt.values()):
        return None
    for node_id, node in prompt.items():
        if node["class_type"].startswith("Likeness") and isinstance(node["inputs"].get(name), (int, float)):
            return node_id
    return None


@pytest.fixture(scope="module")
def server(workflow_assets, base_dir, free_memory):
    from comfy_http import ComfyServer

    free_memory()
    srv = ComfyServer(harness.comfy_dir(), base_dir, python=sys.executable).start(timeout=600)
    yield srv
    srv.stop()


def _node_errors(body):
    return json.dumps(body.get("node_errors", {}))


def _ancestors(prompt, node_id, seen=None):
    seen = set() if seen is None else seen
    seen.add(node_id)
    for value in prompt[node_id]["inputs"].values():
        if isinstance(value, list) and len(value) == 2 and value[0] not in seen:
            _ancestors(prompt, value[0], seen)
    return seen


def _branch_of(prompt, node_id):
    """The part of the workflow that one image output downstream of node_id needs (the host queues a prompt
    whose other outputs are valid and reports the bad node's errors with it; with one output it answers 400)."""
    outputs = [k for k, n in prompt.items() if n["class_type"] in ("SaveImage", "PreviewImage")
               and node_id in _ancestors(prompt, k)]
    return {k: prompt[k] for k in _ancestors(prompt, outputs[0])}


def test_nan_and_a_missing_adapter_are_refused_at_queue_time_and_the_queue_goes_on(server):
    _, prompt = _workflow_with_input("weight")
    node_id = _node_with_input(prompt, "weight")
    prompt = _branch_of(wt.shrink(prompt), node_id)

    bad = json.loads(json.dumps(prompt))
    bad[node_id]["inputs"]["weight"] = math.nan        # sent as the JSON literal NaN, as a script would
    status, body = server.post_json("/prompt", {"prompt": bad, "client_id": "tests"})
    assert status == 400, body
    errors = body["node_errors"][node_id]["errors"]
    assert any(e["extra_info"]["input_name"] == "weight" and "weight: NaN (not a number)" in e["details"] for e in errors), errors

    bad = json.loads(json.dumps(prompt))
    bad[node_id]["inputs"]["weight"] = "inf"
    status, body = server.post_json("/prompt", {"prompt": bad, "client_id": "tests"})
    assert status == 400 and "weight: inf is not allowed" in _node_errors(body), body

    bad = json.loads(json.dumps(prompt))
    loader = next(k for k, n in bad.items() if "adapter_name" in n["inputs"])
    bad[loader]["inputs"]["adapter_name"] = "not_downloaded_yet.safetensors"
    status, body = server.post_json("/prompt", {"prompt": bad, "client_id": "tests"})
    assert status == 400, body
    text = _node_errors(body)
    assert "adapter_name: 'not_downloaded_yet.safetensors' is not in models/likeness" in text, text
    assert server.get_json("/queue")["queue_pending"] == []          # nothing was queued

    entry = server.run(prompt)                                       # the queue still runs the next prompt
    assert entry["status"]["status_str"] == "success"
    assert server.images(entry)
