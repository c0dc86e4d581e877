"""KSampler (Fusion) against the host's KSampler: wall-time ratio and UNet evaluations per step, in one run.

Targets (issue 2): m = 1 with refinement at most 2.6x, m = 0 at most 1.6x; the evaluation-count ratios are
2.5 (2 fusion + 3 refinement conditions against cond + uncond) and 1.5.
Families: sd15 (the stand-in SD1.5 checkpoint) and sdxl (the stand-in SDXL checkpoint: SDXL's detection layout at
320 channels, its two full-size text encoders, pooled output and size conditioning in every condition).
Run: .host/venv/bin/python bench/bench_fusion.py [sd15] [sdxl]   -> bench/results/fusion.json (sdxl: fusion_sdxl.json)
"""
import platform
import sys

import torch

from common import EvalCounter, boot_host, median_times, standin_checkpoint, write_result

STEPS, SIZE = 6, 128


def main(family="sd15", comfy=None, base=None):
    import nodes
    from comfyui_likeness.samplers.ksampler_fusion import ksampler_fusion

    model, clip, _ = standin_checkpoint(comfy, base, family)
    enc = lambda t: nodes.CLIPTextEncode().encode(clip, t)[0]  # noqa: E731
    neg, concept, fused, context = enc(""), enc("a photo of a red apple"), enc("a photo of an apple"), enc("a photo of a fruit")
    latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]

    def host():
        return nodes.KSampler().sample(model, 1, STEPS, 7.0, "euler", "ddim_uniform", concept, neg, latent)

    def fusion(m):
        return lambda: ksampler_fusion(model, 1, STEPS, "euler", "ddim_uniform", neg, fused, concept, context, latent,
                                       1.0, 7.0, 7.0, 5.0, m, 1.0, True, 0.0, 1.0)

    from comfyui_likeness.samplers.sigmas import schedule_sigmas

    n_steps = len(schedule_sigmas(model, "ddim_uniform", STEPS)) - 1  # ddim_uniform may add a step

    def evals_per_step(fn):
        counter = EvalCounter()
        patched = model.clone()
        patched.set_model_unet_function_wrapper(counter)
        if fn is host:
            nodes.KSampler().sample(patched, 1, STEPS, 7.0, "euler", "ddim_uniform", concept, neg, latent)
        else:
            ksampler_fusion(patched, 1, STEPS, "euler", "ddim_uniform", neg, fused, concept, context, latent,
                            1.0, 7.0, 7.0, 5.0, fn, 1.0, True, 0.0, 1.0)
        return counter.rows / n_steps, counter.calls / n_steps

    with torch.inference_mode():
        t = median_times({"host": host, "m1": fusion(1), "m0": fusion(0)})
        t_host, t_m1, t_m0 = t["host"], t["m1"], t["m0"]
        e_host, c_host = evals_per_step(host)
        e_m1, c_m1 = evals_per_step(1)
        e_m0, c_m0 = evals_per_step(0)

    result = {
        "what": "KSampler (Fusion) vs host KSampler, same model, steps, sampler (euler), scheduler (ddim_uniform)",
        "model": {"sd15": "stand-in SD1.5 checkpoint (320-channel one-level UNet, random weights), CPU",
                  "sdxl": "stand-in SDXL checkpoint (SDXL's 3 levels at 320 channels, depth 2/10 input transformers, "
                          "full CLIP-L + bigG text encoders, random weights), CPU"}[family],
        "latent": f"{SIZE // 8}x{SIZE // 8}", "steps": n_steps, "repeats": "median of 5, round-robin", "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "seconds": {"host_ksampler": t_host, "fusion_m1_refine": t_m1, "fusion_m0": t_m0},
        "evaluations_per_step": {"host_ksampler": e_host, "fusion_m1_refine": e_m1, "fusion_m0": e_m0},
        "model_calls_per_step": {"host_ksampler": c_host, "fusion_m1_refine": c_m1, "fusion_m0": c_m0},
        "ratio": {"fusion_m1_refine": t_m1 / t_host, "fusion_m0": t_m0 / t_host,
                  "evaluations_m1_refine": e_m1 / e_host, "evaluations_m0": e_m0 / e_host},
        "targets": {"fusion_m1_refine": 2.6, "fusion_m0": 1.6},
    }
    result["meets_targets"] = {k: result["ratio"][k] <= v for k, v in result["targets"].items()}
    write_result("fusion" if family == "sd15" else f"fusion_{family}", result)


if __name__ == "__main__":
    comfy_dir, base_dir = boot_host()
    for name in sys.argv[1:] or ["sd15"]:
        main(name, comfy_dir, base_dir)
