"""The shipped templates in the real ComfyUI frontend (headless Chromium against the test host's real server):
opened from the template browser, each loads with no missing-node or missing-model dialog, no node in error,
widget values equal to the file, graphToPrompt() equal to its API twin, nodes drawn at their saved sizes with no
overlap and no cut-off text, the whole graph in the saved view, and no console error caused by the pack. One is
queued from the UI and its image appears. The checks are shown to fail on deliberately broken copies.

Needs Debian's chromium and playwright (bash scripts/setup_browser.sh; CI runs it). Without them the tests skip
on a developer machine and fail under CI (CI=true). LIKENESS_FRONTEND_ROOT=<a frontend's static folder> runs them
against another frontend build (the server's --front-end-root), e.g. a newer comfyui-frontend-package."""
import copy
import logging
import os
import sys

import pytest

import frontend
import host_harness as harness
import workflow_tools as wt

WORKFLOWS = wt.api_workflows()
IDS = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS]
MISSING = frontend.browser_available()
if MISSING and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
    raise RuntimeError(f"the browser test must run in CI: {MISSING}")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "")


@pytest.fixture(scope="module")
def page(workflow_assets, base_dir, free_memory):
    from comfy_http import ComfyServer

    free_memory()
    root = os.environ.get("LIKENESS_FRONTEND_ROOT")
    srv = ComfyServer(harness.comfy_dir(), base_dir, python=sys.executable,
                      extra_args=("--front-end-root", root) if root else ()).start()
    try:
        with frontend.FrontendPage(srv.url) as p:
            p.origin = srv.url
            yield p
    finally:
        srv.stop()


def _open(page, name):
    page.recover()
    page.close_dialogs()
    page.console.clear()
    ui = wt.load(os.path.join(wt.FOLDER, wt.about(name)["title"] + ".json"))
    page.open_template(harness.PACK_NAME, wt.about(name)["title"], len(ui["nodes"]))
    return ui


SHOTS = os.path.join(wt.REPO, "out", "browser")  # screenshots of every template as opened (out/ is not committed)


@pytest.mark.parametrize("name", IDS)
def test_template_opens_clean(page, name):
    ui = _open(page, name)
    state = page.state()
    os.makedirs(SHOTS, exist_ok=True)
    shot = os.path.join(SHOTS, f"{name}.png")
    page.screenshot(shot)
    found = frontend.problems(state, ui, wt.load(os.path.join(wt.API_DIR, name + ".json")), page.console, page.origin)
    assert not found, f"{name} (screenshot {shot}): {found}"


def test_a_workflow_queued_from_the_ui_shows_its_image(page):
    name = "fusion_ksampler_text_concept"
    _open(page, name)
    page.set_widgets({("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64,
                      ("LikenessKSamplerFusion", "steps"): 2})
    result = page.run_from_ui()
    kinds = [k for k, _ in result["events"]]
    assert "execution_success" in kinds, result["events"]
    shown = [img for node in result["images"] for img in node]
    assert shown and all(i["width"] == 64 and i["height"] == 64 and "/view?" in i["src"] for i in shown), shown


def _broken_copies(ui: dict) -> dict:
    by_type = {n["type"]: n for n in ui["nodes"]}
    overlap = copy.deepcopy(ui)
    first, second = overlap["nodes"][0], overlap["nodes"][1]
    second["pos"] = [first["pos"][0] + 20, first["pos"][1] + 20]
    unknown = copy.deepcopy(ui)
    unknown["nodes"][[n["type"] for n in ui["nodes"]].index("LikenessConceptText")]["type"] = "LikenessNoSuchNode"
    changed = copy.deepcopy(ui)
    latent = next(n for n in changed["nodes"] if n["id"] == by_type["EmptyLatentImage"]["id"])
    latent["widgets_values"][0] = 640
    narrow = copy.deepcopy(ui)  # the checkpoint's file name no longer fits its loader
    next(n for n in narrow["nodes"] if n["type"] == "CheckpointLoaderSimple")["size"][0] = 230
    return {"overlapping nodes at the drawn sizes": overlap, "unknown or errored nodes": unknown,
            "graphToPrompt differs from the API twin": changed, "cut-off text": narrow}


@pytest.mark.parametrize("broken", ["overlapping nodes at the drawn sizes", "unknown or errored nodes",
                                    "graphToPrompt differs from the API twin", "cut-off text"])
def test_the_checks_fail_on_a_broken_copy(page, broken):
    name = "fusion_ksampler_text_concept"
    good = wt.load(os.path.join(wt.FOLDER, wt.about(name)["title"] + ".json"))
    api = wt.load(os.path.join(wt.API_DIR, name + ".json"))
    copy_ui = _broken_copies(good)[broken]
    page.recover()
    page.close_dialogs()
    page.console.clear()
    page.load_graph(copy_ui, "broken copy")
    found = frontend.problems(page.state(), copy_ui, api, page.console, page.origin)
    page.close_dialogs()
    logging.getLogger("likeness.tests.browser").info("broken copy (%s): %s", broken, found)
    assert broken in found, found
    if broken == "cut-off text":
        assert ("CheckpointLoaderSimple", "ckpt_name", "cut") in {e[1:] for e in found[broken]}, found[broken]
