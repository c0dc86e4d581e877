"""The bench's plumbing, checked on the CPU: results named by LIKENESS_BENCH_TAG, the host booted in-process on an
image without the frontend package (what bench/gpu_bundle.sh leaves out), bench/gpu.sh refusing to measure
without CUDA, and how the Inv-Adapter bench judges a mode against its limit. The benches themselves are
measurements (bench/, docs/speed.md), not tests."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "bench")


def bench_common(monkeypatch, **env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.syspath_prepend(BENCH)
    sys.modules.pop("common", None)
    import common
    return common


def test_result_names_follow_the_tag(monkeypatch, tmp_path):
    common = bench_common(monkeypatch, LIKENESS_BENCH_RESULTS=str(tmp_path))
    monkeypatch.delenv("LIKENESS_BENCH_TAG", raising=False)
    assert common.result_name("full_sd15") == "full_sd15"
    monkeypatch.setenv("LIKENESS_BENCH_TAG", "cuda")
    path = common.write_result("full_sd15", {"device": "cuda"})
    assert path == str(tmp_path / "full_sd15_cuda.json")
    assert os.path.exists(path) and not os.path.exists(tmp_path / "full_sd15.json")
    monkeypatch.setenv("LIKENESS_BENCH_TAG", "../escape")
    with pytest.raises(SystemExit, match="LIKENESS_BENCH_TAG must be letters"):
        common.result_name("full_sd15")
    sys.modules.pop("common", None)


def test_host_boots_without_the_frontend_package(tmp_path):
    """A bare CUDA image has no comfyui-frontend-package; the host's server exits at start without it unless
    the harness points it at an empty frontend folder (no socket is served in-process)."""
    hook = tmp_path / "sitecustomize.py"
    hook.write_text(textwrap.dedent("""
        import importlib.abc, sys
        class NoFrontend(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "comfyui_frontend_package":
                    raise ImportError("comfyui_frontend_package is absent on this image")
        sys.meta_path.insert(0, NoFrontend())
    """))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.join(REPO, "scripts")!r})
        import host_harness
        host_harness.import_host({str(tmp_path / "base")!r})
        host = host_harness.InProcessHost()
        print("nodes:", len(host.nodes.NODE_CLASS_MAPPINGS))
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "comfyui-frontend-package is not installed" not in done.stderr
    assert int(done.stdout.split("nodes:")[1]) > 100


def test_gpu_script_refuses_without_cuda():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: bench/gpu.sh would start measuring")
    done = subprocess.run(["bash", os.path.join(BENCH, "gpu.sh")], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PY=sys.executable, LIKENESS_GPU_BUNDLE="0"))
    assert done.returncode != 0
    assert "torch sees no CUDA device" in done.stderr


def test_first_image_is_judged_whole_and_by_parts(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    sys.modules.pop("common", None)
    import bench_inv_adapter as bench
    med = {"host": 10.0, "limit": 12.0, "reuse": 12.6, "extract": 5.0, "extract_floor": 4.0,
           "first_image": 18.0, "first_image_limit": 17.0}
    within = bench.time_over_limits(med)
    assert within["reuse"] == pytest.approx(1.05) and within["extract"] == pytest.approx(1.25)
    assert within["first_image"] == pytest.approx(18 / 17)
    assert within["first_image_by_parts"] == pytest.approx(17.6 / 16)  # (extract + reuse) / (floor + limit)
    assert within["first_image_limit_over_its_parts"] == pytest.approx(17 / 16)
    partial = bench.time_over_limits({"host": 10.0, "limit": 12.0, "reuse": 12.6, "extract": 5.0})
    assert set(partial) == {"reuse"}  # no floor measured: no by-parts verdict, and no extraction verdict
    sys.modules.pop("common", None)
