"""ProFusion sampling (PromptNet concept + KSampler (Fusion), m = 1 with refinement) against the host's CFG
KSampler on the same model and steps: wall-time ratio and, per step, UNet evaluations, PromptNet calls and text
encodings. Run: .host/venv/bin/python bench/bench_promptnet.py  -> bench/results/promptnet.json
"""
import os
import platform
import sys

import torch

from common import REPO, EvalCounter, boot_host, median_times, standin_checkpoint, write_result

# Its stand-in builders still live in the tests' fixtures (to move to scripts/ when this bench is extended).
sys.path.insert(0, os.path.join(REPO, "tests", "support"))

STEPS, SIZE = 6, 128


def main():
    comfy_dir, base = boot_host()
    import comfy.model_management
    import comfy.model_patcher
    import nodes
    from comfyui_likeness.concepts.prompt_injection import encode_likeness_prompt
    from comfyui_likeness.concepts.promptnet_source import PromptNetSource
    from comfyui_likeness.samplers.ksampler_fusion import ksampler_fusion
    from comfyui_likeness.samplers.sigmas import schedule_sigmas
    from fixtures_promptnet import STANDIN_UNET, random_standin_promptnet

    model, clip, _ = standin_checkpoint(comfy_dir, base)
    net = random_standin_promptnet()
    g = torch.Generator().manual_seed(1)
    patcher = comfy.model_patcher.ModelPatcher(net.eval(), load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    source = PromptNetSource(patcher, torch.randn(1, 257, 1024, generator=g), torch.randn(1, 4, 16, 16, generator=g),
                             {"unet_config": STANDIN_UNET, "vision_width": 1024})
    concept = source.static_concept(model, "promptnet:bench")
    fused, concept_cond, context = encode_likeness_prompt(clip, "a holder is wearing a superman costume", concept,
                                                          "holder", "person", 0.7)
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    plain = nodes.CLIPTextEncode().encode(clip, "a person is wearing a superman costume")[0]
    latent = nodes.EmptyLatentImage().generate(SIZE, SIZE, 1)[0]
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
        t = median_times({"host": host, "profusion": profusion}, repeats=3)
        e_host, _ = counts(host)
        e_pf, pn_calls = counts(profusion)
    result = {
        "what": "ProFusion (PromptNet concept, KSampler (Fusion) m=1 + refinement) vs host CFG KSampler",
        "model": "stand-in SD1.5 checkpoint (random weights) + random PromptNet on its layout, CPU",
        "latent": f"{SIZE // 8}x{SIZE // 8}", "steps": n_steps, "machine": platform.machine(),
        "seconds": {"host_ksampler": t["host"], "profusion": t["profusion"]},
        "per_step": {"host_unet_evaluations": e_host, "profusion_unet_evaluations": e_pf,
                     "promptnet_calls": pn_calls, "text_encodings": pn_calls},
        "ratio": {"time": t["profusion"] / t["host"], "unet_evaluations": e_pf / e_host},
        "note": ("ProFusion's original pipeline batches 3 + 3 conditions (6 evaluations); this one needs 5. The stand-in UNet has 19 M parameters against the CLIP-L text encoder's 123 M, so here the two text encodings per step dominate the time; with a full SD UNet (860 M) the UNet evaluations dominate and the time ratio approaches the evaluation ratio"),
    }
    write_result("promptnet", result)


if __name__ == "__main__":
    main()
