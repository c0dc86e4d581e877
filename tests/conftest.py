"""Session fixtures: the real ComfyUI host (in-process), micro models, and the stand-in model files.

tests/<area>/ holds the tests of one area of the pack; tests/support/ holds what they share (micro models,
per-family fixtures and test-time assets, workflow helpers); the host harness is scripts/host_harness.py, which
the scripts use too.
"""
import os
import shutil
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "support"), os.path.join(os.path.dirname(HERE), "scripts")]
import host_harness as harness  # noqa: E402
import standins  # noqa: E402

REPO = harness.REPO

_BASE = tempfile.mkdtemp(prefix="likeness_tests_")
COMFY = harness.import_host(_BASE)


@pytest.fixture(scope="session")
def base_dir():
    yield _BASE
    shutil.rmtree(_BASE, ignore_errors=True)


@pytest.fixture(scope="session")
def pack():
    """The pack imported as a package (library code for unit tests)."""
    import comfyui_likeness
    return comfyui_likeness


@pytest.fixture(scope="session")
def checkpoint(base_dir):
    """The stand-in SD1.5 checkpoint in the host's checkpoints folder (built once per session)."""
    return standins.ensure_checkpoint(base_dir, COMFY)


@pytest.fixture(scope="session")
def checkpoint_sd2(base_dir):
    """A stand-in SD2.x-base checkpoint (OpenCLIP ViT-H text encoder, context 1024)."""
    return standins.ensure_checkpoint(base_dir, COMFY, "sd2")


@pytest.fixture(scope="session")
def checkpoint_sdxl(base_dir):
    """A stand-in SDXL checkpoint (CLIP-L + bigG text encoders, pooled output and size conditioning)."""
    return standins.ensure_checkpoint(base_dir, COMFY, "sdxl")


@pytest.fixture(scope="session")
def clip_vision(base_dir):
    """Name of the stand-in CLIP vision file that the host's CLIPVisionLoader accepts."""
    return standins.ensure_clip_vision(base_dir, COMFY)


@pytest.fixture(scope="session")
def input_images(base_dir):
    """Public-domain test photos placed in the host's input folder (scikit-image ships them)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    names = {}
    for name, arr in (("astronaut.png", data.astronaut()), ("coffee.png", data.coffee())):
        Image.fromarray(np.asarray(arr)).save(os.path.join(base_dir, "input", name))
        names[name] = name
    return names


_HOSTS = []


@pytest.fixture(scope="session")
def host(base_dir, checkpoint, input_images):
    _HOSTS.append(harness.InProcessHost())
    return _HOSTS[-1]


def release_host_memory():
    for h in _HOSTS:
        h.release_memory()


@pytest.fixture(scope="session")
def free_memory():
    """Call it before starting a server: the in-process host's cached models are freed first."""
    return release_host_memory


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
    """A module's workflows leave their models in the in-process executor's cache; free them before the next
    module (which may start a server that loads its own copies), so the session's peak memory stays that of one
    module's models."""
    yield
    release_host_memory()


@pytest.fixture(scope="session")
def micro():
    import micro as m
    return {"model": m.micro_model(), "clip": m.micro_clip(), "vae": m.micro_vae()}


@pytest.fixture(scope="session")
def workflow_assets(base_dir, checkpoint, input_images):
    """Every file the shipped workflows need, written into the host's folders.

    Model files: a stand-in under each name a shipped API workflow uses (tests/support/standins.py, the one
    mapping public name -> builder). Other inputs (the painted pet photo, ...): each tests/support/assets_<family>.py
    may define prepare(base_dir, comfy_dir).
    """
    import glob
    import importlib

    import workflow_tools

    for path in workflow_tools.api_workflows():
        standins.place_for(base_dir, COMFY, workflow_tools.load(path))
    for path in sorted(glob.glob(os.path.join(HERE, "support", "assets_*.py"))):
        module = importlib.import_module(os.path.splitext(os.path.basename(path))[0])
        if hasattr(module, "prepare"):
            module.prepare(base_dir, COMFY)
    return base_dir
