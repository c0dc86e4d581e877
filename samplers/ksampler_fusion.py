"""KSampler (Fusion) as a function: what the host's KSampler does (nodes.common_ksampler), with the Fusion Guider
and the Fusion Sampler. The node, the trainers' sample images and the benches all call it."""
import comfy.model_management
import comfy.sample
import comfy.utils
import latent_preview

from .fusion_guider import FusionGuider, check_conditionings
from .fusion_sampler import fusion_ksampler
from .sigmas import schedule_sigmas


def build_guider(model, negative, fused, concept, context, w_fusion, w_concept, w_context, latent_batch=None):
    check_conditionings(model, {"negative": negative, "fused": fused, "concept": concept, "context": context}, latent_batch)
    guider = FusionGuider(model)
    guider.set_fusion_conds(negative, fused, concept, context)
    guider.set_weights(w_fusion, w_concept, w_context)
    return guider


def ksampler_fusion(model, seed, steps, sampler_name, scheduler, negative, fused, concept, context, latent, denoise,
                    w_fusion, w_concept, w_context, fusion_steps, eta, refine, start_percent, end_percent):
    """What KSampler does (nodes.common_ksampler), with the Fusion Guider and Fusion Sampler."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    guider = build_guider(model, negative, fused, concept, context, w_fusion, w_concept, w_context,
                          latent_batch=latent_image.shape[0])
    sampler = fusion_ksampler(fusion_steps, eta, refine, sampler_name, start_percent, end_percent)
    if denoise <= 0.0:
        out = latent.copy()
        out["samples"] = latent_image
        return out
    sigmas = schedule_sigmas(model, scheduler, steps, denoise)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out
