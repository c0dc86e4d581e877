"""Helpers for running shipped workflows in tests: discovery, CPU shrinking and UI -> API reading."""
import copy
import glob
import hashlib
import importlib
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDER = os.path.join(REPO, "example_workflows")
API_DIR = os.path.join(FOLDER, "api")

# Sizes and step counts that keep a shipped (user-sized) workflow under a few seconds on CPU.
BASE_SHRINK = {
    ("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64,
    ("ImageScale", "width"): 64, ("ImageScale", "height"): 64,
}
MAX_STEPS = 3
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # nodes graphToPrompt leaves out


def api_workflows() -> list[str]:
    return sorted(glob.glob(os.path.join(API_DIR, "*.json")))


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def about(name: str) -> dict:
    """A workflow's sidecar words (example_workflows/about/<name>.json)."""
    return load(os.path.join(FOLDER, "about", name + ".json"))


def template_of(api_path: str) -> dict:
    """The generated UI workflow (template) of an API workflow, found by its sidecar's title."""
    name = os.path.splitext(os.path.basename(api_path))[0]
    return load(os.path.join(FOLDER, about(name)["title"] + ".json"))


def ui_ids(prompt: dict) -> dict:
    from workflow_convert import ui_ids as ids
    return ids(prompt)


def family_shrink_rules() -> dict:
    rules = dict(BASE_SHRINK)
    for path in sorted(glob.glob(os.path.join(os.path.dirname(__file__), "assets_*.py"))):
        module = importlib.import_module(os.path.splitext(os.path.basename(path))[0])
        rules.update(getattr(module, "SHRINK", {}))
    return rules


def shrink(prompt: dict) -> dict:
    prompt = copy.deepcopy(prompt)
    rules = family_shrink_rules()
    for node in prompt.values():
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list):
                continue
            key = (node["class_type"], name)
            if key in rules:
                node["inputs"][name] = rules[key]
            elif name == "steps" and isinstance(value, int):
                node["inputs"][name] = min(value, MAX_STEPS)
            elif name == "batch_size" and isinstance(value, int):
                node["inputs"][name] = min(value, 2)
    return prompt


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Read a UI-format workflow back into API format (links by id, widgets by the host's input order)."""
    from workflow_convert import is_widget, ordered_inputs

    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        info = object_info[node["type"]]
        values = list(node.get("widgets_values", []))
        inputs = {}
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        for name, spec in ordered_inputs(info):
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
                continue
            if is_widget(spec):
                opts = spec[1] if len(spec) > 1 else {}
                inputs[name] = values.pop(0)
                if opts.get("control_after_generate") or opts.get("image_upload"):
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def canonical(prompt: dict) -> dict:
    """Renumber nodes by their content and, round by round, their inputs' labels (a Weisfeiler-Lehman refinement),
    so two numberings of one graph compare equal even when nodes share a class and widgets."""
    label = {n: json.dumps([v["class_type"], {k: x for k, x in v["inputs"].items() if not isinstance(x, list)}],
                           sort_keys=True) for n, v in prompt.items()}
    for _ in range(len(prompt)):
        label = {n: hashlib.sha1(json.dumps([label[n], sorted((k, label[str(x[0])], x[1]) for k, x in v["inputs"].items()
                                                               if isinstance(x, list))]).encode()).hexdigest()
                 for n, v in prompt.items()}
    order = sorted(prompt, key=lambda n: label[n])
    new_id = {old: str(i) for i, old in enumerate(order)}
    out = {}
    for old in order:
        node = prompt[old]
        out[new_id[old]] = {"class_type": node["class_type"], "inputs": {
            k: ([new_id[str(v[0])], v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}}
    return out
