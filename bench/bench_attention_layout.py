"""Two layout choices of Inv-Adapter's extra attention, timed on the host's own attention kernels at the
self-attention shapes of the real UNets, many short alternated rounds instead of two inside a whole UNet run
(bench_inv_adapter.py's layout numbers moved between runs as much as they differed).

  K' rows    the reference's K'/V' (one photo, batch 1) handed to the batch-2 (cond + uncond) call broadcast
             (stride 0) or as one contiguous copy per row; attention/inv_adapter.py makes the copy
  one call   the block's own attention and the reference attention as two kernel calls (what the dispatcher
             does) or as one call of twice the batch (possible only where the reference has the block's token
             count: one photo at the generated size, no pooling)

Every variant is first checked against the pack's layout on the same tensors (max abs difference in the result).
Times are per site shape and summed over one UNet evaluation (each shape times the number of sites that have
it), round by round, so the saving's range is over whole evaluations. A choice counts as settled on a kernel only
where the rounds agree on which layout is faster more often than chance would (a sign test, `savings`).

Shapes: SD1.5 at 512 x 512 and SDXL at 1024 x 1024 (the host's classes on the meta device, bench/full_models.py).
Kernels: the host's default on this device plus attention_sub_quad and attention_pytorch (LIKENESS_BENCH_KERNELS,
comma-separated, picks others, e.g. attention_split). Device and dtype as the other full-size benches (CUDA fp16
when present, else the CPU in fp32; LIKENESS_BENCH_DEVICE, LIKENESS_BENCH_DTYPE); LIKENESS_BENCH_ROUNDS (15),
LIKENESS_BENCH_THREADS (1), LIKENESS_BENCH_TAG. Writes bench/results/attention_layout.json.
Run: .host/venv/bin/python bench/bench_attention_layout.py [sd15] [sdxl]
"""
import math
import os
import platform
import statistics
import sys
import time

import torch

from common import Clock, alternate, boot_host, summary, threads, write_result

FAMILIES = {"sd15": 512, "sdxl": 1024}
# The host's CPU default and its GPU default (attention_split, opt-in with --use-split-cross-attention, took about
# the same CPU time per call but 2.5 times the wall time at 4096 tokens here: LIKENESS_BENCH_KERNELS times it).
NAMED_KERNELS = ("attention_sub_quad", "attention_pytorch")
SIGMA_I = 1.0  # the reference term's weight; any value, it is the same in every layout
SETTLED_P = 0.05
PAIRS = {"contiguous_K_rows": ("contiguous", "broadcast"), "one_batched_call": ("one_call", "two_calls")}


def say(msg):
    print(f"[bench_attention_layout {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def site_shapes(family: str, size: int) -> list:
    """The distinct (tokens, inner_dim, heads) of the UNet's self-attention sites at `size`, with how many sites
    have each."""
    import full_models as fm
    from comfyui_likeness.core.layout import attention_layout

    shapes = {}
    for site in attention_layout(fm.MetaPatcher(family)).sites:
        key = (site.tokens(size // 8, size // 8), site.inner_dim, site.heads)
        shapes.setdefault(key, []).append(site.name)
    return [{"tokens": t, "inner_dim": d, "heads": h, "sites": len(names), "first_site": names[0]}
            for (t, d, h), names in shapes.items()]


def layouts(kernel, q, kv, ref, heads) -> dict:
    """Each way of computing O_s + sigma_I * Attn(q, K', V') for a batch-2 q; ref is the batch-1 K' (= V' here:
    the layouts move rows, they do not care what the rows hold)."""
    rows = q.shape[0]

    def rows_of(x):
        return x.expand(rows, -1, -1)

    def contiguous():
        return kernel(q, rows_of(ref).contiguous(), rows_of(ref).contiguous(), heads)

    def batched():
        out = kernel(torch.cat([q, q]), torch.cat([kv, rows_of(ref)]), torch.cat([kv, rows_of(ref)]), heads)
        return out[:rows] + SIGMA_I * out[rows:]

    return {
        "broadcast": lambda: kernel(q, rows_of(ref), rows_of(ref), heads),
        "contiguous": contiguous,
        "two_calls": lambda: kernel(q, kv, kv, heads) + SIGMA_I * contiguous(),  # the pack's layout
        "one_call": batched,
    }


def differences(fns: dict) -> dict:
    """Max abs difference of each pair's results: a layout is a choice only if it computes the same thing."""
    with torch.inference_mode():
        out = {name: fn().float() for name, fn in fns.items()}
    return {pair: (out[a] - out[b]).abs().max().item() for pair, (a, b) in PAIRS.items()}


def sign_test(values) -> float:
    """Two-sided sign test: the chance that rounds of a layout no faster or slower than the other agree in sign at
    least this often."""
    n = sum(1 for x in values if x != 0)
    agree = max(sum(1 for x in values if x > 0), sum(1 for x in values if x < 0))
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(agree, n + 1)) / 2 ** n) if n else 1.0


def savings(per_shape: list, pair: str) -> dict:
    """Saving of the pair's first layout over its second on one UNet evaluation, round by round: 1 - sum(sites x
    time) / sum(sites x time) over the shapes. `settled` is the median saving where the rounds agree in sign more
    often than chance allows (sign test, p < SETTLED_P: 12 of 15 rounds, 18 of 25), else None."""
    new, old = PAIRS[pair]
    rounds = min(len(s["raw"][new]) for s in per_shape)
    saved = [1 - sum(s["sites"] * s["raw"][new][r] for s in per_shape)
             / sum(s["sites"] * s["raw"][old][r] for s in per_shape) for r in range(rounds)]
    p = sign_test(saved)
    return {"per_evaluation": summary(saved), "sign_test_p": p,
            "settled": statistics.median(saved) if p < SETTLED_P else None}


def kernels_to_time(attn) -> dict:
    chosen = [k for k in os.environ.get("LIKENESS_BENCH_KERNELS", "").split(",") if k]
    default = attn.optimized_attention.__name__
    names = chosen or list(dict.fromkeys([default, *NAMED_KERNELS]))
    unknown = [n for n in names if not callable(getattr(attn, n, None))]
    if unknown:
        raise SystemExit(f"LIKENESS_BENCH_KERNELS: the host has no attention kernel {', '.join(unknown)}")
    return {n: getattr(attn, n) for n in names}


def measure_family(family, kernels, device, dtype, rounds, clock) -> dict:
    size = FAMILIES[family]
    shapes = site_shapes(family, size)
    result = {"size": size, "shapes": shapes, "kernels": {}}
    g = torch.Generator().manual_seed(0)
    for name, kernel in kernels.items():
        per_shape = []
        for shape in shapes:
            t, d = shape["tokens"], shape["inner_dim"]
            q, kv = (torch.randn(2, t, d, generator=g).to(device, dtype) for _ in range(2))
            ref = torch.randn(1, t, d, generator=g).to(device, dtype)
            fns = layouts(kernel, q, kv, ref, shape["heads"])
            diff = differences(fns)  # runs every layout once: that is the warm-up
            with torch.inference_mode():
                timed = alternate(fns, "two_calls", rounds, clock, warmup=False)
            per_shape.append({**shape, "max_abs_difference": diff,
                              "seconds": {k: v["median"] for k, v in timed["seconds"].items()}, "raw": timed["raw"]})
            say(f"{family} {name} {t} tokens x {d}: " + ", ".join(
                f"{k} {v['median'] * 1e3:.1f} ms" for k, v in timed["seconds"].items()))
        result["kernels"][name] = {"per_shape": per_shape, **{pair: savings(per_shape, pair) for pair in PAIRS}}
    return result


def main(argv):
    from full_models import bench_device

    chosen = argv or list(FAMILIES)
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown architecture {unknown}; choose from {', '.join(FAMILIES)}")
    device, dtype = bench_device()
    torch.set_num_threads(threads())
    rounds = int(os.environ.get("LIKENESS_BENCH_ROUNDS", 15))
    boot_host()
    import comfy.ldm.modules.attention as attn

    kernels = kernels_to_time(attn)
    clock = Clock(device)
    out = {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "threads": threads(), "rounds": rounds,
           "clock": clock.kind, "cpu": platform.processor() or platform.machine(),
           "host_default_kernel": attn.optimized_attention.__name__,
           "pack_layout": "two calls, contiguous K' rows (attention/dispatcher.py, attention/inv_adapter.py)"}
    for family in chosen:
        out[family] = measure_family(family, kernels, device, dtype, rounds, clock)
        for name, k in out[family]["kernels"].items():
            say(f"{family} {name}: " + "; ".join(
                f"{pair} saves {k[pair]['per_evaluation']['median']:+.1%} "
                f"({k[pair]['per_evaluation']['min']:+.1%} to {k[pair]['per_evaluation']['max']:+.1%})"
                for pair in PAIRS))
    say(f"wrote {write_result('attention_layout', out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
