"""Sizes, stages and positions for a generated UI workflow, from the frontend's own sizing rules.

The frontend (ComfyUI_frontend 1.32.9, LGraphNode.computeSize) grows a node to its minimum size on load: width
max(title + 40, socket labels + 40, widest widget-input label + 104, 210 when it has widgets), height
max(sockets, outputs) x 20 + (widget height + 4) per widget + 14, where a widget is 20 px, a multi-line text box
at least 50 and LoadImage's preview 220. It truncates a widget's text when label + 5 + value is wider than the
node width minus 85 (number and combo widgets, which draw arrows) or minus 60 (text widgets). This module
computes those sizes from the host's node definitions, with text widths from Arial's metrics (Liberation Sans,
what headless Chromium on Debian draws, has the same widths) plus a margin, so nodes are drawn at the size
saved and no value is cut. tests/workflows/test_browser.py checks the result in the real frontend.

Stages: each node goes to one titled group (models, reference, identity, model patch, sampling, output) by
what it produces and consumes; a node moves left to the stage of its earliest consumer, so every link points
right. Inside a group, nodes stand in columns by their depth within the group.
"""
import math

TITLE_H = 30          # LiteGraph.NODE_TITLE_HEIGHT
SLOT_H = 20           # LiteGraph.NODE_SLOT_HEIGHT
WIDGET_H = 20         # LiteGraph.NODE_WIDGET_HEIGHT
WIDGET_INPUT_EXTRA = 42 + 2 * (15 + 6 + 10)   # BaseWidget.minValueWidth + 2 (margin + arrowMargin + arrowWidth)
TEXT_MARGIN = 1.12    # text widths from Arial metrics, plus a margin for fonts that draw wider
GROUP_TITLE_H = 34    # a group title bar at font size 24
GROUP_PAD = 20
MIN_WIDTH = 240
NODE_GAP_Y = 24       # between one node's bottom and the next one's title bar
COLUMN_GAP = 50
GROUP_GAP = 60

# Glyph widths of Arial / Helvetica (1/1000 em), characters 32..126.
_ARIAL = [278, 278, 355, 556, 556, 889, 667, 191, 333, 333, 389, 584, 278, 333, 278, 278, 556, 556, 556, 556, 556,
          556, 556, 556, 556, 556, 278, 278, 584, 584, 584, 556, 1015, 667, 667, 722, 722, 667, 611, 778, 722, 278,
          500, 667, 556, 833, 722, 778, 667, 778, 722, 667, 611, 722, 667, 944, 667, 667, 611, 278, 278, 278, 469,
          556, 333, 556, 556, 500, 556, 556, 278, 556, 556, 222, 222, 500, 222, 833, 556, 556, 556, 556, 333, 500,
          278, 556, 500, 722, 500, 500, 500, 334, 260, 334, 584]

STAGES = [("models", "Models"), ("reference", "Reference"), ("identity", "Identity"), ("patch", "Model patch"),
          ("sampling", "Prompt and sampling"), ("output", "Output")]
STAGE_COLORS = {"models": "#3f789e", "reference": "#8A8", "identity": "#a1309b", "patch": "#b58b2a",
                "sampling": "#88A", "output": "#444"}
IDENTITY_TYPES = {"LIKENESS_CONCEPT", "LIKENESS_INV_FEATURES", "LIKENESS_OBJECT_EMBEDS", "LIKENESS_FACE_EMBEDS",
                  "CLIP_VISION_OUTPUT"}
SAMPLING_TYPES = {"CONDITIONING", "LATENT", "GUIDER", "SAMPLER", "SIGMAS", "NOISE"}
IMAGE_TYPES = {"IMAGE", "MASK"}


def text_width(text: str, px: float) -> float:
    em = sum(_ARIAL[ord(c) - 32] if 32 <= ord(c) <= 126 else 1000 for c in str(text))
    return em * px / 1000 * TEXT_MARGIN


def _display(value, spec_opts: dict) -> str:
    if isinstance(value, bool):
        return str(spec_opts.get("label_on" if value else "label_off", "true" if value else "false"))
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def node_size(info: dict, values: dict, title: str, widget_rows: list, sockets: list) -> tuple[int, int]:
    """[width, height] a node is drawn at. widget_rows: [(name, spec)] of widgets in order; sockets: input names
    linked or typed (not widgets)."""
    outputs = info.get("output_name") or info.get("output") or []
    socket_w = max((text_width(s, 12) for s in sockets), default=0)
    output_w = max((text_width(o, 12) for o in outputs), default=0)
    width = max(socket_w + output_w + 2 * SLOT_H + (5 if socket_w and output_w else 0),
                TITLE_H + text_width(title, 14) + TITLE_H * 0.33,
                140 * (1.5 if widget_rows else 1))
    height = max(len(sockets), len(outputs), 1) * SLOT_H
    widgets_h = 0
    for name, spec in widget_rows:
        opts = spec[1] if len(spec) > 1 else {}
        label = opts.get("display_name") or name
        width = max(width, text_width(label, 12) + WIDGET_INPUT_EXTRA)
        kind = spec[0] if isinstance(spec[0], str) else "COMBO"
        value = values.get(name, opts.get("default", ""))
        if kind == "STRING" and opts.get("multiline"):
            widgets_h += _text_box_height(str(value), width) + 4
            continue
        widgets_h += WIDGET_H + 4
        text = _display(value, opts)
        pad = 60 if kind == "STRING" else 85
        width = max(width, text_width(label, 12) + 5 + text_width(text, 12) + pad)
        if opts.get("control_after_generate"):
            widgets_h += WIDGET_H + 4
            width = max(width, text_width("control after generate", 12) + 5 + text_width("randomize", 12) + 85)
        if opts.get("image_upload"):
            widgets_h += WIDGET_H + 4 + 220 + 4  # the upload button, then the image preview
            width = max(width, text_width("choose file to upload", 12) + WIDGET_INPUT_EXTRA, 320)
    if widgets_h:
        height += widgets_h + 8
    height += 6
    if info.get("output_node") and not outputs:
        height += 240  # room for the images the node shows after a run
    return _up(max(width, MIN_WIDTH)), _up(height)


def _text_box_height(text: str, width: float) -> int:
    """A multi-line text widget tall enough for its text (13 px monospace, about 8 px a character, 16 px a line)."""
    chars = max(10, int((width - 30) / 8))
    lines = sum(max(1, math.ceil(len(line) / chars)) for line in text.split("\n"))
    return max(60, 16 * (lines + 1) + 12)


def note_size(text: str, width: int) -> tuple[int, int]:
    """A Markdown Note tall enough for its text as the frontend renders it (measured in 1.32.9: about 4.5 px a
    character and 15 px a line at the graph's scale; counted here at 6.2 px and 18 px, plus headings and paragraph
    gaps, so fonts that draw wider still fit; the browser test checks nothing scrolls)."""
    chars = max(10, int((width - 30) / 6.2))
    height = 20
    for para in text.split("\n\n"):
        if para.startswith("#"):
            height += 30
            continue
        lines = sum(max(1, math.ceil(len(line) / chars)) for line in para.split("\n"))
        height += 18 * lines + 12
    return width, _up(height + 20)


def _up(x: float, step: int = 10) -> int:
    return int(math.ceil(x / step) * step)


def stages(prompt: dict, object_info: dict, names_model_file) -> dict:
    """node id -> stage key."""
    producers = {n: [str(v[0]) for v in prompt[n]["inputs"].values() if isinstance(v, list)] for n in prompt}
    consumers = {n: [] for n in prompt}
    for n, ps in producers.items():
        for p in ps:
            consumers[p].append(n)
    in_types = {n: {object_info[prompt[p]["class_type"]]["output"][v[1]]
                    for v in prompt[n]["inputs"].values() if isinstance(v, list) for p in [str(v[0])]} for n in prompt}
    order = _topological(prompt, producers)
    decoded = set()
    stage = {}
    index = {k: i for i, (k, _) in enumerate(STAGES)}
    for n in order:
        info = object_info[prompt[n]["class_type"]]
        outs = set(info["output"])
        if any(p in decoded for p in producers[n]) or "LATENT" in in_types[n] and outs & IMAGE_TYPES:
            decoded.add(n)  # an image made from a sampled latent, or what follows it
        if not producers[n] and names_model_file(n):
            s = "models"
        elif not outs or info.get("output_node") and not outs - IMAGE_TYPES:
            s = "identity" if in_types[n] & IDENTITY_TYPES else "output"
        elif outs & IDENTITY_TYPES:
            s = "identity"
        elif "MODEL" in outs and "MODEL" in in_types[n]:
            s = "patch"
        elif outs & SAMPLING_TYPES:
            s = "sampling"
        elif outs & IMAGE_TYPES:
            s = "output" if n in decoded else "reference"
        else:
            s = "sampling"
        stage[n] = index[s]
    for n in reversed(order):  # a node stands no later than its earliest consumer
        if consumers[n]:
            stage[n] = min(stage[n], min(stage[c] for c in consumers[n]))
    for n in order:  # and no earlier than its producers
        if producers[n]:
            stage[n] = max(stage[n], max(stage[p] for p in producers[n]))
    return {n: STAGES[s][0] for n, s in stage.items()}


def _topological(prompt: dict, producers: dict) -> list:
    done, out = set(), []

    def visit(n, stack=()):
        if n in done:
            return
        if n in stack:
            raise ValueError(f"the workflow has a cycle through node {n}")
        for p in producers[n]:
            visit(p, stack + (n,))
        done.add(n)
        out.append(n)

    for n in sorted(prompt, key=lambda k: (int(k) if k.isdigit() else 0, k)):
        visit(n)
    return out


def arrange(prompt: dict, stage: dict, sizes: dict, attached: dict, lead: tuple | None):
    """Positions for every node and the groups around each stage.

    sizes: node key -> (w, h) for API nodes and extra nodes (Notes); attached: API node id -> [extra node keys]
    stacked under it in its column; lead: (key, (w, h)) of a Note placed left of everything.
    Returns (positions {key: [x, y]}, groups [{title, bounding, color}], bounds (x0, y0, x1, y1))."""
    producers = {n: [str(v[0]) for v in prompt[n]["inputs"].values() if isinstance(v, list)] for n in prompt}
    order = _topological(prompt, producers)
    pos, groups = {}, []
    top = GROUP_TITLE_H + GROUP_PAD + TITLE_H  # y of the first node's body inside a group at y = 0
    x = 0
    if lead:
        key, (w, h) = lead
        pos[key] = [x, top]
        x += w + GROUP_GAP
    bottom = top + (lead[1][1] if lead else 0)
    for skey, stitle in STAGES:
        members = [n for n in order if stage[n] == skey]
        if not members:
            continue
        depth = {}
        for n in members:
            depth[n] = 1 + max((depth[p] for p in producers[n] if p in depth), default=-1)
        columns = [[n for n in members if depth[n] == d] for d in range(max(depth.values()) + 1)]
        gx = x
        x += GROUP_PAD
        group_bottom = top
        for col in columns:
            col.sort(key=lambda n: _barycentre(n, producers, pos, order))
            width = max(max(sizes[k][0] for k in [n, *attached.get(n, [])]) for n in col)
            y = top
            for n in col:
                for key in [n, *attached.get(n, [])]:
                    pos[key] = [x, y]
                    sizes[key] = (width, sizes[key][1])
                    y += sizes[key][1] + NODE_GAP_Y + TITLE_H
            group_bottom = max(group_bottom, y - NODE_GAP_Y - TITLE_H)
            x += width + COLUMN_GAP
        x += GROUP_PAD - COLUMN_GAP
        groups.append({"title": stitle, "bounding": [gx, 0, x - gx, group_bottom + GROUP_PAD], "color": STAGE_COLORS[skey]})
        bottom = max(bottom, group_bottom + GROUP_PAD)
        x += GROUP_GAP
    return pos, groups, (0, 0, x - GROUP_GAP, bottom)


def _barycentre(n, producers, pos, order):
    ys = [pos[p][1] for p in producers[n] if p in pos]
    return (sum(ys) / len(ys) if ys else 0, order.index(n))


# The saved view: the whole graph inside the part of a 1920x1080 window the frontend leaves free on the canvas
# (right of the 60 px side bar, below the top bars and the workflow-name and Run toolbars, left of the minimap).
VIEW = (70, 140, 1560, 900)   # x, y, width, height in screen pixels


def saved_view(bounds) -> dict:
    x0, y0, x1, y1 = bounds
    vx, vy, vw, vh = VIEW
    scale = min(1.0, vw / (x1 - x0), vh / (y1 - y0))
    scale = math.floor(scale * 100) / 100
    ox = (vx + (vw - (x1 - x0) * scale) / 2) / scale - x0
    oy = vy / scale - y0
    return {"scale": scale, "offset": [round(ox, 1), round(oy, 1)]}
