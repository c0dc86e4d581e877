"""What stacking in either order costs (docs/stacking.md), in one run.

1. KSampler on the stand-in SD1.5 checkpoint with the Taming Encoder and another pack's attn2 patch on the
   2-tuple block keys (the SD1.5 convention of IPAdapter_plus): the other pack applied first (the dispatcher calls
   it as its base) against the pack applied first (the patch is linked in once per model call by the wrapper).
   Target: the pack-first order at most 1.02x the other order.
2. relinked_options alone, per UNet call, for a registry of SDXL's size (70 transformer blocks, a dispatcher on
   attn1 and attn2 of each, a later 2-tuple patch on every attn2 block), against one UNet forward of the stand-in.
Run: .host/venv/bin/python bench/bench_stacking.py   -> bench/results/stacking.json
"""
import logging
import os
import platform
import time

import torch

from common import boot_host, median_times, standin_checkpoint, write_result

STEPS = 4
REPEATS = 3
SIZE = 256
TARGET = 1.02
log = logging.getLogger("bench_stacking")


def other_packs_patch(q, k, v, extra_options):
    """A replace patch as another pack registers it: the host's attention plus a term of its own."""
    from comfy.ldm.modules.attention import optimized_attention

    out = optimized_attention(q, k, v, extra_options["n_heads"])
    return out + 0.1 * optimized_attention(q, k.flip(1), v.flip(1), extra_options["n_heads"])


def with_other_pack(model, layout):
    m = model.clone()
    for block in sorted({key[:2] for key in layout.keys}):
        m.set_model_attn2_replace(other_packs_patch, *block)
    return m


def sdxl_sized_options():
    from comfyui_likeness.attention.dispatcher import REGISTRY_KEY, AttentionDispatcher

    blocks = ([("input", i, j) for i, d in ((4, 2), (5, 2), (7, 10), (8, 10)) for j in range(d)]
              + [("output", i, j) for i, d in ((0, 10), (1, 10), (2, 10), (3, 2), (4, 2), (5, 2)) for j in range(d)]
              + [("middle", 0, j) for j in range(10)])
    replace = {"attn1": {}, "attn2": {}}
    registry = {}
    for key in blocks:
        for site in ("attn1", "attn2"):
            d = AttentionDispatcher(site, key)
            replace[site][key] = registry[(site, key)] = d
        replace["attn2"][key[:2]] = other_packs_patch
    return len(blocks), {"patches_replace": replace, REGISTRY_KEY: registry}


def main():
    logging.basicConfig(level=logging.INFO)
    comfy, base = boot_host()
    import nodes
    from comfyui_likeness.attention.dispatcher import relinked_options
    from comfyui_likeness.attention.taming import apply_taming_encoder
    from comfyui_likeness.core.layout import attention_layout
    from comfyui_likeness.encoders.taming_encoder import VisionSpec
    from comfyui_likeness.encoders.taming_object import ObjectEmbedding
    from comfyui_likeness.weights.taming_file import load_taming, write_random_taming

    model, clip, _ = standin_checkpoint(comfy, base)
    layout = attention_layout(model)
    vision = VisionSpec(1024, 257, 24)
    path = os.path.join(base, "models", "likeness", "taming_bench.safetensors")
    write_random_taming(path, model, vision, queries=16, depth=4, seed=3, scale=0.5, gate=0.5)
    adapter = load_taming(path)
    features = torch.randn(1, vision.tokens, vision.hidden_size, generator=torch.Generator().manual_seed(0))
    embedding = ObjectEmbedding(features=features, vision=vision, subject=torch.zeros(1, 64, 64, 3))

    enc = lambda t: nodes.CLIPTextEncode().encode(clip, t)[0]  # noqa: E731
    pos, neg = enc("a photo of a cat wearing a wizard hat"), enc("blurry")
    latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
    other_first = apply_taming_encoder(with_other_pack(model, layout), adapter, embedding, 0.8)
    pack_first = with_other_pack(apply_taming_encoder(model, adapter, embedding, 0.8), layout)

    def run(m):
        return nodes.KSampler().sample(m, 1, STEPS, 7.0, "euler", "normal", pos, neg, latent)[0]["samples"]

    with torch.inference_mode():
        a, b = run(other_first), run(pack_first)
        agree = float((a - b).abs().max() / b.abs().max())
        log.info("timing %dx%d", SIZE, SIZE)
        times = median_times({"other_first": lambda: run(other_first), "pack_first": lambda: run(pack_first)},
                             repeats=REPEATS)
        x = torch.randn(2, 4, SIZE // 8, SIZE // 8)
        unet = model.model.diffusion_model
        context = pos[0][0].repeat(2, 1, 1)
        forward = median_times({"unet": lambda: unet(x, torch.tensor([500.0, 500.0]), context=context)},
                               repeats=REPEATS)["unet"]

    blocks, options = sdxl_sized_options()
    relinked_options(options)
    calls = 2000
    t = time.perf_counter()
    for _ in range(calls):
        relinked_options(options)
    per_call = (time.perf_counter() - t) / calls

    ratio = times["pack_first"] / times["other_first"]
    result = {
        "what": "KSampler with the Taming Encoder and another pack's attn2 patch on the 2-tuple block keys: the "
                "pack applied first (relinked per model call) vs the other pack applied first",
        "model": "stand-in SD1.5 checkpoint (320-channel one-level UNet, random weights), CPU",
        "steps": STEPS, "size": f"{SIZE}x{SIZE}", "repeats": f"median of {REPEATS}, round-robin",
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "seconds": times, "ratio_pack_first_over_other_first": ratio,
        "orders_agree_max_relative_difference": agree,
        "relinked_options_seconds_per_unet_call": {"sdxl_sized_registry_blocks": blocks, "dispatchers": 2 * blocks,
                                                   "later_2_tuple_patches": blocks, "seconds": per_call},
        "standin_unet_forward_seconds_batch_2": forward,
        "target_ratio": TARGET, "meets_target": ratio <= TARGET,
    }
    write_result("stacking", result)


if __name__ == "__main__":
    main()
