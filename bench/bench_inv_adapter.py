"""Inv-Adapter against the host's KSampler at the same steps, in one run.

Measures (stand-in SD1.5 checkpoint on this machine, median of round-robin repeats):
  first image  = Inv-Adapter Extract (per-step features) + Apply + KSampler, over the host's KSampler alone
  reuse        = Apply + KSampler with features already extracted, over the host's KSampler
  and the same for 'trajectory only' features (live reference branch) and for trained mode (an EAA file with
  random weights, self + cross side); the size of INV_FEATURES (here and, computed from the SD1.5 layout, at
  512x512); and what running the reference branch in the same UNet batch as the generation would save over a
  separate pass (batch 3 against batch 2 + batch 1), which decided the live mode's design.
Targets (issue 4): first image <= 2.0x, reuse <= 1.3x.
Run: .host/venv/bin/python bench/bench_inv_adapter.py   -> bench/results/inv_adapter.json
(LIKENESS_BENCH_SIZE: image and reference size, default 256; LIKENESS_BENCH_THREADS: torch threads, default 1)
"""
import os
import platform
import sys
import tempfile

import torch

from common import EvalCounter, boot_host, median_times, standin_checkpoint, write_result

STEPS, SIZE, REPEATS = 6, int(os.environ.get("LIKENESS_BENCH_SIZE", 256)), 3
# One thread: on a shared CPU, two contending BLAS threads make every call several times slower and noisier.
THREADS = int(os.environ.get("LIKENESS_BENCH_THREADS", 1))
TARGETS = {"first_image": 2.0, "reuse": 1.3}


def sd15_feature_bytes(steps_list=(1, 30, 50)) -> dict:
    """INV_FEATURES per-step size for real SD1.5 at a 512x512 reference, from the layout of an SD1.5 UNet built
    on the meta device (no weights): 2 sites x tokens x width per block, fp16."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as oam
    import comfy.model_patcher
    import comfy.ops
    from comfyui_likeness.core.layout import attention_layout

    unet = oam.UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2] * 4,
                         channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                         transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                         num_heads=8, context_dim=768, use_spatial_transformer=True, legacy=False, device="meta",
                         operations=comfy.ops.disable_weight_init)

    class Holder:
        def get_model_object(self, name):
            return unet

        model = type("M", (), {"model_config": None, "model_type": None})()

    layout = attention_layout(Holder())
    per_step = sum(2 * s.tokens(64, 64) * s.query_dim * 2 for s in layout.sites)
    return {"blocks": len(layout.sites), "bytes_per_step": per_step,
            **{f"MiB_{n}_steps": per_step * n / 2**20 for n in steps_list}}


def main():
    torch.set_num_threads(THREADS)
    comfy, base = boot_host()
    import nodes
    from comfyui_likeness.attention.inv_adapter import apply_inv_adapter, extract_inv_features
    from comfyui_likeness.weights.eaa import load_eaa, write_random_eaa
    from fixtures_inv_adapter import face_image

    model, clip, vae = standin_checkpoint(comfy, base)
    enc = lambda t: nodes.CLIPTextEncode().encode(clip, t)[0]  # noqa: E731
    caption, pos, neg = enc("a photo of a face"), enc("a photo of a person in a garden"), enc("blurry")
    latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    image = face_image(160, 144)
    eaa_path = write_random_eaa(os.path.join(tempfile.mkdtemp(), "eaa.safetensors"), model, reference_size=SIZE,
                                s_c=64, scale=0.5)
    adapter = load_eaa(eaa_path)

    def ksampler(m):
        return nodes.KSampler().sample(m, 1, STEPS, 7.0, "euler", "ddim_uniform", pos, neg, latent)

    def extract(cache=True):
        return extract_inv_features(model, vae, image, caption, STEPS, "ddim_uniform", SIZE, cache_features=cache)

    with torch.inference_mode():
        cached, live = extract(True), extract(False)
        fns = {
            "host_ksampler": lambda: ksampler(model),
            "extract_per_step": lambda: extract(True),
            "extract_trajectory": lambda: extract(False),
            "first_image": lambda: ksampler(apply_inv_adapter(model, extract(True))),
            "reuse": lambda: ksampler(apply_inv_adapter(model, cached)),
            "first_image_live": lambda: ksampler(apply_inv_adapter(model, extract(False))),
            "reuse_live": lambda: ksampler(apply_inv_adapter(model, live)),
            "reuse_trained_eaa": lambda: ksampler(apply_inv_adapter(model, cached, adapter=adapter)),
        }
        t = median_times(fns, repeats=REPEATS)

        # Same batch vs separate pass for the live reference branch: one UNet call of 3 rows against 2 + 1.
        import comfy.model_management
        comfy.model_management.load_models_gpu([model])
        base_model = model.model
        x3 = torch.randn(3, 4, SIZE // 8, SIZE // 8)
        ctx3 = pos[0][0].repeat(3, 1, 1)
        sig = torch.full((3,), 2.0)
        batch = median_times({
            "batch_3": lambda: base_model.apply_model(x3, sig, c_crossattn=ctx3),
            "batch_2_plus_1": lambda: (base_model.apply_model(x3[:2], sig[:2], c_crossattn=ctx3[:2]),
                                       base_model.apply_model(x3[2:], sig[2:], c_crossattn=ctx3[2:])),
        }, repeats=5)

    # UNet rows per image (hardware-independent): the host's model_function_wrapper counts sampler and inversion
    # calls; live reference passes are counted by the provider.
    def unet_rows(cache, reuse):
        counter = EvalCounter()
        counted = model.clone()
        counted.set_model_unet_function_wrapper(counter)
        with torch.inference_mode():
            feats = (cached if cache else live) if reuse else extract_inv_features(
                counted, vae, image, caption, STEPS, "ddim_uniform", SIZE, cache_features=cache)
            patched = apply_inv_adapter(counted, feats)
            ksampler(patched)
        from comfy.patcher_extension import WrappersMP
        provider = next(w for ws in patched.wrappers[WrappersMP.APPLY_MODEL].values() for w in ws).provider
        return counter.rows + provider.live_passes

    host_counter = EvalCounter()
    counted_host = model.clone()
    counted_host.set_model_unet_function_wrapper(host_counter)
    with torch.inference_mode():
        ksampler(counted_host)
    rows = {"host_ksampler": host_counter.rows, "first_image": unet_rows(True, False), "reuse": unet_rows(True, True),
            "first_image_live": unet_rows(False, False), "reuse_live": unet_rows(False, True)}

    host = t["host_ksampler"]
    ratios = {k: t[k] / host for k in ("first_image", "reuse", "first_image_live", "reuse_live", "reuse_trained_eaa")}
    result = {
        "what": "Inv-Adapter (training-free unless noted) vs the host's KSampler, same model, steps, sampler (euler), "
                "scheduler (ddim_uniform), CFG 7; extraction with the same steps",
        "model": "stand-in SD1.5 checkpoint (320-channel one-level UNet, random weights), CPU",
        "latent": f"{SIZE // 8}x{SIZE // 8}", "reference": f"{SIZE}x{SIZE}", "steps": STEPS,
        "repeats": f"median of {REPEATS}, round-robin", "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "seconds": t,
        "ratio_to_host_ksampler": ratios,
        "unet_rows_per_image": rows,
        "unet_rows_ratio": {k: v / rows["host_ksampler"] for k, v in rows.items() if k != "host_ksampler"},
        "targets": TARGETS,
        "meets_targets": {"first_image": ratios["first_image"] <= TARGETS["first_image"],
                          "reuse": ratios["reuse"] <= TARGETS["reuse"]},
        "inv_features_memory": {
            "per_step_features_bytes_here": cached.nbytes(),
            "trajectory_only_bytes_here": live.nbytes(),
            "feature_bytes_per_step_here": cached.feature_bytes_per_step(),
            "sd15_512x512_fp16": sd15_feature_bytes(),
        },
        "same_batch_vs_separate_reference_pass_seconds": {
            **batch, "saving_of_same_batch": 1.0 - batch["batch_3"] / batch["batch_2_plus_1"]},
    }
    write_result("inv_adapter", result)


if __name__ == "__main__":
    main()
