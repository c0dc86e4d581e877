"""KSampler on a Taming-Encoder-applied model against the host's KSampler on the plain model, in one run.

Target (issue 6): at most 1.10x. Also measured: UNet evaluations per step (the adapter adds none), the Apply
node's own time (projection of the object tokens, once per Apply), and one Taming Encode through the host's
CLIPVisionLoader on the full-size ViT-L/14 stand-in (a one-off cost, like CLIPVisionEncode for IP-Adapter).
Models: the stand-in SD1.5 checkpoint (320-channel one-level UNet, random weights) and a random Taming Encoder
file (16 object tokens, resampler depth 4, ViT-L/14 width), CPU.
Run: .host/venv/bin/python bench/bench_taming.py   -> bench/results/taming.json
"""
import logging
import os
import platform
import time

import torch

from common import EvalCounter, boot_host, median_times, standin_checkpoint, write_result

STEPS = 4
REPEATS = 3
SIZES = (256, 512)
TARGET = 1.10
log = logging.getLogger("bench_taming")


def main():
    logging.basicConfig(level=logging.INFO)
    comfy, base = boot_host()
    import nodes
    from comfyui_likeness.attention.taming import apply_taming_encoder
    from comfyui_likeness.encoders.taming_encoder import VisionSpec
    from comfyui_likeness.encoders.taming_object import encode_object
    from comfyui_likeness.weights.taming_file import load_taming, write_random_taming
    from standin_clip_vision import build_standin_clip_vision

    model, clip, _ = standin_checkpoint(comfy, base)
    adapter_path = os.path.join(base, "models", "likeness", "taming_bench.safetensors")
    write_random_taming(adapter_path, model, VisionSpec(1024, 257, 24), queries=16, depth=4, seed=3, scale=0.5,
                        gate=0.5)
    adapter = load_taming(adapter_path)

    cv_name = "likeness_standin_vit_l14.safetensors"
    build_standin_clip_vision(comfy, os.path.join(base, "models", "clip_vision", cv_name))
    clip_vision = nodes.CLIPVisionLoader().load_clip(cv_name)[0]
    from skimage import data

    photo = torch.from_numpy(data.chelsea()).float()[None] / 255.0
    mask = torch.zeros(photo.shape[:3])
    mask[:, 20:280, 30:370] = 1.0
    with torch.inference_mode():
        encode_object(clip_vision, photo, mask)  # warm-up (first load of the tower)
        t = time.perf_counter()
        embedding = encode_object(clip_vision, photo, mask)
        encode_seconds = time.perf_counter() - t

    enc = lambda t: nodes.CLIPTextEncode().encode(clip, t)[0]  # noqa: E731
    pos, neg = enc("a photo of a cat wearing a wizard hat"), enc("blurry")

    with torch.inference_mode():
        apply_times = median_times({"apply": lambda: apply_taming_encoder(model, adapter, embedding, 0.8)},
                                   repeats=5)
        patched = apply_taming_encoder(model, adapter, embedding, 0.8)
        sizes = {}
        for size in SIZES:
            latent = nodes.EmptyLatentImage().generate(size, size, 1)[0]

            def run(m, latent=latent):
                return nodes.KSampler().sample(m, 1, STEPS, 7.0, "euler", "normal", pos, neg, latent)

            log.info("timing %dx%d", size, size)
            times = median_times({"host": lambda: run(model), "taming": lambda: run(patched)}, repeats=REPEATS)
            evals = {}
            for name, m in (("host", model), ("taming", patched)):
                counter = EvalCounter()
                counted = m.clone()
                counted.set_model_unet_function_wrapper(counter)
                run(counted)
                evals[name] = counter.rows / STEPS
            sizes[f"{size}x{size}"] = {
                "latent": f"{size // 8}x{size // 8}",
                "seconds": {"host_ksampler": times["host"], "taming_ksampler": times["taming"]},
                "ratio": times["taming"] / times["host"],
                "evaluations_per_step": evals,
            }

    worst = max(v["ratio"] for v in sizes.values())
    result = {
        "what": "KSampler on a Taming-Encoder-applied model vs the host's KSampler on the plain model "
                "(same steps, sampler euler, scheduler normal, cfg 7)",
        "model": "stand-in SD1.5 checkpoint (320-channel one-level UNet, random weights), CPU",
        "adapter": "random Taming Encoder file: 16 object tokens, resampler depth 4, ViT-L/14 features",
        "steps": STEPS, "repeats": f"median of {REPEATS}, round-robin",
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "sizes": sizes,
        "apply_node_seconds": apply_times["apply"],
        "encode_seconds_standin_vit_l14": encode_seconds,
        "target_ratio": TARGET,
        "worst_ratio": worst,
        "meets_target": worst <= TARGET,
    }
    write_result("taming", result)


if __name__ == "__main__":
    main()
