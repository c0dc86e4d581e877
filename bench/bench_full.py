"""Fusion Sampling, PhotoVerse Apply and Taming Encoder Apply on the full architectures, against the host's KSampler
on the same model, in one process (Inv-Adapter and PromptNet have their own full-size benches: bench_inv_adapter.py
sd15|sdxl, bench_promptnet.py full_size).

Families (arguments, default sd15 sd2): sd15 (the 859.5 M SD1.5 UNet at 512 x 512), sd2 (SD2-base at 512 x 512),
sdxl (the 2.57 B SDXL UNet at 1024 x 1024: bench/sdxl_cpu.sh on a CPU), sd2_768. Random weights of the real
configurations (bench/full_models.py); random adapters with the real shapes; conditioning with the family's real
widths (SDXL: pooled output and size keys).
Modes, each one KSampler-like run of `steps` steps, euler / ddim_uniform, CFG 7:
  host          KSampler on the plain model
  fusion_m0     KSampler (Fusion), m = 0 (refinement only)                    target <= 1.6x (3 conditions vs 2)
  fusion_m1     KSampler (Fusion), m = 1 with refinement                      target <= 2.6x (5 conditions vs 2)
  photoverse    PhotoVerse Apply (alpha 1, gamma_T 1, sigma_V 1, 5 visual tokens) + KSampler   target <= 1.10x
  taming        Taming Encoder Apply (16 object tokens) + KSampler             target <= 1.10x
  profusion     (sd2 only: ProFusion published PromptNet for SD2-base) PromptNet Concept + KSampler (Fusion) m = 1
                with refinement: S* recomputed by a full-size random PromptNet and the prompt re-encoded by the full
                text encoder at every evaluation                               target <= 3.05x (its floor + 5 %)
Reported per mode: median and range of the time and of its ratio to host in the same round, UNet rows per step,
added time per step over host, peak memory above the model's own. A missed target is written in the result.
Device: CUDA in fp16 when present, else the CPU in fp32 (LIKENESS_BENCH_DEVICE, LIKENESS_BENCH_DTYPE). Knobs:
LIKENESS_BENCH_STEPS (CPU default 2), LIKENESS_BENCH_ROUNDS (3), LIKENESS_BENCH_SIZE, LIKENESS_BENCH_THREADS (1),
LIKENESS_BENCH_MODES (comma-separated; default: every mode of the family, for sd2 fusion_m1 and profusion; host
always runs).
Run: .host/venv/bin/python bench/bench_full.py [sd15] [sd2] [sdxl]  -> bench/results/full_<family>.json
"""
import os
import platform
import sys
import tempfile
import time

import torch

from common import Clock, EvalCounter, PeakMemory, alternate, boot_host, threads, write_result

CFG, SEED = 7.0, 1
# profusion: 5 UNet rows, 2 PromptNet calls and 2 text encodings per step against 2 rows; the operation counts
# (bench_promptnet.py flops) put that floor at 2.90x on SD2-base at 512 px.
TARGETS = {"fusion_m0": 1.6, "fusion_m1": 2.6, "photoverse": 1.10, "taming": 1.10, "profusion": 3.05}
PROMPTNET_FAMILIES = ("sd2",)
# sd2's other modes cost what they cost on SD1.5 (the same UNet layout); its default is ProFusion against
# Fusion Sampling alone, which is PromptNet's share.
DEFAULT_MODES = {"sd2": ("fusion_m1", "profusion")}
VISION = {"sd15": (1024, 24), "sd2": (1280, 32), "sd2_768": (1280, 32), "sdxl": (1280, 32)}   # the CLIP tower each family's adapters use


def say(msg):
    print(f"[bench_full {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def photoverse_model(model, family):
    """PhotoVerse Apply's model with a random adapter of the real shapes (the paper's MLPs, rank-8 LoRA, K^S/V^S)."""
    from comfyui_likeness.attention.photoverse import apply_photoverse
    from comfyui_likeness.concepts.photoverse_concept import make_concept
    from comfyui_likeness.weights.photoverse import load_photoverse, write_random_photoverse
    import full_models as fm

    width, layers = VISION[family]
    text_widths = fm.text_widths(family)
    path = os.path.join(tempfile.mkdtemp(), "photoverse_bench.safetensors")
    write_random_photoverse(path, model, {"width": width, "layers": layers, "image_size": 224, "patch": 14}, seed=1,
                            scale=0.5, text_widths=text_widths)
    loaded = load_photoverse(path)
    g = torch.Generator().manual_seed(0)
    context = loaded.spec.context_dim
    concept = make_concept({w: torch.randn(1, 1, w, generator=g) * 0.02 for w in text_widths},
                           torch.randn(5, context, generator=g), torch.randn(5, context, generator=g), loaded)
    return apply_photoverse(model, loaded, concept), loaded.spec.parameter_count()


def taming_model(model, family):
    """Taming Encoder Apply's model with a random adapter (16 queries, depth 2) and random CLIP-vision tokens."""
    from comfyui_likeness.attention.taming import apply_taming_encoder
    from comfyui_likeness.encoders.taming_encoder import VisionSpec
    from comfyui_likeness.encoders.taming_object import ObjectEmbedding
    from comfyui_likeness.weights.taming_file import load_taming, write_random_taming

    width, layers = VISION[family]
    vision = VisionSpec(hidden_size=width, tokens=257, layers=layers, image_size=224)
    path = os.path.join(tempfile.mkdtemp(), "taming_bench.safetensors")
    write_random_taming(path, model, vision, queries=16, depth=2, seed=3, scale=0.5, gate=0.5)
    features = torch.randn(1, vision.tokens, vision.hidden_size, generator=torch.Generator().manual_seed(0))
    embedding = ObjectEmbedding(features=features, vision=vision, subject=torch.zeros(1, 64, 64, 3))
    return apply_taming_encoder(model, load_taming(path), embedding, 1.0)


def profusion_inputs(model, family, dtype):
    """PromptNet Concept's source with a random full-size PromptNet (ProFusion's construction, ViT-H tokens of one
    photo, its reference latent) and the likeness prompt through the family's full text encoder.
    Returns (source, negative, fused, concept, context)."""
    import full_models as fm
    from common import profusion_prompt

    g = torch.Generator().manual_seed(6)
    side = fm.native_size(family) // 8
    return profusion_prompt(model, fm.full_clip(family, dtype), fm.full_promptnet(family, dtype=dtype),
                            torch.randn(1, 257, fm.VIT_H_WIDTH, generator=g), torch.randn(1, 4, side, side, generator=g),
                            {"unet_config": fm.host_unet_config(family), "vision_width": fm.VIT_H_WIDTH})


def run_family(family: str) -> dict:
    import comfy.utils
    import nodes
    from comfyui_likeness.samplers.ksampler_fusion import ksampler_fusion
    from comfyui_likeness.samplers.sigmas import schedule_sigmas
    import full_models as fm

    comfy.utils.PROGRESS_BAR_ENABLED = False
    device, dtype = fm.bench_device()
    size = int(os.environ.get("LIKENESS_BENCH_SIZE", 0)) or fm.native_size(family)
    steps = int(os.environ.get("LIKENESS_BENCH_STEPS", 0)) or (2 if device.type == "cpu" else 10)
    rounds = int(os.environ.get("LIKENESS_BENCH_ROUNDS", 0)) or 3
    say(f"{family}: {size}px, {steps} steps, {rounds} rounds on {device} ({dtype})")
    counter = EvalCounter()
    model = fm.full_model(family, dtype=dtype)
    model.set_model_unet_function_wrapper(counter)
    cond = lambda seed: fm.random_conditioning(family, seed, size, size)  # noqa: E731
    neg, concept, fused, context = cond(1), cond(2), cond(3), cond(4)
    latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]
    chosen = [m for m in os.environ.get("LIKENESS_BENCH_MODES", "").split(",") if m] or DEFAULT_MODES.get(family)
    wanted = lambda mode: not chosen or mode in chosen  # noqa: E731
    photoverse, photoverse_parameters = photoverse_model(model, family) if wanted("photoverse") else (None, 0)
    taming = taming_model(model, family) if wanted("taming") else None

    def ksampler(m):
        return nodes.KSampler().sample(m, SEED, steps, CFG, "euler", "ddim_uniform", concept, neg, latent)

    def fusion(m_steps, conds=(neg, fused, concept, context)):
        return lambda: ksampler_fusion(model, SEED, steps, "euler", "ddim_uniform", *conds, latent, 1.0, 7.0, 7.0, 5.0,
                                       m_steps, 1.0, True, 0.0, 1.0)

    fns = {"host": lambda: ksampler(model), "fusion_m0": fusion(0), "fusion_m1": fusion(1),
           "photoverse": lambda: ksampler(photoverse), "taming": lambda: ksampler(taming)}
    promptnet = None
    if family in PROMPTNET_FAMILIES and wanted("profusion"):
        promptnet, *conds = profusion_inputs(model, family, dtype)
        fns["profusion"] = fusion(1, tuple(conds))
    unknown = [m for m in chosen or () if m not in fns]
    if unknown:
        raise SystemExit(f"LIKENESS_BENCH_MODES: no mode {unknown} for {family}; choose from {', '.join(fns)}")
    if chosen:
        fns = {k: f for k, f in fns.items() if k == "host" or k in chosen}
    n_steps = len(schedule_sigmas(model, "ddim_uniform", steps)) - 1
    rows, peaks, promptnet_calls = {}, {}, {}

    def observe(mode, r):
        import contextlib

        @contextlib.contextmanager
        def watch():
            start, calls = counter.rows, promptnet.calls if promptnet else 0
            with PeakMemory(device) as p:
                yield
            if r == 0:
                rows[mode] = (counter.rows - start) / n_steps
                peaks[mode] = p.peak_bytes / 2**20
                if promptnet and promptnet.calls > calls:
                    promptnet_calls[mode] = (promptnet.calls - calls) / n_steps
        return watch()

    adapters = {"photoverse": f"random, real shapes ({photoverse_parameters / 1e6:.1f} M parameters), 5 visual "
                              "tokens, LoRA rank 8",
                "taming": "random, 16 object tokens, resampler depth 2",
                "profusion": "random full-size PromptNet of ProFusion's construction "
                             f"({sum(p.numel() for p in promptnet.patcher.model.parameters()) / 1e6:.1f} M parameters, "
                             "ViT-H tokens of one photo), random full text encoder" if promptnet else None}
    clock = Clock(device)
    with torch.inference_mode():
        measured = alternate(fns, "host", rounds, clock, log=say, observe=observe)
    host = measured["seconds"]["host"]["median"]
    per_step = {k: (measured["seconds"][k]["median"] - host) / n_steps for k in fns if k != "host"}
    result = {
        "what": "each mode against the host's KSampler on the same full-size model, alternated in one process",
        "model": f"full {family} UNet ({fm.parameter_count(model) / 1e6:.1f} M parameters, random weights of the real "
                 "config, bench/full_models.py)",
        "adapters": {k: v for k, v in adapters.items() if k in fns},
        "size": f"{size}x{size}", "steps": n_steps, "rounds": rounds, "clock": clock.kind,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "seconds": measured["seconds"], "ratio": measured["ratio"],
        "unet_rows_per_step": rows, "promptnet_calls_per_step": promptnet_calls,
        "added_seconds_per_step_over_host": per_step,
        "peak_MiB_above_start_first_round": peaks,
    }
    targets = {k: v for k, v in TARGETS.items() if k in fns}
    result["targets"] = targets
    result["meets_targets"] = {k: measured["ratio"][k]["median"] <= v for k, v in targets.items()}
    result["misses"] = [f"{k}: {measured['ratio'][k]['median']:.2f}x > {v}x" for k, v in targets.items()
                        if not result["meets_targets"][k]]
    return result


def main(families):
    torch.set_num_threads(threads())
    boot_host()
    for family in families:
        write_result(f"full_{family}", run_family(family))


if __name__ == "__main__":
    main(sys.argv[1:] or ["sd15", "sd2"])
