"""KSampler on a Taming-Encoder-applied model against the host's KSampler on the plain model, in one run.

Target (issue 6): at most 1.10x. Also measured: UNet evaluations per step (the adapter adds none), the Apply
node's own time (projection of the object tokens, once per Apply), and one Taming Encode through the host's
CLIPVisionLoader on the full-size ViT-L/14 stand-in (a one-off cost, like CLIPVisionEncode for IP-Adapter).
Models: the stand-in SD1.5 checkpoint (320-channel one-level UNet, random weights) and a random Taming Encoder
file (16 object tokens, resampler depth 4, ViT-L/14 width), CPU.
Run: .host/venv/bin/python bench/bench_taming.py   -> bench/results/taming.json

--sdxl: the same comparison on the SDXL stand-in checkpoint (result: taming_sdxl.json in the results folder;
not measured yet: the shared CPU was too loaded for a stable ratio)
--train: one Taming Encoder training step on the same stand-in checkpoint (UNet loaded in float32), whole UNet
(the default) against the adapter only: the training state held between steps (weights + AdamW moments, counted
from the live tensors), the gradients, the step's peak allocation on top (the CPU profiler, as bench_train), and
the step time, checked against the 16-bytes-per-trained-parameter rule docs/training.md uses for full-size models.
    .host/venv/bin/python bench/bench_taming.py --train   -> bench/results/taming_train.json
"""
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from common import EvalCounter, boot_host, median_times, standin_checkpoint, write_result

STEPS = 4
REPEATS = 3
SIZES = (256, 512)
SDXL_SIZES = (256,)
TARGET = 1.10
log = logging.getLogger("bench_taming")


def ksampler_ratios(model, clip, adapter, embedding, sizes_px) -> dict:
    """Per image size: the host's KSampler on the plain model and on the Taming-applied one (median times,
    round-robin), their ratio, and UNet rows per step."""
    import nodes
    from comfyui_likeness.attention.taming import apply_taming_encoder

    enc = lambda t: nodes.CLIPTextEncode().encode(clip, t)[0]  # noqa: E731
    pos, neg = enc("a photo of a cat wearing a wizard hat"), enc("blurry")
    sizes = {}
    with torch.inference_mode():
        patched = apply_taming_encoder(model, adapter, embedding, 0.8)
        for size in sizes_px:
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
    return sizes


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

    with torch.inference_mode():
        apply_times = median_times({"apply": lambda: apply_taming_encoder(model, adapter, embedding, 0.8)},
                                   repeats=5)
    sizes = ksampler_ratios(model, clip, adapter, embedding, SIZES)
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


def sdxl_main():
    """The same comparison on the SDXL stand-in checkpoint (CheckpointLoaderSimple: SDXL UNet layout at 320
    channels with transformer depths 2 and 10, full-size CLIP-L + bigG text encoders) with a random SDXL Taming
    file for ViT-H/14 features (16 tokens, resampler depth 4 at 1280 wide, the 2048-wide context)."""
    logging.basicConfig(level=logging.INFO)
    comfy, base = boot_host()
    import nodes
    from comfyui_likeness.encoders.taming_encoder import VisionSpec
    from comfyui_likeness.encoders.taming_object import ObjectEmbedding
    from comfyui_likeness.weights.taming_file import load_taming, write_random_taming
    from standin_checkpoint import build_standin_checkpoint

    name = "likeness_standin_sdxl.safetensors"
    build_standin_checkpoint(comfy, os.path.join(base, "models", "checkpoints", name), family="sdxl")
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(name)
    vision = VisionSpec(1280, 257, 32)
    path = os.path.join(base, "models", "likeness", "taming_bench_sdxl.safetensors")
    write_random_taming(path, model, vision, queries=16, depth=4, seed=3, scale=0.5, gate=0.5)
    adapter = load_taming(path)
    # ViT-H/14-shaped features (the tower's cost is Taming Encode's, measured on SD1.5 above, not sampling's)
    embedding = ObjectEmbedding(torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(0)), vision)
    sizes = ksampler_ratios(model, clip, adapter, embedding, SDXL_SIZES)
    worst = max(v["ratio"] for v in sizes.values())
    write_result("taming_sdxl", {
        "what": "KSampler on a Taming-Encoder-applied SDXL model vs the host's KSampler on the plain model (same "
                "steps, sampler euler, scheduler normal, cfg 7)",
        "model": "stand-in SDXL checkpoint (SDXL UNet layout, 320 channels, transformer depths 2/10, 31 attention "
                 "blocks, random weights), CPU",
        "adapter": "random Taming Encoder file: 16 object tokens, resampler depth 4 (1280 wide), ViT-H/14 features, "
                   f"{adapter.module.spec.parameter_count()} parameters",
        "steps": STEPS, "repeats": f"median of {REPEATS}, round-robin",
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "sizes": sizes, "target_ratio": TARGET, "worst_ratio": worst, "meets_target": worst <= TARGET,
    })


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def train_step_memory(mode: str, comfy, base_dir, clip_vision, records, general, repeats=2) -> dict:
    """One AdamW step of the Taming trainer in `mode` (whole_unet | adapter_only) on a fresh stand-in model."""
    import nodes
    from bench_train import peak_memory
    from comfyui_likeness.train.base_models import BaseModels
    from comfyui_likeness.train.config import TrainConfig
    from comfyui_likeness.train.data import collate
    from comfyui_likeness.train.diffusion import gradients_on
    from comfyui_likeness.train.loop import make_optimizer
    from comfyui_likeness.train.taming import TamingTrainer

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("likeness_standin_sd15.safetensors")
    base = BaseModels(model, clip, vae, clip_vision, "stand-in SD1.5")
    config = TrainConfig(output_dir=tempfile.mkdtemp(prefix="likeness_bench_taming_"), resolution=128)
    options = {"queries": 16, "depth": 4, "face_backend": "none", "general_data": general,
               "train_unet": mode == "whole_unet"}
    trainer = TamingTrainer(base, options, records, config)
    trainer.setup()
    trainer.enter_training()
    optimizer, _ = make_optimizer(trainer, config)
    ds = trainer.dataset()
    batch = collate([ds[i] for i in range(2)])
    noise = torch.Generator().manual_seed(0)
    params = [p for p in trainer.module.parameters() if p.requires_grad]
    times, grads = [], [0]

    def step():
        trainer.before_step()
        prepared = trainer.prepare_batch(batch, noise)
        out = trainer.module(prepared)
        out["loss"].backward()
        grads[0] = tensor_bytes(p.grad for p in params)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        with gradients_on():
            step()  # warm-up: AdamW allocates its moments here
            for _ in range(repeats):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            peak = peak_memory(step)
        moments = tensor_bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
        weights = tensor_bytes(params)
        trained = sum(p.numel() for p in params)
        return {"trainable_parameters": trained, "unet_parameters": sum(p.numel() for p in
                                                                        model.model.diffusion_model.parameters()),
                "weights_mib": weights / 2 ** 20, "adamw_moments_mib": moments / 2 ** 20,
                "gradients_mib": grads[0] / 2 ** 20,
                "bytes_per_trained_parameter": (weights + moments + grads[0]) / trained,
                "step_peak_mib_over_state": peak, "step_seconds": statistics.median(times)}
    finally:
        trainer.close()


def train_main():
    logging.basicConfig(level=logging.INFO)
    comfy, base = boot_host()
    import nodes
    from comfyui_likeness.train.data import scan_images
    from standin_clip_vision import build_standin_clip_vision
    from standin_checkpoint import build_standin_checkpoint

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "support"))
    from fixtures_train import write_folder

    build_standin_checkpoint(comfy, os.path.join(base, "models", "checkpoints", "likeness_standin_sd15.safetensors"))
    cv_name = "likeness_standin_vit_l14.safetensors"
    build_standin_clip_vision(comfy, os.path.join(base, "models", "clip_vision", cv_name))
    clip_vision = nodes.CLIPVisionLoader().load_clip(cv_name)[0]
    tmp = tempfile.mkdtemp(prefix="likeness_bench_taming_data_")
    records = scan_images(write_folder(os.path.join(tmp, "domain"), ("a", "b"), per=2, size=(160, 144)))
    general = write_folder(os.path.join(tmp, "general"), ("scenery",), per=2, size=(160, 144))
    modes = {mode: train_step_memory(mode, comfy, base, clip_vision, records, general)
             for mode in ("whole_unet", "adapter_only")}
    write_result("taming_train", {
        "what": "one Taming Encoder training step (CLIP-vision features, VAE latents, captions, forward, backward, "
                "AdamW), whole UNet (default) vs adapter only; state = fp32 weights + AdamW moments held between "
                "steps, gradients during the step; the peak is the step's allocation on top (CPU profiler)",
        "model": "stand-in SD1.5 checkpoint (320-channel one-level UNet loaded in float32, CLIP-L, TAESD) + stand-in "
                 "ViT-L/14, random weights; Taming adapter: 16 queries, resampler depth 4, fixed null embedding",
        "device": f"cpu ({torch.get_num_threads()} threads)", "machine": platform.processor() or platform.machine(),
        "resolution": 128, "batch": 2, "modes": modes,
        "rule": "16 bytes per trained parameter (4 weight + 4 gradient + 8 AdamW moments), used for full-size models "
                "in docs/training.md",
    })


if __name__ == "__main__":
    if "--train" in sys.argv:
        train_main()
    elif "--sdxl" in sys.argv:
        sdxl_main()
    else:
        main()
