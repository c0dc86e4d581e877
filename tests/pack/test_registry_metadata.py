"""What the Comfy Registry and ComfyUI-Manager read from pyproject.toml is present and consistent: the node id,
a three-part version, the licence file, the repository URL, the publisher, and the tested ComfyUI range."""
import os
import re
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pyproject_has_the_registry_fields():
    meta = tomllib.load(open(os.path.join(REPO, "pyproject.toml"), "rb"))
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*[a-z0-9]", project["name"]) and "comfyui" in project["name"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert os.path.exists(os.path.join(REPO, project["license"]["file"]))
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"]
    lowest = re.fullmatch(r">=(\d+\.\d+\.\d+)", comfy["requires-comfyui"]).group(1)
    assert lowest in open(os.path.join(REPO, "docs", "compatibility.md")).read(), \
        "docs/compatibility.md must state the lowest ComfyUI version pyproject.toml requires"


def test_publish_workflow_runs_on_version_changes():
    text = open(os.path.join(REPO, ".github", "workflows", "publish.yml")).read()
    assert "Comfy-Org/publish-node-action" in text and "pyproject.toml" in text and "REGISTRY_ACCESS_TOKEN" in text
