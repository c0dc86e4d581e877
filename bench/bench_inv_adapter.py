"""Inv-Adapter against the host's KSampler on the same model, steps, sampler and scheduler, in one process, with the
exact formula's own cost limit measured in the same rounds.

Architectures (argument or LIKENESS_BENCH_MODELS, comma-separated; default standin,sd15, what a CPU runs in under an
hour; SDXL at 1024 px took 63 minutes in bf16 on one CPU core, `make bench-sdxl`):
  standin   the stand-in SD1.5 checkpoint (scripts/standin_checkpoint.py), 256 x 256      -> results/inv_adapter.json
  sd15      the full SD1.5 UNet (859.5 M, random weights, bench/full_models.py), 512 x 512 -> results/inv_adapter_sd15.json
  sdxl      the full SDXL UNet (2.57 B), 1024 x 1024                                    -> results/inv_adapter_sdxl.json
  sd2_768   the full SD2-768 (v-prediction) UNet, 768 x 768                             -> results/inv_adapter_sd2_768.json
Modes, each the whole user-visible work (KSampler euler / ddim_uniform, CFG 7, one image):
  host                KSampler on the plain model
  limit               KSampler with a bare replace patch doing only the exact formula's extra work at every self-
                      attention (K'/V' of the stored features of one step, the extra attention, the add): the cost of
                      the extra attention alone, what training-free reuse can at best reach
  reuse               Inv-Adapter Apply (training-free) with features already extracted, + KSampler
  limit_eaa, reuse_eaa the same with an EAA adapter (random weights, self + cross side, s_c = 256)
  fast                reuse with the opt-in fast mode (reference pooled 2 x 2 at the largest-grid blocks)
  reuse_live          reuse with 'trajectory only' features (the reference branch runs live, one batch-1 pass a step)
  first_image         Inv-Adapter Extract (per-step features) + Apply + KSampler
  first_image_limit   VAE encode + the T + 1 batch-1 UNet evaluations the inversion needs + limit: its floor
  extract             Inv-Adapter Extract alone (per-step features), the part the first image adds to reuse
  extract_floor       VAE encode + the T + 1 batch-1 evaluations alone: extract's floor; with reuse and limit in
                      the same round the first image is also judged by parts, (extract + reuse) / (extract_floor +
                      limit), each part beside its own floor (shorter modes, so less drift within a pair)
Reported per mode: median and range of the time and of its ratio to host in the same round, UNet rows per step,
added time per model call over host and over its limit, peak memory; INV_FEATURES bytes per step and the storage
choice for 50 steps; the fast mode's deviation from the exact output on the same seed; three layout measurements
(separate vs same-batch live reference pass, broadcast vs contiguous K' in the host kernel, two attention calls
vs one batched call for the block's own and the reference attention), each a single timing inside this run;
bench_attention_layout.py times the two kernel layouts on their own over many rounds.
Device: CUDA in fp16 when present (LIKENESS_BENCH_DEVICE=auto|cpu|cuda), else the CPU in fp32; LIKENESS_BENCH_DTYPE=bf16
halves the weights' memory and time on a CPU with bfloat16 instructions (the committed CPU results say which;
on a CPU that only emulates bf16 it is refused, bench/full_models.py).
Knobs: LIKENESS_BENCH_STEPS, LIKENESS_BENCH_ROUNDS, LIKENESS_BENCH_SIZE, LIKENESS_BENCH_MODES (a subset of the
modes), LIKENESS_BENCH_THREADS (1), LIKENESS_BENCH_TAG (a suffix for the result's name, bench/common.py).
Run: .host/venv/bin/python bench/bench_inv_adapter.py [sd15 ...]
"""
import contextlib
import logging
from dataclasses import replace
import os
import platform
import sys
import tempfile
import time

import torch

from common import Clock, EvalCounter, PeakMemory, alternate, boot_host, standin_checkpoint, threads, write_result

log = logging.getLogger("likeness.bench")
ARCHITECTURES = ("standin", "sd15", "sdxl", "sd2_768")
DEFAULT_ARCHITECTURES = "standin,sd15"
TARGETS = {"reuse_within_limit": 1.05, "first_image_within_limit": 1.05, "fast_mode": 1.15,
           "first_image_vs_host": 2.0, "reuse_vs_host": 1.3}
CFG, SEED = 7.0, 1


def say(msg):
    print(f"[bench_inv_adapter {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class ExtraAttentionOnly:
    """A bare replace patch: the block's own attention plus only the exact formula's extra term, w * Attn(q,
    K'(F), V'(F)) for fixed features F already on the device, with no provider, dispatcher or bookkeeping."""

    def __init__(self, feats, project_k, project_v, weight, aggregate=None, owner=None):
        self.feats, self.project_k, self.project_v, self.weight, self.aggregate = feats, project_k, project_v, weight, aggregate
        self.owner = owner  # the adapter's ModelPatcher: the host loads it with the UNet, as for Inv-Adapter Apply

    def __call__(self, q, k, v, extra_options):
        from comfyui_likeness.attention.dispatcher import host_attention

        heads = int(extra_options["n_heads"])
        out = host_attention(q, k, v, heads, extra_options)
        f = self.feats if self.aggregate is None else self.aggregate(self.feats)
        rk, rv = self.project_k(f).to(q.dtype), self.project_v(f).to(q.dtype)
        rk, rv = rk.expand(q.shape[0], -1, -1).contiguous(), rv.expand(q.shape[0], -1, -1).contiguous()
        return out + host_attention(q, rk, rv, heads, extra_options) * self.weight

    def to(self, *args):
        return self

    def models(self):
        return [self.owner] if self.owner is not None else []

    def __deepcopy__(self, memo):
        return self


def limit_model(model, features, dtype, device, adapter=None, weight=0.8):
    """The model with ExtraAttentionOnly on every site the mode touches (features of the top grid point)."""
    from comfyui_likeness.attention.inv_adapter import eaa_patcher
    from comfyui_likeness.core.layout import attention_layout, transformer_block

    layout = attention_layout(model)
    owner = eaa_patcher(adapter) if adapter is not None else None
    m = model.clone()
    point = features.features[max(features.features)]
    for s in layout.sites:
        f1 = point[("attn1", s.key)].to(device, dtype)
        if adapter is None:
            attn1 = transformer_block(model, s).attn1
            patch = ExtraAttentionOnly(f1, attn1.to_k, attn1.to_v, weight)
        else:
            layer = adapter.layer(s.key)
            patch = ExtraAttentionOnly(f1, layer.self_k, layer.self_v, weight, owner=owner)
            f2 = point[("attn2", s.key)].to(device, dtype)
            m.set_model_patch_replace(ExtraAttentionOnly(f2, layer.cross_k, layer.cross_v, weight,
                                                         aggregate=layer.aggregate_tokens, owner=owner), "attn2", *s.key)
        m.set_model_patch_replace(patch, "attn1", *s.key)
    return m


def provider_of(patched):
    from comfy.patcher_extension import WrappersMP
    return next(w for ws in patched.wrappers[WrappersMP.APPLY_MODEL].values() for w in ws).provider


def layout_measurements(model, cond, size, device, dtype, clock, repeats=2, warmup=1):
    """Three choices the implementation rests on, measured on this model and device."""
    import comfy.ldm.modules.attention as attn
    import comfy.model_management
    from comfyui_likeness.core.layout import attention_layout
    from bench_attention_layout import layouts
    from common import median_times

    comfy.model_management.load_models_gpu([model])
    base = model.model
    lat = size // 8
    g = torch.Generator().manual_seed(0)
    x3 = torch.randn(3, 4, lat, lat, generator=g).to(device)
    ctx = cond[0][0].to(device).repeat(3, 1, 1)
    sig = torch.full((3,), 2.0, device=device)
    adm = base.encode_adm(**cond[0][1], device=device) if cond[0][1].get("pooled_output") is not None else None
    extra = {} if adm is None else {"y": adm.to(device).repeat(3, 1)}
    with torch.inference_mode():
        batch = median_times({
            "batch_3": lambda: base.apply_model(x3, sig, c_crossattn=ctx, **extra),
            "batch_2_plus_1": lambda: (base.apply_model(x3[:2], sig[:2], c_crossattn=ctx[:2], **{k: v[:2] for k, v in extra.items()}),
                                       base.apply_model(x3[2:], sig[2:], c_crossattn=ctx[2:], **{k: v[2:] for k, v in extra.items()})),
        }, repeats=repeats, warmup=warmup, clock=clock)
        site = attention_layout(model).sites[0]
        tokens = site.tokens(lat, lat)
        q = torch.randn(2, tokens, site.inner_dim, generator=g).to(device, dtype)
        kv = torch.randn(2, tokens, site.inner_dim, generator=g).to(device, dtype)
        r = torch.randn(1, tokens, site.inner_dim, generator=g).to(device, dtype)
        h = site.heads
        kernel = attn.optimized_attention
        kernel_name = getattr(kernel, "__name__", str(kernel))
        fns = layouts(kernel, q, kv, r, h)
        shapes = median_times({"broadcast_reference": fns["broadcast"], "contiguous_reference": fns["contiguous"],
                               "two_calls": fns["two_calls"], "one_batched_call": fns["one_call"]},
                              repeats=repeats, clock=clock)
    return {
        "same_batch_vs_separate_reference_pass_seconds": {**batch,
                                                          "saving_of_same_batch": 1 - batch["batch_3"] / batch["batch_2_plus_1"]},
        "host_attention_kernel": kernel_name,
        f"reference_layout_at_{site.name}_{tokens}_tokens_seconds": {
            **shapes, "contiguous_saves": 1 - shapes["contiguous_reference"] / shapes["broadcast_reference"],
            "one_batched_call_saves": 1 - shapes["one_batched_call"] / shapes["two_calls"]},
    }


def features_memory() -> dict:
    """INV_FEATURES per step (fp16, one photo) of the real UNets at their reference sizes (layouts of the host's
    classes on the meta device), and what the storage choice (the default 4 GB budget) keeps of 50 steps."""
    from comfyui_likeness.attention.inv_adapter import DEFAULT_MEMORY_GB, feature_bytes_per_point, stored_points
    from comfyui_likeness.core.layout import attention_layout
    import full_models as fm

    out = {}
    for family, sizes in (("sd15", (512,)), ("sd2_768", (768,)), ("sdxl", (768, 1024))):
        layout = attention_layout(fm.MetaPatcher(family))
        for size in sizes:
            lat = (size // 8, size // 8)
            both = feature_bytes_per_point(layout, ("attn1", "attn2"), 1, lat)
            self_only = feature_bytes_per_point(layout, ("attn1",), 1, lat)
            out[f"{family}_{size}px"] = {
                "blocks": len(layout.sites), "bytes_per_step_both_sides": both, "bytes_per_step_self_only": self_only,
                "MiB_per_step_both_sides": both / 2**20, "GiB_50_steps_both_sides": 50 * both / 2**30,
                "GiB_50_steps_self_only": 50 * self_only / 2**30,
                f"stored_of_50_steps_within_{DEFAULT_MEMORY_GB:g}_GB": {
                    "per-step features": len(stored_points(50, both, DEFAULT_MEMORY_GB)),
                    "self-attention features": len(stored_points(50, self_only, DEFAULT_MEMORY_GB))},
            }
    return out


def run_architecture(arch: str, comfy, base_dir):
    import comfy.model_management
    import nodes
    from comfyui_likeness.attention.inv_adapter import apply_inv_adapter, extract_inv_features, prepare_reference_image
    from comfyui_likeness.core.layout import attention_layout
    from comfyui_likeness.encoders.embedded_attention_adapter import EAASpec, EmbeddedAttentionAdapter
    from comfyui_likeness.weights.eaa import load_eaa, save_eaa
    import full_models as fm

    device, dtype = fm.bench_device()
    full = arch != "standin"
    size = int(os.environ.get("LIKENESS_BENCH_SIZE", 0)) or (fm.native_size(arch) if full else 256)
    steps = int(os.environ.get("LIKENESS_BENCH_STEPS", 0)) or (2 if full and device.type == "cpu" else 6)
    rounds = int(os.environ.get("LIKENESS_BENCH_ROUNDS", 0)) or 3
    say(f"{arch}: {size}px, {steps} steps, {rounds} rounds on {device} ({dtype})")
    if full:
        model, vae = fm.full_model(arch, dtype=dtype), fm.full_vae(arch, dtype=dtype)
        pos, neg = fm.random_conditioning(arch, 1, size, size), fm.random_conditioning(arch, 2, size, size)
        caption = fm.random_conditioning(arch, 3, size, size)
        described = f"full {arch} UNet ({fm.parameter_count(model) / 1e6:.1f} M parameters, random weights of the real config)"
    else:
        model, clip, vae = standin_checkpoint(comfy, base_dir)
        enc = lambda t: nodes.CLIPTextEncode().encode(clip, t)[0]  # noqa: E731
        caption, pos, neg = enc("a photo of a face"), enc("a photo of a person in a garden"), enc("blurry")
        described = "stand-in SD1.5 checkpoint (320-channel one-level UNet, random weights)"
    clock = Clock(device)
    latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    image = fm.face_image(size)
    layout = attention_layout(model)
    spec = EAASpec.for_layout(layout, (size // 8, size // 8), s_c=256 if full else 64)
    adapter_path = os.path.join(tempfile.mkdtemp(), "eaa.safetensors")
    save_eaa(adapter_path, EmbeddedAttentionAdapter(spec, dtype=torch.float32, device="cpu").init_random(0, 0.5), "random")
    adapter = load_eaa(adapter_path)
    outputs = {}

    def ksampler(m, name=None):
        out = nodes.KSampler().sample(m, SEED, steps, CFG, "euler", "ddim_uniform", pos, neg, latent)[0]["samples"]
        if name:
            outputs[name] = out
        return out

    state = {"layout": None, "live": None}
    counter = EvalCounter()  # UNet rows through the host's model_function_wrapper, in every mode
    model = model.clone()
    model.set_model_unet_function_wrapper(counter)
    providers = []

    def apply(feats, **kw):
        patched = apply_inv_adapter(model, feats, **kw)
        providers.append(provider_of(patched))
        return patched

    def extract(store="all"):
        return extract_inv_features(model, vae, image, caption, steps, "ddim_uniform", size, store=store, memory_gb=0)

    with torch.inference_mode():
        say("extracting features")
        cached = extract("all")
        limit = limit_model(model, cached, dtype, device)
        limit_eaa = limit_model(model, cached, dtype, device, adapter=adapter)
        pixels = prepare_reference_image(image, size)
        grid, y = cached.sigmas, cached.y

        def extraction_floor():
            raw = vae.encode(pixels)
            comfy.model_management.load_models_gpu([model])
            x = model.model.process_latent_in(raw).to(device)
            ctx = cached.caption.to(device)
            extra = {} if y is None else {"y": y.to(device)}
            # the grid the inversion walks (ddim_uniform gives steps + 1 points at some step counts):
            # (x_0, s_1), (x_1, s_1), ..., (x_T, s_T), one evaluation per point
            for i in range(len(grid)):
                model.model.apply_model(x, grid[max(i, 1)].reshape(1).to(device), c_crossattn=ctx, **extra)
            counter.rows += len(grid)

        def first_image_limit():
            extraction_floor()
            return ksampler(limit)

        fns = {
            "host": lambda: ksampler(model, "host"),
            "limit": lambda: ksampler(limit),
            "reuse": lambda: ksampler(apply(cached), "exact"),
            "limit_eaa": lambda: ksampler(limit_eaa),
            "reuse_eaa": lambda: ksampler(apply(cached, adapter=adapter)),
            "fast": lambda: ksampler(apply(cached, speed="fast"), "fast"),
            "reuse_live": lambda: ksampler(apply(state["live"])),
            "first_image": lambda: ksampler(apply(extract("all"))),
            "first_image_limit": first_image_limit,
            "extract": lambda: extract("all"),
            "extract_floor": extraction_floor,
        }
        if full and device.type == "cpu":
            del fns["reuse_live"]  # +1 batch-1 pass per step: measured on the stand-in, too slow here
        chosen = [m for m in os.environ.get("LIKENESS_BENCH_MODES", "").split(",") if m]
        if chosen:
            fns = {k: fn for k, fn in fns.items() if k in chosen or k == "host"}
        state["live"] = extract("none") if "reuse_live" in fns else None
        peaks, rows = {}, {}

        @contextlib.contextmanager
        def observe(mode, r):
            if r:
                yield
                return
            counter.rows, start = 0, len(providers)
            with PeakMemory(device) as p:
                yield
            peaks[mode] = p.peak_bytes / 2**20
            live_rows = sum(pr.live_passes for pr in providers[start:]) * cached.photos
            rows[mode] = (counter.rows + live_rows) / steps


        def finish(timing):
            result = summarise(arch, timing, outputs, rows, peaks, cached, size, steps, rounds, device,
                               dtype, clock, described, state["layout"])
            write_result("inv_adapter" if arch == "standin" else f"inv_adapter_{arch}", result)
            return result

        say("warm-up")
        ksampler(model)
        timing = alternate(fns, "host", rounds, clock, warmup=False, log=say, observe=observe,
                           on_round=lambda partial: finish(partial))
        say("layout measurements")
        state["layout"] = layout_measurements(model, pos, size, device, dtype, clock)
        result = finish(timing)
    del model, vae, adapter, limit, limit_eaa, cached, state
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    return result


LIMIT_OF = {"reuse": "limit", "reuse_eaa": "limit_eaa", "first_image": "first_image_limit",
            "extract": "extract_floor"}


def time_over_limits(med: dict) -> dict:
    """Each measured mode's median time over its limit's; with extract, reuse and both their limits measured, the
    first image by parts too, and whether the whole first-image limit is the sum of its two parts."""
    within = {k: med[k] / med[lim] for k, lim in LIMIT_OF.items() if k in med and lim in med}
    if all(k in med for k in ("extract", "reuse", "extract_floor", "limit")):
        within["first_image_by_parts"] = (med["extract"] + med["reuse"]) / (med["extract_floor"] + med["limit"])
    if all(k in med for k in ("first_image_limit", "extract_floor", "limit")):
        within["first_image_limit_over_its_parts"] = med["first_image_limit"] / (med["extract_floor"] + med["limit"])
    return within


def summarise(arch, timing, outputs, rows, peaks, cached, size, steps, rounds, device, dtype, clock,
              described, layout_numbers) -> dict:
    med = {k: v["median"] for k, v in timing["seconds"].items()}
    ratio = timing["ratio"]
    per_call = steps  # one batched cond + uncond model call per step
    get = lambda d, k: d[k]["median"] if k in d else None  # noqa: E731
    within = time_over_limits(med)
    deviation = {}
    if "fast" in outputs and "exact" in outputs:
        deviation = {
            "relative_to_the_exact_output": float((outputs["fast"] - outputs["exact"]).norm() / outputs["exact"].norm()),
            "relative_to_the_identity_effect": float((outputs["fast"] - outputs["exact"]).norm()
                                                     / (outputs["exact"] - outputs["host"]).norm()),
            "note": "final latents, same seed, random weights; 'identity effect' = |exact - host|",
        }
    rules = {
        "reuse_within_5_percent_of_limit": ("reuse", within, TARGETS["reuse_within_limit"]),
        "reuse_eaa_within_5_percent_of_limit": ("reuse_eaa", within, TARGETS["reuse_within_limit"]),
        "first_image_within_5_percent_of_limit": ("first_image", within, TARGETS["first_image_within_limit"]),
        "first_image_by_parts_within_5_percent_of_limit": ("first_image_by_parts", within,
                                                           TARGETS["first_image_within_limit"]),
        "extraction_within_5_percent_of_its_floor": ("extract", within, TARGETS["first_image_within_limit"]),
        "fast_mode_at_most_1.15x": ("fast", {k: get(ratio, k) for k in ratio}, TARGETS["fast_mode"]),
        "reuse_at_most_1.3x": ("reuse", {k: get(ratio, k) for k in ratio}, TARGETS["reuse_vs_host"]),
        "reuse_eaa_at_most_1.3x": ("reuse_eaa", {k: get(ratio, k) for k in ratio}, TARGETS["reuse_vs_host"]),
        "first_image_at_most_2.0x": ("first_image", {k: get(ratio, k) for k in ratio},
                                             TARGETS["first_image_vs_host"]),
    }
    checks = {name: values[mode] <= target for name, (mode, values, target) in rules.items() if mode in values}
    added = {k: {"over_host": (med[k] - med["host"]) / per_call, "over_limit": (med[k] - med[lim]) / per_call}
             for k, lim in (("reuse", "limit"), ("reuse_eaa", "limit_eaa"), ("fast", "limit"), ("reuse_live", "limit"))
             if k in med and lim in med}
    return {
        "what": "Inv-Adapter vs the host's KSampler: same model, steps, sampler (euler), scheduler (ddim_uniform), "
                f"CFG {CFG}, one image; extraction with the same steps; every mode alternated with host in each round",
        "model": described, "architecture": arch, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "clock": clock.kind, "image": f"{size}x{size}", "reference": f"{size}x{size}", "steps": steps,
        "rounds": f"{len(timing['raw']['host'])} of {rounds}", "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
        "torch": torch.__version__,
        "seconds": timing["seconds"],
        "ratio_to_host": ratio,
        "limits": {k: ratio[v] for k, v in LIMIT_OF.items() if v in ratio},
        "time_over_its_limit": within,
        "unet_rows_per_step": rows,
        "added_seconds_per_model_call": added,
        "peak_memory_MiB_first_round": peaks,
        "fast_mode_deviation": deviation,
        "inv_features_memory": {"here": {"per_step_features_bytes": cached.nbytes(),
                                         "trajectory_only_bytes": replace(cached, features=None).nbytes(),
                                         "feature_bytes_per_step": cached.feature_bytes_per_step()},
                                "real_models_fp16": features_memory()},
        "layout_measurements": layout_numbers,
        "targets": TARGETS, "checks": checks, "misses": [k for k, ok in checks.items() if not ok],
    }


def main(argv):
    torch.set_num_threads(threads())
    chosen = argv or [a for a in os.environ.get("LIKENESS_BENCH_MODELS", DEFAULT_ARCHITECTURES).split(",") if a]
    unknown = [a for a in chosen if a not in ARCHITECTURES]
    if unknown:
        raise SystemExit(f"unknown architecture {unknown}; choose from {', '.join(ARCHITECTURES)}")
    comfy, base = boot_host()
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    for arch in chosen:
        run_architecture(arch, comfy, base)


if __name__ == "__main__":
    main(sys.argv[1:])
