"""Turn an API-format prompt into a UI-format (litegraph) workflow, driven by the host's node definitions.

The API file is the single source of truth of a shipped workflow; the UI file ComfyUI lists as a template is
generated from it, so the two cannot drift. Node definitions come from /object_info (or the same data built
in-process): for each input, whether it is a widget (INT, FLOAT, STRING, BOOLEAN, COMBO / list) or a socket,
and the widget order the frontend expects in widgets_values.
"""
import json

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


def api_to_ui(prompt: dict, object_info: dict) -> dict:
    missing = sorted({n["class_type"] for n in prompt.values()} - set(object_info))
    if missing:
        raise ValueError(f"node types not known to this host: {', '.join(missing)}")
    depth = _depths(prompt)
    ids = {nid: i + 1 for i, nid in enumerate(sorted(prompt, key=lambda n: (depth[n], int(n) if n.isdigit() else n)))}
    links, ui_nodes, row = [], {}, {}
    for nid in sorted(prompt, key=lambda n: ids[n]):
        node = prompt[nid]
        info = object_info[node["class_type"]]
        col = depth[nid]
        r = row.get(col, 0)
        row[col] = r + 1
        ui_nodes[nid] = {
            "id": ids[nid], "type": node["class_type"], "pos": [40 + 360 * col, 40 + 280 * r], "size": [320, 220],
            "flags": {}, "order": ids[nid] - 1, "mode": 0, "inputs": [],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (t, n) in enumerate(zip(info["output"], info.get("output_name") or info["output"]))],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widget_values(info, node["inputs"]),
        }
        if node.get("_meta", {}).get("title"):
            ui_nodes[nid]["title"] = node["_meta"]["title"]
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
    return {"last_node_id": len(ids), "last_link_id": len(links), "nodes": list(ui_nodes.values()), "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
