"""A real ComfyUI host for the tests: located, imported in-process on CPU, with a throw-away base directory.

COMFYUI_PATH selects a ComfyUI checkout; otherwise the one scripts/setup_host.sh recorded in .host/comfyui_path.
The host is imported with --base-directory pointing at a temporary folder, so models/, input/, output/ and
custom_nodes/ are the test's own; the pack is linked into that custom_nodes under an importable name.
"""
import asyncio
import copy
import os
import sys
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "comfyui_likeness"


def comfy_dir() -> str:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        recorded = os.path.join(os.environ.get("LIKENESS_HOST", os.path.join(REPO, ".host")), "comfyui_path")
        if os.path.exists(recorded):
            path = open(recorded).read().strip()
    if not path or not os.path.exists(os.path.join(path, "main.py")):
        raise RuntimeError("no ComfyUI found: run `bash scripts/setup.sh` first, or set COMFYUI_PATH to a ComfyUI checkout")
    return path


def link_pack(custom_nodes_dir: str):
    os.makedirs(custom_nodes_dir, exist_ok=True)
    link = os.path.join(custom_nodes_dir, PACK_NAME)
    if not os.path.lexists(link):
        os.symlink(REPO, link)
    return link


def import_host(base_dir: str):
    """Import the host's modules with CPU settings and base_dir as its base directory. Call once per process."""
    path = comfy_dir()
    if path not in sys.path:
        sys.path.insert(0, path)
    os.chdir(path)
    import comfy.cli_args
    import torch

    args = comfy.cli_args.args
    args.cpu = not torch.cuda.is_available()
    args.base_directory = base_dir
    args.disable_api_nodes = True
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:  # no socket is served in-process; a bare GPU image (bench/gpu_bundle.sh) need not carry it
        args.front_end_root = os.path.join(base_dir, "no_frontend")
        os.makedirs(args.front_end_root, exist_ok=True)
    for sub in ("models/checkpoints", "models/embeddings", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(base_dir, sub), exist_ok=True)
    link_pack(os.path.join(base_dir, "custom_nodes"))
    sys.path.insert(0, os.path.join(base_dir, "custom_nodes"))
    import utils.extra_config  # noqa: F401  claims the top-level 'utils' package before comfy/ is on sys.path
    import folder_paths
    assert folder_paths.base_path == os.path.abspath(base_dir), "the host was imported before the harness set it up"
    return path


class InProcessHost:
    """Runs API-format prompts through the host's PromptExecutor, with no socket opened."""

    def __init__(self):
        import execution
        import nodes
        import server

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = server.PromptServer(self.loop)
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.nodes = nodes
        self.execution = execution
        self.executor = execution.PromptExecutor(self.server, cache_type=False, cache_args={"lru": 0, "ram": 0})

    def release_memory(self):
        """Drop the executor's cached node outputs (the models the last prompts loaded) and give the freed memory
        back to the system, so a test session that runs many workflows keeps one workflow's models, not all."""
        import ctypes
        import gc

        import comfy.model_management

        self.executor.reset()
        comfy.model_management.unload_all_models()
        gc.collect()
        comfy.model_management.soft_empty_cache()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

    def validate(self, prompt: dict):
        return self.loop.run_until_complete(self.execution.validate_prompt(str(uuid.uuid4()), copy.deepcopy(prompt), None))

    def run(self, prompt: dict):
        """Returns (success, outputs, status messages)."""
        prompt = copy.deepcopy(prompt)  # the executor writes into the prompt dict
        valid = self.loop.run_until_complete(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not valid[0]:
            return False, {}, [("validation", {"error": valid[1], "node_errors": valid[3]})]
        self.executor.execute(prompt, str(uuid.uuid4()), {"client_id": "tests"}, valid[2])
        return self.executor.success, self.executor.history_result.get("outputs", {}), self.executor.status_messages
