"""Turn an API-format prompt into a UI-format (litegraph) workflow, driven by the host's node definitions.

The API file is the single source of truth of a shipped workflow; the UI file ComfyUI lists as a template is
generated from it, so the two cannot drift. Node definitions come from /object_info (or the same data built
in-process): for each input, whether it is a widget (INT, FLOAT, STRING, BOOLEAN, COMBO / list) or a socket,
and the widget order the frontend expects in widgets_values. The layout (sizes, groups, the saved view) is
workflow_layout.py's; the download metadata and the Notes for model files come from model_files.py; the
method Note's text from the workflow's sidecar (example_workflows/about/<name>.json).
"""
import json

import model_files
import workflow_layout as layout

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def object_info(node_class_mappings: dict) -> dict:
    """What /object_info serves, built from the host's loaded node classes (V3 and V1)."""
    info = {}
    for name, cls in node_class_mappings.items():
        if hasattr(cls, "GET_NODE_INFO_V1"):
            info[name] = cls.GET_NODE_INFO_V1()
        else:
            types = cls.INPUT_TYPES()
            info[name] = {"input": types, "input_order": {k: list(v) for k, v in types.items()},
                          "output": list(cls.RETURN_TYPES),
                          "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}
    return json.loads(json.dumps(info, default=str))


def is_widget(spec) -> bool:
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return True
    return kind in WIDGET_TYPES and not opts.get("forceInput", False)


def ordered_inputs(info: dict) -> list[tuple[str, tuple]]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, tuple(info["input"][section][name])))
    return out


def widget_values(info: dict, inputs: dict) -> list:
    """widgets_values in frontend order; seeds with control_after_generate carry a 'fixed' control value."""
    values = []
    for name, spec in ordered_inputs(info):
        if not is_widget(spec) or isinstance(inputs.get(name), list):
            continue
        opts = spec[1] if len(spec) > 1 else {}
        value = inputs.get(name, opts.get("default"))
        values.append(value)
        if opts.get("control_after_generate"):
            values.append("fixed")
        if opts.get("image_upload"):
            values.append("image")
    return values


NOTE_TYPE = "MarkdownNote"  # a frontend-only node: graphToPrompt leaves it out of the API prompt
NOTE_COLORS = {"color": "#432", "bgcolor": "#653"}
METHOD_NOTE_WIDTH = 440


def _depths(prompt: dict) -> dict:
    depth = {}

    def visit(nid, stack=()):
        if nid in depth:
            return depth[nid]
        if nid in stack:
            raise ValueError(f"the workflow has a cycle through node {nid}")
        links = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list)]
        depth[nid] = 1 + max((visit(str(s), stack + (nid,)) for s in links), default=-1)
        return depth[nid]

    for nid in prompt:
        visit(nid)
    return depth


def ui_ids(prompt: dict) -> dict:
    """API node id -> UI node id (numbered by depth, then API id)."""
    depth = _depths(prompt)
    return {nid: i + 1 for i, nid in enumerate(sorted(prompt, key=lambda n: (depth[n], int(n) if n.isdigit() else n)))}


def _note(node_id: int, title: str, text: str, role: str) -> dict:
    """role: "method" (the Note that explains the workflow) or "model file" (where a file comes from)."""
    return {"id": node_id, "type": NOTE_TYPE, "pos": [0, 0], "size": [0, 0], "flags": {}, "order": node_id - 1,
            "mode": 0, "inputs": [], "outputs": [], "title": title, "properties": {"likeness_note": role},
            "widgets_values": [text], **NOTE_COLORS}


def api_to_ui(prompt: dict, object_info: dict, about: dict | None = None) -> dict:
    """The UI workflow of an API prompt. about: the sidecar's words (title, description, note); without it the
    graph gets no method Note."""
    missing = sorted({n["class_type"] for n in prompt.values()} - set(object_info))
    if missing:
        raise ValueError(f"node types not known to this host: {', '.join(missing)}")
    ids = ui_ids(prompt)
    links, ui_nodes, sizes = [], {}, {}
    files = {}
    for nid, name, value in model_files.files_named(prompt):
        files.setdefault(nid, []).append(value)
    for nid in sorted(prompt, key=lambda n: ids[n]):
        node = prompt[nid]
        info = object_info[node["class_type"]]
        title = node.get("_meta", {}).get("title") or info.get("display_name") or node["class_type"]
        rows = [(name, spec) for name, spec in ordered_inputs(info) if is_widget(spec)]
        sockets = [name for name, spec in ordered_inputs(info) if not is_widget(spec)]
        sizes[nid] = layout.node_size(info, node["inputs"], title, rows, sockets)
        properties = {"Node name for S&R": node["class_type"]}
        public = [model_files.CATALOG[v] for v in files.get(nid, []) if v in model_files.CATALOG
                  and model_files.CATALOG[v].url]
        if public:
            properties["models"] = [model_files.frontend_metadata(m) for m in public]
        ui_nodes[nid] = {
            "id": ids[nid], "type": node["class_type"], "pos": [0, 0], "size": [0, 0],
            "flags": {}, "order": ids[nid] - 1, "mode": 0, "inputs": [],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (t, n) in enumerate(zip(info["output"], info.get("output_name") or info["output"]))],
            "properties": properties,
            "widgets_values": widget_values(info, node["inputs"]),
        }
        ui_nodes[nid]["title"] = title
    for nid in sorted(prompt, key=lambda n: ids[n]):
        node = prompt[nid]
        info = object_info[node["class_type"]]
        for name, spec in ordered_inputs(info):
            value = node["inputs"].get(name)
            socket = not is_widget(spec)
            if not socket and not isinstance(value, list):
                continue
            entry = {"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": None}
            if not socket:
                entry["widget"] = {"name": name}
            if isinstance(value, list):
                src, slot = str(value[0]), int(value[1])
                link_id = len(links) + 1
                links.append([link_id, ids[src], slot, ids[nid], len(ui_nodes[nid]["inputs"]),
                              ui_nodes[src]["outputs"][slot]["type"]])
                ui_nodes[src]["outputs"][slot]["links"].append(link_id)
                entry["link"] = link_id
            elif not socket:
                continue
            ui_nodes[nid]["inputs"].append(entry)

    # Notes: one for the method, one under each loader of a file without a download link.
    extra_nodes, attached = {}, {}
    next_id = len(ids) + 1
    lead = None
    if about and about.get("note"):
        key = "note:method"
        extra_nodes[key] = _note(next_id, about.get("title", "About this workflow"), about["note"], "method")
        sizes[key] = layout.note_size(about["note"], METHOD_NOTE_WIDTH)
        lead = (key, sizes[key])
        next_id += 1
    for nid in sorted(files, key=lambda n: ids[n]):
        for value in files[nid]:
            model = model_files.CATALOG.get(value)
            if model is None or model.url:
                continue
            key = f"note:{nid}:{value}"
            text = model_files.note_text(model)
            extra_nodes[key] = _note(next_id, f"Model file: {value}", text, "model file")
            sizes[key] = layout.note_size(text, max(360, sizes[nid][0]))
            attached.setdefault(nid, []).append(key)
            next_id += 1
    stage = layout.stages(prompt, object_info, lambda n: n in files)
    pos, groups, bounds = layout.arrange(prompt, stage, sizes, attached, lead)
    for key, node in [*ui_nodes.items(), *extra_nodes.items()]:
        node["pos"], node["size"] = pos[key], list(sizes[key])
    all_nodes = list(ui_nodes.values()) + list(extra_nodes.values())
    extra = {"ds": layout.saved_view(bounds)}
    if about:
        extra["likeness"] = {k: about[k] for k in ("api_workflow", "description") if k in about}
    return {"last_node_id": len(all_nodes), "last_link_id": len(links), "nodes": all_nodes, "links": links,
            "groups": [{"id": i + 1, "title": g["title"], "bounding": g["bounding"], "color": g["color"],
                        "font_size": 24, "flags": {}} for i, g in enumerate(groups)],
            "config": {}, "extra": extra, "version": 0.4}
