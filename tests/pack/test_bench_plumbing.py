"""The bench's plumbing, checked on the CPU: results named by LIKENESS_BENCH_TAG, the host booted in-process on an
image without the frontend package (what bench/gpu_bundle.sh leaves out), bench/gpu.sh refusing to measure
without CUDA, how the Inv-Adapter bench judges a mode against its limit, and that the attention layouts the
layout bench compares compute the same thing. The benches themselves are measurements (bench/, docs/speed.md),
not tests."""
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


def test_bf16_is_refused_on_a_cpu_that_emulates_it_and_the_cpu_scripts_pick_fp32(monkeypatch):
    """On an AVX2-only CPU torch emulates bf16 (a matrix product tens of times as long as in fp32): the SDXL CPU
    bench in bf16 would run for days, so asking for it is refused and the CPU scripts default to fp32 there."""
    import torch
    bench_common(monkeypatch, LIKENESS_BENCH_DEVICE="cpu", LIKENESS_BENCH_DTYPE="bf16")
    sys.modules.pop("full_models", None)
    import full_models as fm
    monkeypatch.setattr(fm, "cpu_bf16_slowdown", lambda: 72.6)
    with pytest.raises(RuntimeError, match="DTYPE=bf16: this CPU emulates bfloat16.*73 times as long as in fp32"):
        fm.bench_device()
    assert fm.quick_cpu_dtype() == "fp32"
    monkeypatch.setattr(fm, "cpu_bf16_slowdown", lambda: 0.6)
    assert fm.bench_device() == (torch.device("cpu"), torch.bfloat16) and fm.quick_cpu_dtype() == "bf16"
    monkeypatch.undo()
    # The probe itself, and the command the scripts call, on this machine's CPU.
    slowdown = fm.cpu_bf16_slowdown()
    assert 0 < slowdown < float("inf")
    done = subprocess.run([sys.executable, os.path.join(BENCH, "full_models.py")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ("bf16" if slowdown <= fm.BF16_TOO_SLOW else "fp32")
    sys.modules.pop("full_models", None)
    sys.modules.pop("common", None)


def test_first_image_is_judged_whole_and_by_parts(monkeypatch):
    bench_common(monkeypatch)
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


def test_attention_layouts_agree_and_a_saving_is_settled_only_beyond_chance(monkeypatch):
    bench_common(monkeypatch)
    import torch
    import bench_attention_layout as bench

    def kernel(q, k, v, heads):  # the host kernels' calling convention: (batch, tokens, heads * dim_head)
        split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        return out.transpose(1, 2).flatten(2)

    g = torch.Generator().manual_seed(0)
    q, kv, ref = torch.randn(2, 16, 8, generator=g), torch.randn(2, 16, 8, generator=g), torch.randn(1, 16, 8, generator=g)
    fns = bench.layouts(kernel, q, kv, ref, heads=2)
    assert max(bench.differences(fns).values()) < 1e-6
    fns["one_call"] = lambda: kernel(q, kv, kv, 2)  # a layout that drops the reference term is not the same thing
    assert bench.differences(fns)["one_batched_call"] > 1e-2

    def shape(sites, two, one):
        return {"sites": sites, "raw": {"two_calls": two, "one_call": one}}
    agreed = bench.savings([shape(5, [2.0] * 6, [1.8, 1.7, 1.8, 1.7, 1.8, 1.7]), shape(1, [1.0] * 6, [1.2, 1.3] * 3)],
                           "one_batched_call")
    assert agreed["per_evaluation"]["min"] == pytest.approx(1 - 10.2 / 11)  # weighted by how many sites share a shape
    assert agreed["sign_test_p"] == pytest.approx(2 / 2 ** 6)
    assert agreed["settled"] == pytest.approx(agreed["per_evaluation"]["median"])
    mixed = bench.savings([shape(1, [1.0] * 9, [0.9] * 7 + [1.1, 0.95])], "one_batched_call")  # 8 of 9 rounds agree
    assert mixed["sign_test_p"] == pytest.approx(2 * 10 / 512) and mixed["settled"] == pytest.approx(0.1)
    split = bench.savings([shape(1, [1.0] * 9, [0.9] * 6 + [1.1] * 3)], "one_batched_call")  # 6 of 9: chance
    assert split["settled"] is None and split["per_evaluation"]["median"] == pytest.approx(0.1)
    assert bench.savings([shape(1, [1.0], [0.5])], "one_batched_call")["settled"] is None  # one round settles nothing
    sys.modules.pop("common", None)
