"""Step time and peak memory of every trainer against a plain UNet forward + backward on the same model.

Model: the stand-in SD1.5 checkpoint loaded with the host's CheckpointLoaderSimple (320-channel one-level UNet,
full CLIP-L text encoder, TAESD) and the stand-in ViT-L/14 CLIP vision (CLIPVisionLoader), random weights.
A trainer step is everything the loop does per step: the no-gradient part (VAE latents, CLIP-vision features,
inversion lookups, reference branch) + forward + backward + AdamW step. Two references on the same batch:
  unet_full    eps-MSE through BaseModel.apply_model, backward into every UNet parameter (full fine-tuning)
  unet_frozen  the same with the UNet frozen, backward to the input only (the least an adapter can cost)
Memory: the peak tensor memory a step allocates on top of the model and optimizer state it starts with
(activations, gradients, temporaries): torch.cuda.max_memory_allocated on a GPU, the profiler's allocation
events on the CPU. Run: .host/venv/bin/python bench/bench_train.py  -> bench/results/train.json
"""
import os
import platform
import statistics
import tempfile
import time

import torch

from common import boot_host, standin_checkpoint, write_result

RES, BATCH, REPEATS, THREADS = 128, 2, 3, 1


def peak_memory(step) -> float:
    """Peak of the tensor memory the step allocates on top of what exists before it (activations, gradients,
    temporaries), in MiB: torch.cuda.max_memory_allocated on a GPU; on the CPU the profiler's allocation and
    release events replayed in time order."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - start) / 2 ** 20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []
    for e in prof.events():
        delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if delta:
            events.append((e.time_range.start, delta))
    current = peak = 0
    for _, delta in sorted(events):
        current += delta
        peak = max(peak, current)
    return peak / 2 ** 20


def measure_all(steps: dict, repeats=REPEATS) -> dict:
    """Median time of every step function, measured round-robin so background load hits all of them alike, and
    each one's peak memory (one more run)."""
    for fn in steps.values():
        fn()  # warm-up (optimizer states, caches)
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            t = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - t)
    return {k: {"seconds": statistics.median(times[k]), "peak_mb": peak_memory(fn)} for k, fn in steps.items()}


def write_data(root):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "support"))
    from fixtures_train import write_folder
    return write_folder(root, ("a", "b"), per=2, size=(160, 144))


def main():
    torch.set_num_threads(THREADS)  # steadier timings on a shared machine
    comfy_dir, base_dir = boot_host()
    import nodes
    from comfyui_likeness.train.base_models import BaseModels
    from comfyui_likeness.train.config import TrainConfig
    from comfyui_likeness.train.data import collate, scan_images
    from comfyui_likeness.train.diffusion import (add_noise, denoise, encode_images, eps_from_denoised, eps_loss,
                                                  gradients_on, sample_timesteps, sigmas_for)
    from comfyui_likeness.train.inv_adapter import InvAdapterTrainer
    from comfyui_likeness.train.photoverse import PhotoVerseTrainer
    from comfyui_likeness.train.profusion import PromptNetFineTuner, PromptNetPretrainer, make_views, new_promptnet
    from comfyui_likeness.train.taming import TamingTrainer
    from standin_clip_vision import build_standin_clip_vision

    model, clip, vae = standin_checkpoint(comfy_dir, base_dir)
    cv_name = "likeness_standin_vit_l14.safetensors"
    build_standin_clip_vision(comfy_dir, os.path.join(base_dir, "models", "clip_vision", cv_name))
    clip_vision = nodes.CLIPVisionLoader().load_clip(cv_name)[0]
    base = BaseModels(model, clip, vae, clip_vision, "stand-in SD1.5")
    tmp = tempfile.mkdtemp(prefix="likeness_bench_train_")
    records = scan_images(write_data(os.path.join(tmp, "data")))
    config = TrainConfig(output_dir=os.path.join(tmp, "run"), resolution=RES)
    torch.manual_seed(0)
    results, baselines = {}, {}

    with gradients_on():
        # --- the references: the UNet alone on the same batch -----------------------------------------------
        images = torch.rand(BATCH, RES, RES, 3)
        context = nodes.CLIPTextEncode().encode(clip, "a photo of a person")[0][0][0].expand(BATCH, -1, -1).clone()
        g = torch.Generator().manual_seed(0)
        x0 = encode_images(vae, model, images)
        unet = model.model.diffusion_model
        import comfy.model_management
        comfy.model_management.load_models_gpu([model], force_full_load=True)

        def plain(train_all):
            def step():
                comfy.model_management.load_models_gpu([model], force_full_load=True)  # as a trainer's before_step
                t = sample_timesteps(BATCH, g)
                sigma = sigmas_for(model, t)
                noise = torch.randn(x0.shape, generator=g)
                x_t = add_noise(model, x0, sigma, noise).requires_grad_(not train_all)
                loss = eps_loss(eps_from_denoised(x_t, sigma, denoise(model, x_t, sigma, context)), noise)
                loss.backward()
                unet.zero_grad(set_to_none=True)
            return step

        def frozen_unet(train_all):
            def step():
                unet.requires_grad_(train_all)
                plain(train_all)()
                unet.requires_grad_(False)
            return step

        flags = [p.requires_grad for p in unet.parameters()]
        unet.requires_grad_(False)
        steps = {"unet_full": frozen_unet(True), "unet_frozen": frozen_unet(False)}

        # --- the trainers -----------------------------------------------------------------------------------
        kps = torch.tensor([[48.0, 52.0], [80.0, 52.0], [64.0, 70.0], [52.0, 88.0], [76.0, 88.0]])

        def arcface():
            from comfyui_likeness.faces.arcface import ArcFace
            from comfyui_likeness.faces.iresnet import IResNet
            return ArcFace(IResNet().eval(), torch.full((3,), 2.0), torch.full((3,), -1.0), "random r50")

        net = new_promptnet(model, clip_vision, 768, RES // 8, 32)
        views = make_views(torch.rand(200, 160, 3), 7, RES, 0)
        makers = {
            "promptnet_pretrain": lambda: PromptNetPretrainer(base, {"region_channels": 32}, records, RES),
            "promptnet_finetune": lambda: PromptNetFineTuner(base, net, {"unet_config": net.unet_config,
                                                                         "vision_width": net.vision_width}, views),
            "inv_adapter": lambda: InvAdapterTrainer(base, {"reference_size": RES, "s_c": 64, "inversion_steps": 10,
                                                            "face_backend": "none"}, records, config),
            "taming": lambda: TamingTrainer(base, {"queries": 16, "depth": 4, "face_backend": "none", "train_unet": False,
                                                   "domain_only": True}, records, config),   # adapter only, as measured
            "photoverse": lambda: PhotoVerseTrainer(base, {"face_backend": "none", "face_fraction": 0.5}, records,
                                                    config, arcface=arcface()),
        }
        trainers, prepare_times = {}, {}

        def trainer_step(name, trainer):
            ds = trainer.dataset()
            batch = collate([ds[i] for i in range(BATCH)])
            if name == "photoverse":
                batch["image_kps"] = kps.expand(BATCH, 5, 2).clone()
            opt = torch.optim.AdamW([p for p in trainer.module.parameters() if p.requires_grad], lr=1e-6)
            noise = torch.Generator().manual_seed(1)
            trainer.prepare_batch(batch, noise)  # one-time work (inversion trajectories) before timing

            def step():
                trainer.before_step()
                t = time.perf_counter()
                prepared = trainer.prepare_batch(batch, noise)
                prepare_times.setdefault(name, []).append(time.perf_counter() - t)
                out = trainer.module(prepared)
                out["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        for name, make in makers.items():
            trainer = make()
            trainer.setup()
            trainer.enter_training()
            trainers[name] = trainer
            steps[name] = trainer_step(name, trainer)
        measured = measure_all(steps)
        for name in reversed(list(trainers)):
            trainers[name].close()
        for p, f in zip(unet.parameters(), flags):
            p.requires_grad_(f)
        baselines = {k: measured[k] for k in ("unet_full", "unet_frozen")}
        baselines["unet_full"]["trainable_parameters"] = sum(p.numel() for p in unet.parameters())
        results = {k: {**measured[k], "no_grad_part_seconds": statistics.median(prepare_times[k]),
                       "trainable_parameters": trainers[k].trainable_count()} for k in trainers}

    for r in results.values():
        r["time_vs_unet_full"] = r["seconds"] / baselines["unet_full"]["seconds"]
        r["time_vs_unet_frozen"] = r["seconds"] / baselines["unet_frozen"]["seconds"]
        r["memory_vs_unet_full"] = r["peak_mb"] / max(1e-9, baselines["unet_full"]["peak_mb"])
    write_result("train", {
        "what": "one training step of each trainer (no-grad encodings + forward + backward + AdamW) vs the UNet "
                "alone, forward + backward, on the same batch",
        "model": "stand-in SD1.5 checkpoint (CheckpointLoaderSimple: 320-channel one-level UNet, CLIP-L, TAESD) + "
                 "stand-in ViT-L/14 CLIP vision, random weights",
        "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
        "machine": platform.machine(), "resolution": RES, "batch": BATCH, "repeats": REPEATS,
        "memory": "peak tensor memory allocated by one step on top of weights and optimizer state (MiB; "
                  + ("torch.cuda.max_memory_allocated)" if torch.cuda.is_available() else "CPU profiler events)"),
        "baselines": baselines, "trainers": results,
        "notes": ["the stand-in UNet is small next to its full CLIP-L and ViT-L, so encoders weigh more here than "
                  "with a real SD1.5 UNet (860 M parameters); see docs/training.md for GPU estimates",
                  "no_grad_part_seconds: the part of the step without gradients (VAE latents, CLIP-vision features, "
                  "caption encodings, the reference branch), included in seconds",
                  "inv_adapter: trajectories are computed once per image before timing (cached, as in training); "
                  "its step includes the reference-branch UNet pass",
                  "photoverse: L_face on half the batch through a random IResNet-50 ArcFace and the TAESD decoder"],
    })


if __name__ == "__main__":
    main()
