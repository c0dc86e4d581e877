"""KSampler (Fusion) as a function: what the host's KSampler does (nodes.common_ksampler), with the Fusion Guider
and the Fusion Sampler. The node, the trainers' sample images and the benches all call it."""
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from .fusion_guider import FusionGuider, check_conditionings
from .fusion_sampler import fusion_ksampler
from .profusion_schedule import FULL_ST, PROFUSION_DDIM, profusion_ddim_sigmas
from .sigmas import schedule_sigmas, start_at_timestep

# The host's schedulers plus ProFusion's official DDIM grid.
FUSION_SCHEDULERS = tuple(comfy.samplers.KSampler.SCHEDULERS) + (PROFUSION_DDIM,)


def fusion_sigmas(model, scheduler: str, steps: int, denoise: float = 1.0, st: int = FULL_ST):
    """The sigmas KSampler (Fusion) runs: the host's schedule or the ProFusion DDIM grid, from t <= st."""
    if scheduler == PROFUSION_DDIM:
        return profusion_ddim_sigmas(model, steps, st, denoise)
    return start_at_timestep(model, schedule_sigmas(model, scheduler, steps, denoise), st)


def build_guider(model, negative, fused, concept, context, w_fusion, w_concept, w_context, latent_batch=None):
    check_conditionings(model, {"negative": negative, "fused": fused, "concept": concept, "context": context}, latent_batch)
    guider = FusionGuider(model)
    guider.set_fusion_conds(negative, fused, concept, context)
    guider.set_weights(w_fusion, w_concept, w_context)
    return guider


def ksampler_fusion(model, seed, steps, sampler_name, scheduler, negative, fused, concept, context, latent, denoise,
                    w_fusion, w_concept, w_context, fusion_steps, eta, refine, start_percent, end_percent,
                    st=FULL_ST, refine_eta=0.0):
    """What KSampler does (nodes.common_ksampler), with the Fusion Guider and Fusion Sampler. scheduler
    'profusion_ddim' runs ProFusion's official grid, starting noise and last step; st starts at t <= st."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    guider = build_guider(model, negative, fused, concept, context, w_fusion, w_concept, w_context,
                          latent_batch=latent_image.shape[0])
    sampler = fusion_ksampler(fusion_steps, eta, refine, sampler_name, start_percent, end_percent, refine_eta,
                              profusion_ddim=scheduler == PROFUSION_DDIM)
    if denoise <= 0.0:
        out = latent.copy()
        out["samples"] = latent_image
        return out
    sigmas = fusion_sigmas(model, scheduler, steps, denoise, st)
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    samples = guider.sample(noise, latent_image, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out
