"""Run a shipped API workflow headless on a real ComfyUI server (127.0.0.1) and write its images.

    .host/venv/bin/python scripts/run_workflow.py example_workflows/api/fusion_ksampler_text_concept.json \
        [--checkpoint /path/to/your_sd15.safetensors] [--models /path/to/ComfyUI/models] [--out out/] \
        [--steps N] [--size 512]

With --checkpoint (or LIKENESS_CHECKPOINT) the workflow runs on your model; --models links the folders of your
ComfyUI models directory (checkpoints, clip_vision, likeness, insightface, ...) for the other files a workflow
names (docs/workflows.md lists them). With neither, the checkpoint the workflow names is replaced by a small
stand-in of the same family with random weights, generated on the spot (its images are noise: it proves the
pipeline, not the method). The server gets its own base directory, so your ComfyUI folders are not touched.
"""
import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from comfy_http import ComfyServer  # noqa: E402
import model_files  # noqa: E402
from standin_checkpoint import build_standin_checkpoint  # noqa: E402

log = logging.getLogger("likeness.run")


def comfy_dir() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        recorded = os.path.join(os.environ.get("LIKENESS_HOST", os.path.join(REPO, ".host")), "comfyui_path")
        path = open(recorded).read().strip() if os.path.exists(recorded) else ""
    if not path or not os.path.exists(os.path.join(path, "main.py")):
        sys.exit("no ComfyUI found: run `bash scripts/setup.sh` first, or set COMFYUI_PATH")
    return path


def _checkpoint_names(prompt: dict) -> list[str]:
    return list(dict.fromkeys(n["inputs"]["ckpt_name"] for n in prompt.values()
                              if n["class_type"] == "CheckpointLoaderSimple" and isinstance(n["inputs"].get("ckpt_name"), str)))


def prepare_prompt(prompt: dict, ckpt_name: str | None, steps: int | None, size: int | None) -> dict:
    """ckpt_name: the user's checkpoint for every checkpoint loader (None keeps the workflow's names)."""
    for node in prompt.values():
        inputs = node["inputs"]
        if ckpt_name and node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt_name
        if steps and isinstance(inputs.get("steps"), int):
            inputs["steps"] = steps
        if size and node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            inputs["width"] = inputs["height"] = size
    return prompt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="an API-format workflow (example_workflows/api/*.json)")
    ap.add_argument("--checkpoint", default=os.environ.get("LIKENESS_CHECKPOINT"), help="your checkpoint file")
    ap.add_argument("--models", help="your ComfyUI models folder: its sub-folders are linked for the other files")
    ap.add_argument("--out", default=os.path.join(REPO, "out"), help="folder for the images")
    ap.add_argument("--steps", type=int, help="override every 'steps' input")
    ap.add_argument("--size", type=int, help="override the image size (width = height)")
    ap.add_argument("--inputs", default=None, help="folder with the input images the workflow loads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[likeness] %(message)s")

    comfy = comfy_dir()
    with open(args.workflow) as f:
        prompt = json.load(f)
    base = tempfile.mkdtemp(prefix="likeness_run_")
    try:
        os.makedirs(os.path.join(base, "custom_nodes"))
        os.symlink(REPO, os.path.join(base, "custom_nodes", "comfyui_likeness"))
        models = os.path.join(base, "models")
        os.makedirs(models)
        if args.models:
            for sub in sorted(os.listdir(args.models)):
                if os.path.isdir(os.path.join(args.models, sub)) and not (sub == "checkpoints" and args.checkpoint):
                    os.symlink(os.path.abspath(os.path.join(args.models, sub)), os.path.join(models, sub))
        user_checkpoints = os.path.exists(os.path.join(models, "checkpoints"))
        os.makedirs(os.path.join(models, "checkpoints"), exist_ok=True)
        name = None
        if args.checkpoint:
            ckpt = os.path.abspath(args.checkpoint)
            if not os.path.isfile(ckpt):
                sys.exit(f"checkpoint not found: {ckpt}")
            os.symlink(ckpt, os.path.join(models, "checkpoints", os.path.basename(ckpt)))
            name = os.path.basename(ckpt)
            log.info("running on your checkpoint %s", ckpt)
        elif not user_checkpoints:
            wanted = _checkpoint_names(prompt)
            family = model_files.CATALOG[wanted[0]].family if wanted and wanted[0] in model_files.CATALOG else "sd15"
            log.info("NO CHECKPOINT GIVEN: running on a generated stand-in %s checkpoint with random weights, under "
                     "the name the workflow uses. The image will be noise; pass --checkpoint "
                     "/path/to/model.safetensors for real pictures.", family)
            for ckpt_name in wanted or ["v1-5-pruned-emaonly-fp16.safetensors"]:
                build_standin_checkpoint(comfy, os.path.join(models, "checkpoints", ckpt_name), family=family)
            args.size = args.size or 128
            args.steps = args.steps or 8
        _copy_inputs(os.path.join(base, "input"), args.inputs)
        prompt = prepare_prompt(prompt, name, args.steps, args.size)
        t0 = time.time()
        with ComfyServer(comfy, base, python=sys.executable) as server:
            log.info("ComfyUI listening on %s (pid %d)", server.url, server.proc.pid)
            entry = server.run(prompt)
            images = server.images(entry)
        os.makedirs(args.out, exist_ok=True)
        written = []
        for filename, data in images:
            path = os.path.join(args.out, filename)
            with open(path, "wb") as f:
                f.write(data)
            written.append(path)
        log.info("done in %.1fs; wrote %s", time.time() - t0, ", ".join(written))
        return written
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _copy_inputs(dst: str, src: str | None):
    """Input images: the user's folder, or the public-domain photos scikit-image ships (astronaut, coffee)."""
    os.makedirs(dst, exist_ok=True)
    if src:
        for name in os.listdir(src):
            shutil.copy(os.path.join(src, name), dst)
        return
    try:
        import numpy as np
        from PIL import Image
        from skimage import data
    except ImportError:
        return
    Image.fromarray(np.asarray(data.astronaut())).save(os.path.join(dst, "astronaut.png"))
    Image.fromarray(np.asarray(data.coffee())).save(os.path.join(dst, "coffee.png"))


if __name__ == "__main__":
    main()
