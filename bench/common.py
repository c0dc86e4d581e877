"""Shared set-up for the benchmarks: an in-process host, the stand-in checkpoint, timing helpers."""
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
sys.path.insert(0, os.path.join(REPO, "tests", "support"))
sys.path.insert(0, os.path.join(REPO, "scripts"))


def boot_host():
    """Import the host with a throw-away base directory; returns (comfy_dir, base_dir)."""
    import host_harness as harness

    base = tempfile.mkdtemp(prefix="likeness_bench_")
    comfy = harness.import_host(base)
    harness.InProcessHost()
    return comfy, base


def standin_checkpoint(comfy, base, family="sd15"):
    """Load a stand-in checkpoint (sd15, sd2, sdxl) through the host's CheckpointLoaderSimple -> (model, clip, vae)."""
    import nodes
    from standin_checkpoint import build_standin_checkpoint

    name = f"likeness_standin_{family}.safetensors"
    path = os.path.join(base, "models", "checkpoints", name)
    if not os.path.exists(path):
        build_standin_checkpoint(comfy, path, family=family)
    return nodes.CheckpointLoaderSimple().load_checkpoint(name)


def median_times(fns: dict, repeats=5, warmup=1) -> dict:
    """Median wall time of each function, measured round-robin so background load hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


class EvalCounter:
    """Counts UNet evaluations (batch rows) through the host's model_function_wrapper."""

    def __init__(self):
        self.rows = 0
        self.calls = 0

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone() deep-copies model_options; keep counting in one place

    def __call__(self, apply_model, args):
        self.rows += args["input"].shape[0]
        self.calls += 1
        return apply_model(args["input"], args["timestep"], **args["c"])


def write_result(name, data):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(json.dumps(data, indent=2))
    return path
