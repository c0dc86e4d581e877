"""Generate the UI-format workflows (workflows/*.json, listed by ComfyUI as templates) from the API-format ones
(workflows/api/*.json), using the node definitions of a real host with the pack loaded.

    .host/venv/bin/python scripts/build_workflows.py           # write workflows/*.json
    .host/venv/bin/python scripts/build_workflows.py --check   # exit 1 if any UI file is stale
"""
import glob
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))


def object_info_in_process() -> dict:
    import host_harness as harness
    from workflow_convert import object_info

    harness.import_host(tempfile.mkdtemp(prefix="likeness_build_"))
    harness.InProcessHost()
    import nodes

    return object_info(nodes.NODE_CLASS_MAPPINGS)


def ui_path(api_path: str) -> str:
    return os.path.join(REPO, "workflows", os.path.basename(api_path))


def main(check: bool) -> int:
    from workflow_convert import api_to_ui

    info = object_info_in_process()
    stale = []
    for api_path in sorted(glob.glob(os.path.join(REPO, "workflows", "api", "*.json"))):
        with open(api_path) as f:
            ui = api_to_ui(json.load(f), info)
        text = json.dumps(ui, indent=1) + "\n"
        target = ui_path(api_path)
        current = open(target).read() if os.path.exists(target) else None
        if current != text:
            stale.append(os.path.relpath(target, REPO))
            if not check:
                with open(target, "w") as f:
                    f.write(text)
    if check and stale:
        print("stale UI workflows (run scripts/build_workflows.py):", ", ".join(stale))
        return 1
    print(("checked" if check else "wrote"), len(glob.glob(os.path.join(REPO, "workflows", "api", "*.json"))), "workflows")
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
