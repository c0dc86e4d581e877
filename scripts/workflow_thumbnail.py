"""A template-card thumbnail for a workflow: a diagram of its stages, drawn with Pillow (no model run needed).

The card is square; the diagram shows the title, the base model family and, per stage group, the titles of its
nodes, in the graph's own stage colours. The JPEG carries a digest of what it was drawn from in its comment, so
`build_workflows.py --check` can tell a stale thumbnail without comparing pixels.
"""
import hashlib
import json

from PIL import Image, ImageDraw, ImageFont

SIZE = 512
FAMILY_LABELS = {"sd15": "SD1.5", "sd2": "SD2.1", "sdxl": "SDXL"}


def digest(ui: dict, title: str) -> str:
    groups = [(g["title"], g["color"]) for g in ui["groups"]]
    nodes = sorted((n["type"], n["pos"][0], n["pos"][1]) for n in ui["nodes"] if n["type"] != "MarkdownNote")
    return hashlib.sha1(json.dumps([title, groups, nodes, 1]).encode()).hexdigest()[:16]


def _font(size: int):
    return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def _short(name: str) -> str:
    return name.replace(" (Likeness)", "").replace("(Likeness)", "").strip()


def draw_thumbnail(ui: dict, title: str, family: str | None, names: dict, path: str):
    """names: node type -> display name."""
    img = Image.new("RGB", (SIZE, SIZE), "#202020")
    d = ImageDraw.Draw(img)
    y = 18
    for line in _wrap(d, title, _font(26), SIZE - 40):
        d.text((20, y), line, font=_font(26), fill="#f0f0f0")
        y += 32
    if family:
        d.text((20, y + 2), FAMILY_LABELS.get(family, family), font=_font(16), fill="#9ad")
    y += 30
    groups = ui["groups"]
    members = {g["title"]: [] for g in groups}
    for node in sorted(ui["nodes"], key=lambda n: (n["pos"][0], n["pos"][1])):
        if node["type"] == "MarkdownNote":
            continue
        for g in groups:
            x0, y0, w, h = g["bounding"]
            if x0 <= node["pos"][0] <= x0 + w and y0 <= node["pos"][1] <= y0 + h:
                members[g["title"]].append(_short(names.get(node["type"], node["type"])))
                break
    row_h = (SIZE - y - 12) / max(1, len(groups))
    for i, g in enumerate(groups):
        top = y + i * row_h
        box = [20, top + 4, SIZE - 20, top + row_h - 10]
        d.rounded_rectangle(box, radius=8, fill=_dim(g["color"]), outline=g["color"], width=2)
        d.text((32, top + 10), g["title"], font=_font(17), fill="#ffffff")
        names = ", ".join(members[g["title"]])
        text = _wrap(d, names, _font(13), SIZE - 64)[: max(1, int((row_h - 42) // 16))]
        for j, line in enumerate(text):
            d.text((32, top + 32 + 16 * j), line, font=_font(13), fill="#d8d8d8")
        if i < len(groups) - 1:
            cx = SIZE // 2
            d.polygon([(cx - 7, top + row_h - 10), (cx + 7, top + row_h - 10), (cx, top + row_h - 3)], fill="#bbbbbb")
    img.save(path, "JPEG", quality=88, comment=digest(ui, title).encode())


def _dim(color: str) -> str:
    c = color.lstrip("#")
    if len(c) == 3:
        c = "".join(ch * 2 for ch in c)
    r, g, b = (int(c[i:i + 2], 16) for i in (0, 2, 4))
    return "#%02x%02x%02x" % (r // 3, g // 3, b // 3)


def thumbnail_digest(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            comment = img.info.get("comment")
    except OSError:
        return None
    return comment.decode() if isinstance(comment, bytes) else comment
