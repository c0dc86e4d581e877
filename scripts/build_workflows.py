"""Generate the template files in example_workflows/ from the API workflows, with the node definitions of a real
host with the pack loaded.

    example_workflows/api/<name>.json     the API workflow: the single source of truth (what runs headless)
    example_workflows/about/<name>.json   its words: {"title", "description", "note"} (docs/workflows.md)
    example_workflows/<title>.json        generated: the UI workflow ComfyUI lists as a template
    example_workflows/<title>.jpg         generated: its template-card thumbnail (a diagram of its stages)
    docs/workflows.md                     generated between its markers: each workflow's model files

    .host/venv/bin/python scripts/build_workflows.py           # write them
    .host/venv/bin/python scripts/build_workflows.py --check   # exit 1 and say what is stale or missing
"""
import glob
import json
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
import model_files  # noqa: E402

FOLDER = os.path.join(REPO, "example_workflows")
API_DIR = os.path.join(FOLDER, "api")
ABOUT_DIR = os.path.join(FOLDER, "about")
DOCS = os.path.join(REPO, "docs", "workflows.md")
BEGIN, END = "<!-- generated: workflows -->", "<!-- end generated: workflows -->"
# The card title is the template's file name (the frontend shows it as title and description): keep it one
# line of words with no characters a file system or URL refuses.
TITLE_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 .,'+()-]{2,60}$")
ABOUT_KEYS = ("title", "description", "note")


def api_names() -> list[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(API_DIR, "*.json")))


def about_problems(name: str) -> list[str]:
    """What is missing or wrong in a workflow's sidecar, in words that say how to fix it."""
    path = os.path.join(ABOUT_DIR, name + ".json")
    rel = os.path.relpath(path, REPO)
    if not os.path.exists(path):
        return [f"{rel} is missing: write {{\"title\", \"description\", \"note\"}} for example_workflows/api/{name}.json "
                f"(see docs/workflows.md, 'Adding a workflow')"]
    try:
        about = json.load(open(path))
    except json.JSONDecodeError as e:
        return [f"{rel} is not valid JSON ({e})"]
    problems = [f"{rel} has no \"{k}\" (a non-empty string)" for k in ABOUT_KEYS
                if not isinstance(about.get(k), str) or not about[k].strip()]
    title = about.get("title", "")
    if isinstance(title, str) and title and not TITLE_OK.match(title):
        problems.append(f"{rel}: title {title!r} must be 3-61 letters, digits, spaces or . , ' + ( ) - "
                        f"(it becomes the template's file name)")
    return problems


def load_about(name: str) -> dict:
    problems = about_problems(name)
    if problems:
        raise ValueError("\n".join(problems))
    about = json.load(open(os.path.join(ABOUT_DIR, name + ".json")))
    return {**about, "api_workflow": f"api/{name}.json"}


def object_info_in_process() -> dict:
    import host_harness as harness
    from workflow_convert import object_info

    harness.import_host(tempfile.mkdtemp(prefix="likeness_build_"))
    harness.InProcessHost()
    import nodes

    return object_info(nodes.NODE_CLASS_MAPPINGS)


def build(info: dict) -> dict:
    """relative path -> (kind, content): every generated file, in memory."""
    from workflow_convert import api_to_ui

    out, titles = {}, {}
    for name in api_names():
        about = load_about(name)
        if about["title"] in titles:
            raise ValueError(f"{name} and {titles[about['title']]} have the same title {about['title']!r}")
        titles[about["title"]] = name
        with open(os.path.join(API_DIR, name + ".json")) as f:
            prompt = json.load(f)
        ui = api_to_ui(prompt, info, about)
        out[os.path.join("example_workflows", about["title"] + ".json")] = ("json", json.dumps(ui, indent=1) + "\n")
        out[os.path.join("example_workflows", about["title"] + ".jpg")] = (
            "jpg", (ui, about["title"], model_files.checkpoint_family(prompt),
                    {k: v.get("display_name") or k for k, v in info.items()}))
    out[os.path.relpath(DOCS, REPO)] = ("docs", docs_section())
    return out


def docs_section() -> str:
    """The generated part of docs/workflows.md: every model file, then what each workflow needs and where it goes."""
    parts = ["| file | folder (under `ComfyUI/models/`) | what it is |", "|---|---|---|"]
    for m in model_files.FILES:
        where = f"[download]({m.url})" if m.url else "no download: see the Note in the graph"
        parts.append(f"| `{m.name}` | `{m.directory}/` | {m.what}; {where} |")
    parts.append("\n## The shipped workflows\n")
    for name in api_names():
        about = load_about(name)
        prompt = json.load(open(os.path.join(API_DIR, name + ".json")))
        parts.append(f"### {about['title']}\n\n{about['description']}\n\n"
                     f"Template `example_workflows/{about['title']}.json`, API twin `example_workflows/api/{name}.json`.\n\n"
                     "| file | folder | where to get it |\n|---|---|---|")
        for value in dict.fromkeys(v for _, _, v in model_files.files_named(prompt)):
            model = model_files.CATALOG.get(value)
            if model is None:
                parts.append(f"| `{value}` | ? | not in scripts/model_files.py |")
                continue
            where = f"[download]({model.url})" if model.url else _first_sentence(model.how)
            parts.append(f"| `{value}` | `models/{model.directory}/` | {where} |")
        parts.append("")
    return "\n".join(parts)


def _first_sentence(text: str) -> str:
    first = text.split("\n\n")[0].replace("|", "\\|")
    return first if len(first) < 240 else first[:first.rfind(" ", 0, 237)] + " ..."


def _current(path: str, kind: str):
    full = os.path.join(REPO, path)
    if not os.path.exists(full):
        return None
    if kind == "jpg":
        from workflow_thumbnail import thumbnail_digest
        return thumbnail_digest(full)
    text = open(full).read()
    if kind == "docs":
        if BEGIN not in text or END not in text:
            return None
        return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")
    return text


def _wanted(kind: str, content):
    if kind == "jpg":
        from workflow_thumbnail import digest
        return digest(content[0], content[1])
    return content.strip("\n") if kind == "docs" else content


def _write(path: str, kind: str, content):
    full = os.path.join(REPO, path)
    if kind == "jpg":
        from workflow_thumbnail import draw_thumbnail
        draw_thumbnail(*content, full)
    elif kind == "docs":
        text = open(full).read() if os.path.exists(full) else f"# Workflows\n\n{BEGIN}\n{END}\n"
        if BEGIN not in text:
            text += f"\n{BEGIN}\n{END}\n"
        text = text[:text.index(BEGIN) + len(BEGIN)] + "\n" + content.strip("\n") + "\n" + text[text.index(END):]
        with open(full, "w") as f:
            f.write(text)
    else:
        with open(full, "w") as f:
            f.write(content)


def stray_files(generated: dict) -> list[str]:
    """Template files in example_workflows/ that no API workflow produces (renamed or removed ones)."""
    found = glob.glob(os.path.join(FOLDER, "*.json")) + glob.glob(os.path.join(FOLDER, "*.jpg"))
    return sorted(os.path.relpath(p, REPO) for p in found if os.path.relpath(p, REPO) not in generated)


def main(check: bool) -> int:
    missing = [p for name in api_names() for p in about_problems(name)]
    if missing:
        print("\n".join(missing))
        return 1
    generated = build(object_info_in_process())
    stale = [p for p, (kind, content) in generated.items() if _current(p, kind) != _wanted(kind, content)]
    strays = stray_files(generated)
    if check:
        if stale or strays:
            print("stale (run scripts/build_workflows.py):", ", ".join(stale + strays))
            return 1
        print("checked", len(api_names()), "workflows")
        return 0
    for path in stale:
        _write(path, *generated[path])
    for path in strays:
        os.remove(os.path.join(REPO, path))
    print("wrote", len(stale), "files, removed", len(strays), "for", len(api_names()), "workflows")
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
