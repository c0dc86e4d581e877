"""Shared set-up for the benchmarks: an in-process host, the stand-in checkpoint, timing and memory helpers.

Benchmarks build what they measure from the host's own classes (bench/full_models.py: the real SD1.5, SD2-768 and
SDXL architectures with random weights) or from scripts/ (the stand-in checkpoint); they never import test code.

Timing: `alternate` runs every mode once per round, in the same order, for several rounds in one process, and
reports each mode's median and range and its ratio to a baseline mode taken within each round (so slow phases
of a shared machine hit both sides of a ratio). On the CPU the clock is the process's user CPU time (threads are
pinned to LIKENESS_BENCH_THREADS, 1 by default); on CUDA it is wall time after a device synchronise.

Results go to bench/results/<name>.json (LIKENESS_BENCH_RESULTS names another folder); LIKENESS_BENCH_TAG=<word>
writes <name>_<word>.json instead, so a run with other knobs (more steps, another device) sits beside the default
one rather than replacing it.
"""
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.environ.get("LIKENESS_BENCH_RESULTS") or os.path.join(REPO, "bench", "results")
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


def profusion_prompt(model, clip, net, vision_tokens, reference_latent, meta):
    """What PromptNet Concept and the likeness prompt give KSampler (Fusion) for one photo: a PromptNet source
    around `net` and the fused, concept and context conditionings of a ProFusion-style prompt (re-encoded with
    each new S* while sampling), plus the empty negative. -> (source, negative, fused, concept, context)"""
    import comfy.model_management
    import comfy.model_patcher
    import nodes
    from comfyui_likeness.concepts.prompt_injection import encode_likeness_prompt
    from comfyui_likeness.concepts.promptnet_source import PromptNetSource

    patcher = comfy.model_patcher.ModelPatcher(net, load_device=model.load_device,
                                               offload_device=comfy.model_management.unet_offload_device())
    source = PromptNetSource(patcher, vision_tokens, reference_latent, meta)
    concept = source.static_concept(model, "promptnet:bench")
    fused, concept_cond, context = encode_likeness_prompt(clip, "a holder is wearing a superman costume", concept,
                                                          "holder", "person", 0.7)
    return source, nodes.CLIPTextEncode().encode(clip, "")[0], fused, concept_cond, context


def threads() -> int:
    return int(os.environ.get("LIKENESS_BENCH_THREADS", 1))


class Clock:
    """On the CPU, the user CPU time of this process: on a shared machine neither waiting for a core nor the
    kernel's page-fault work under memory pressure (system time) counts. Wall time after a synchronise on CUDA."""

    def __init__(self, device):
        import torch

        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self._sync = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.kind = "wall time (CUDA synchronised)" if self.cuda else "user CPU time of the process"

    def __call__(self) -> float:
        self._sync()
        return time.perf_counter() if self.cuda else resource.getrusage(resource.RUSAGE_SELF).ru_utime


def median_times(fns: dict, repeats=5, warmup=1, clock=None) -> dict:
    """Median time of each function, measured round-robin so background load hits all of them alike."""
    clock = clock or time.perf_counter
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = clock()
            fn()
            times[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def summary(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def alternate(fns: dict, baseline: str, rounds: int, clock, warmup: bool = True, log=None, observe=None,
              on_round=None) -> dict:
    """Every mode once per round, `rounds` rounds, in one process: {"seconds": {mode: summary},
    "ratio": {mode: summary of time / baseline time of the same round}, "raw": {mode: [seconds]}}.

    observe(mode, round): a context manager around each timed call (e.g. PeakMemory in the first round), entered
    before the clock starts; on_round(partial result) after every round (to keep what a long run has measured)."""
    import contextlib

    if warmup:
        for fn in fns.values():
            fn()
    raw = {k: [] for k in fns}

    def result():
        done = {k: v for k, v in raw.items() if v}
        ratio = {k: summary([a / b for a, b in zip(done[k], done[baseline])]) for k in done if k != baseline}
        return {"seconds": {k: summary(v) for k, v in done.items()}, "ratio": ratio, "raw": done}

    for r in range(rounds):
        for k, fn in fns.items():
            with (observe(k, r) if observe else contextlib.nullcontext()):
                t = clock()
                fn()
                raw[k].append(clock() - t)
            if log:
                log(f"round {r + 1}/{rounds} {k}: {raw[k][-1]:.2f} s")
        if on_round:
            on_round(result())
    return result()


class PeakMemory:
    """Peak memory of a block above what was in use when it started: CUDA allocator peak on a GPU, else the
    process's resident set sampled every 20 ms (plus the kernel's high-water mark when it rose)."""

    def __init__(self, device, interval=0.02):
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self.interval = interval
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        _release_free_memory()
        self._start = self._rss()
        self._hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._max = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._max = max(self._max, self._rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return False
        self._stop.set()
        self._thread.join()
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max(self._max, hwm if hwm > self._hwm else 0)
        self.peak_bytes = max(0, peak - self._start)
        return False


def _release_free_memory():
    """Give freed heap pages back to the system so the resident set starts from what is really in use."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_mib(fn, device) -> float:
    with PeakMemory(device) as p:
        fn()
    return p.peak_bytes / 2**20


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


def result_name(name):
    """The result's file name: the bench's own, or with LIKENESS_BENCH_TAG appended."""
    tag = os.environ.get("LIKENESS_BENCH_TAG", "")
    if tag and not tag.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"LIKENESS_BENCH_TAG must be letters, digits, '-' or '_' (got {tag!r})")
    return f"{name}_{tag}" if tag else name


def result_path(name):
    """Where the bench called `name` writes its result (RESULTS, the tag applied)."""
    return os.path.join(RESULTS, f"{result_name(name)}.json")


def write_result(name, data):
    os.makedirs(RESULTS, exist_ok=True)
    path = result_path(name)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    print(json.dumps(data, indent=2))
    return path
