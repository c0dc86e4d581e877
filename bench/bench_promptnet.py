"""ProFusion's cost and PromptNet's latent resize, measured in one process.

flops       Operations per call counted on the meta device for SD1.x, SD2.x and SDXL: UNet, PromptNet, text encoders.
full_size   PromptNet at its real size (the SD2-base PromptNet ProFusion published: SD2's encoder half, ViT-H tokens,
            64x64 latent) against the full SD2-base UNet and the full OpenCLIP-H text encoder, random weights, fp32,
            CPU time, each alternated with the others (median and range). From these: the lower bound of
            ProFusion's time against the host's KSampler at m = 1 with refinement, (5 u + 2 p + 2 e) / (2 u)
            with u a batch-1 UNet evaluation, p a PromptNet call and e a text encoding, at 512 px and at 384 px
            (the UNet shrinks with the image, PromptNet does not: it always runs at its 64x64 latent).
resize      What fitting another latent size to PromptNet's 64x64 does to S*, with the same full-size PromptNet:
            the white-noise gain k of the resize, and S* from (a) the old input (bilinear resize, told sigma) and
            (b) the current one (area / linear resize, told k * sigma) against S* of the same image content at
            64x64 with noise k * sigma (the state PromptNet was trained on), in units of S*'s own spread over noise
            draws. Random weights: the numbers say how far each input is from PromptNet's training distribution,
            not how identity changes.
standin     ProFusion end to end (PromptNet Concept + KSampler (Fusion)) against the host's KSampler on the stand-in
            SD1.5 checkpoint, with UNet evaluations, PromptNet calls and text encodings per step.
Run: .host/venv/bin/python bench/bench_promptnet.py [full_size|resize|standin ...]  -> bench/results/promptnet.json
"""
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common import boot_host, median_times, result_path, standin_checkpoint, write_result
import full_models as fm

REPEATS = int(os.environ.get("LIKENESS_BENCH_REPEATS", "5"))
STEPS, STANDIN_SIZE = 6, 128


def count(module):
    return sum(p.numel() for p in module.parameters())


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def full_unet():
    """The SD2-base UNet through the host's BaseModel (apply_model: c_in, timestep, the model's own call)."""
    return fm.full_model("sd2", dtype=torch.float32, device=torch.device("cpu")).model


def alternate(calls: dict, cpu: dict, wall: dict):
    with torch.inference_mode():
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(REPEATS):
            for k, fn in calls.items():
                w, c = timed(fn)
                wall.setdefault(k, []).append(w)
                cpu.setdefault(k, []).append(c)


def measure_full_size():
    """Two phases, to stay under 4 GB on a shared machine: the UNet alternated with PromptNet (its body sharing
    the UNet's encoder-half weights), then - the UNet freed - the text encoder alternated with a stand-alone
    PromptNet; the text encoding's share of a UNet evaluation is the product of the two measured ratios.
    Returns (result, the stand-alone PromptNet, for the resize measurement)."""
    import gc

    unet = full_unet()
    g = torch.Generator().manual_seed(3)
    context = torch.randn(1, 77, 1024, generator=g)
    tokens = torch.randn(1, 257, fm.VIT_H_WIDTH, generator=g)
    ms = unet.model_sampling
    sigma = ms.sigmas[500].reshape(1)
    t = ms.timestep(sigma).float()
    x = {n: torch.randn(1, 4, n, n, generator=g) for n in (64, 48)}
    x2 = torch.randn(2, 4, 64, 64, generator=g)
    cpu, wall = {}, {}
    net = fm.full_promptnet("sd2", share_with=unet.diffusion_model)
    params = {"promptnet": count(net), "unet": count(unet.diffusion_model)}
    alternate({
        "unet_512px_batch1": lambda: unet.apply_model(x[64], sigma, c_crossattn=context),
        "unet_512px_batch2": lambda: unet.apply_model(x2, sigma.repeat(2), c_crossattn=context.repeat(2, 1, 1)),
        "unet_384px_batch1": lambda: unet.apply_model(x[48], sigma, c_crossattn=context),
        "promptnet_call": lambda: net(x[64], x[64], t, tokens),
    }, cpu, wall)
    del net, unet
    gc.collect()
    net = fm.full_promptnet("sd2")
    clip = fm.full_clip("sd2", torch.float32)
    params["text_encoder"] = count(clip.cond_stage_model)
    prompt = clip.tokenize("a holder is wearing a superman costume")
    phase2, wall2 = {}, {}
    alternate({"promptnet_call": lambda: net(x[64], x[64], t, tokens),
               "text_encoding": lambda: clip.encode_from_tokens(prompt)}, phase2, wall2)
    del clip
    gc.collect()
    med = {k: statistics.median(v) for k, v in cpu.items()}
    u512, u384, p = med["unet_512px_batch1"], med["unet_384px_batch1"], med["promptnet_call"]
    e = p * statistics.median(phase2["text_encoding"]) / statistics.median(phase2["promptnet_call"])
    bound = lambda u: (5 * u + 2 * p + 2 * e) / (2 * u)  # noqa: E731
    return {
        "what": "per-call CPU time at full size (SD2-base configs), random weights, fp32, batch 1 unless named; "
                "phase 1 alternates the UNet and PromptNet in one process, phase 2 PromptNet and the text encoder",
        "parameters": params,
        "cpu_seconds": {k: summary(v) for k, v in cpu.items()},
        "cpu_seconds_phase2": {k: summary(v) for k, v in phase2.items()},
        "wall_seconds": {k: summary(v) for k, v in {**wall, **{f"phase2_{k}": v for k, v in wall2.items()}}.items()},
        "torch_threads": torch.get_num_threads(), "repeats": REPEATS, "machine": platform.machine(),
        "per_unet_evaluation_512px": {"promptnet_call": p / u512, "text_encoding": e / u512,
                                      "batch2_over_2x_batch1": med["unet_512px_batch2"] / (2 * u512)},
        "per_unet_evaluation_384px": {"promptnet_call": p / u384, "text_encoding": e / u384},
        "profusion_lower_bound_vs_ksampler": {"512px": bound(u512), "384px": bound(u384),
                                              "formula": "(5 u + 2 p + 2 e) / (2 u), m = 1 with refinement"},
    }, net


def measure_flops():
    """Floating-point operations per call, counted on the meta device (no memory, no timing noise): the UNet
    at 512 and 384 px, PromptNet, and the text encoders (SD1.x CLIP-L, SD2.x OpenCLIP-H, SDXL CLIP-L + bigG)."""
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from torch.utils.flop_counter import FlopCounterMode

    from comfyui_likeness.encoders.promptnet import PromptNet

    def flops(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    saved = attention.optimized_attention
    attention.optimized_attention = attention.attention_basic   # plain matmuls, which the counter sees
    meta = {"device": "meta"}
    out = {}
    try:
        for family in ("sd15", "sd2", "sdxl"):
            config, widths, side = fm.host_unet_config(family), fm.text_widths(family), fm.native_size(family) // 8
            text_cls = getattr(comfy.supported_models, fm.FAMILIES[family][0])
            unet = UNetModel(**config, operations=comfy.ops.manual_cast, **meta)
            extra = {"y": torch.zeros(1, 2816, **meta)} if family == "sdxl" else {}
            ctx = torch.zeros(1, 77, config["context_dim"], **meta)
            run = lambda n: flops(lambda: unet(torch.zeros(1, 4, n, n, **meta), torch.zeros(1, **meta), context=ctx, **extra))  # noqa: E731
            u_full, u_small = run(side), run(side * 3 // 4)
            net = PromptNet(config, fm.VIT_H_WIDTH, widths, latent_size=side, region_channels=128, **meta)
            p = flops(lambda: net(torch.zeros(1, 4, side, side, **meta), torch.zeros(1, 4, side, side, **meta),
                                  torch.zeros(1, **meta), torch.zeros(1, 257, fm.VIT_H_WIDTH, **meta), **extra))
            text = text_cls({**config, "in_channels": 4}).clip_target().clip(
                dtype=torch.float32, model_options={"custom_operations": comfy.ops.disable_weight_init}, **meta)
            e = 0
            for encoder in [m for m in text.modules() if hasattr(m, "transformer") and hasattr(m, "num_layers")]:
                width = encoder.transformer.get_input_embeddings().weight.shape[-1]
                e += flops(lambda: encoder.transformer(None, embeds=torch.zeros(1, 77, width, **meta), num_tokens=[77],
                                                       intermediate_output=-2))
            out[family] = {"pixels": 8 * side, "unet_gflop": u_full / 1e9, f"unet_gflop_{6 * side}px": u_small / 1e9,
                           "promptnet_gflop": p / 1e9, "text_encoding_gflop": e / 1e9,
                           "promptnet_per_unet": p / u_full, f"promptnet_per_unet_{6 * side}px": p / u_small,
                           "text_encoding_per_unet": e / u_full,
                           "promptnet_parameters": count(net), "unet_parameters": count(unet)}
    finally:
        attention.optimized_attention = saved
    return {"what": "GFLOP per batch-1 call, counted by torch.utils.flop_counter on the meta device; SD1.x/SD2 at "
                    "512 px (and 384), SDXL at 1024 px (and 768), PromptNet at the model's native latent",
            "families": out}


def smooth_latent(size, seed):
    """A clean latent-like field: coarse random structure, unit variance per channel."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 4, 8, 8, generator=g)
    x = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)


def measure_resize(net=None):
    import comfy.model_sampling
    import comfy.supported_models
    from comfyui_likeness.encoders.promptnet import fit_latent

    net = net if net is not None else fm.full_promptnet("sd2")
    config = comfy.supported_models.SD20(fm.unet_config("sd2"))

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    ms = Sampling(config)
    g = torch.Generator().manual_seed(5)
    reference = smooth_latent(64, 99)
    tokens = torch.randn(1, 257, fm.VIT_H_WIDTH, generator=g)

    def s_star(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(1)
        with torch.inference_mode():
            return net(reference, ms.calculate_input(sigma, x), ms.timestep(sigma).float(), tokens)[0, 0]

    out = {}
    for t_index in (300, 700):
        sigma = float(ms.sigmas[t_index])
        for size in (48, 96, 128):
            x0 = smooth_latent(size, size)
            eps = torch.randn(1, 4, size, size, generator=g)
            x_t = x0 + sigma * eps
            fitted, gain = fit_latent(x_t, 64)
            old = F.interpolate(x_t, size=(64, 64), mode="bilinear", align_corners=False)
            old_gain = float(F.interpolate(eps, size=(64, 64), mode="bilinear", align_corners=False).std())
            x0_64 = fit_latent(x0, 64)[0]
            draws = torch.stack([s_star(x0_64 + gain * sigma * torch.randn(1, 4, 64, 64, generator=g), gain * sigma)
                                 for _ in range(4)])
            centre = draws.mean(0)
            spread = float((draws - centre).norm(dim=-1).mean())
            s_old, s_new = s_star(old, sigma), s_star(fitted, gain * sigma)
            out[f"t{t_index}_latent{size}"] = {
                "pixels": 8 * size, "sigma": sigma, "noise_gain_area_or_linear": gain, "noise_gain_old_bilinear": old_gain,
                "distance_to_64px_state_in_spreads": {"old_bilinear_told_sigma": float((s_old - centre).norm()) / spread,
                                                      "current_told_k_sigma": float((s_new - centre).norm()) / spread},
                "old_vs_current_relative": float((s_old - s_new).norm() / s_new.norm()),
            }
    return {"what": "S* of a resized latent against S* of the same content at 64x64 with noise k*sigma; full-size "
                    "SD2-base PromptNet, random weights; distances in units of the mean distance of 4 noise draws "
                    "from their mean (1 = as close as another noise draw)", "cases": out}


def standin_promptnet():
    """A random PromptNet on the stand-in SD1.5 checkpoint's one-level layout (scripts/standin_checkpoint.py)."""
    from comfyui_likeness.encoders.promptnet import PromptNet
    from standin_checkpoint import FAMILIES

    config = {**fm.host_unet_config("sd15"), **FAMILIES["sd15"]}
    net = PromptNet(config, 1024, 768, latent_size=8, region_channels=32)
    fm.fill_random(net, 4)
    with torch.no_grad():
        net.head.weight.mul_(0.1)
    return net.eval(), config


def measure_standin(comfy_dir, base):
    import nodes
    from comfyui_likeness.samplers.ksampler_fusion import ksampler_fusion
    from comfyui_likeness.samplers.sigmas import schedule_sigmas
    from common import Clock, EvalCounter, profusion_prompt

    model, clip, _ = standin_checkpoint(comfy_dir, base)
    net, config = standin_promptnet()
    g = torch.Generator().manual_seed(1)
    source, neg, fused, concept_cond, context = profusion_prompt(
        model, clip, net, torch.randn(1, 257, 1024, generator=g), torch.randn(1, 4, 16, 16, generator=g),
        {"unet_config": config, "vision_width": 1024})
    plain = nodes.CLIPTextEncode().encode(clip, "a person is wearing a superman costume")[0]
    latent = nodes.EmptyLatentImage().generate(STANDIN_SIZE, STANDIN_SIZE, 1)[0]
    n_steps = len(schedule_sigmas(model, "ddim_uniform", STEPS)) - 1

    def host(m=model):
        return nodes.KSampler().sample(m, 1, STEPS, 7.0, "euler", "ddim_uniform", plain, neg, latent)

    def profusion(m=model):
        return ksampler_fusion(m, 1, STEPS, "euler", "ddim_uniform", neg, fused, concept_cond, context, latent, 1.0,
                               7.0, 7.0, 5.0, 1, 1.0, True, 0.0, 1.0)

    def counts(fn):
        counter = EvalCounter()
        patched = model.clone()
        patched.set_model_unet_function_wrapper(counter)
        before = source.calls
        fn(patched)
        return counter.rows / n_steps, (source.calls - before) / n_steps

    with torch.inference_mode():
        clock = Clock(torch.device("cpu"))
        t = median_times({"host": host, "profusion": profusion}, repeats=3, clock=clock)
        e_host, _ = counts(host)
        e_pf, pn_calls = counts(profusion)
    return {
        "what": "ProFusion (PromptNet concept, KSampler (Fusion) m=1 + refinement) vs host CFG KSampler",
        "model": "stand-in SD1.5 checkpoint (one-level 19 M UNet, random weights) + random PromptNet on its layout, CPU",
        "latent": f"{STANDIN_SIZE // 8}x{STANDIN_SIZE // 8}", "steps": n_steps, "clock": clock.kind,
        "seconds": {"host_ksampler": t["host"], "profusion": t["profusion"]},
        "per_step": {"host_unet_evaluations": e_host, "profusion_unet_evaluations": e_pf,
                     "promptnet_calls": pn_calls, "text_encodings": pn_calls},
        "ratio": {"time": t["profusion"] / t["host"], "unet_evaluations": e_pf / e_host},
        "note": ("on the stand-in the UNet is a one-level 19 M network, so PromptNet's calls and the 123 M text "
                 "encoder weigh far more than they do at full size; the full_size section gives the real proportions"),
    }


def main(parts):
    path = result_path("promptnet")  # parts not rerun are kept
    result = json.load(open(path)) if os.path.exists(path) else {}
    result = {k: v for k, v in result.items() if k in ("flops", "full_size", "resize", "standin")}
    comfy_dir, base = boot_host()
    torch.set_num_threads(int(os.environ.get("LIKENESS_BENCH_THREADS", "1")))
    net = None
    if "flops" in parts:
        result["flops"] = measure_flops()
    if "full_size" in parts:
        result["full_size"], net = measure_full_size()
    if "resize" in parts:
        result["resize"] = measure_resize(net)
    del net
    if "standin" in parts:
        result["standin"] = measure_standin(comfy_dir, base)
    write_result("promptnet", result)


if __name__ == "__main__":
    main(sys.argv[1:] or ["flops", "full_size", "resize", "standin"])
