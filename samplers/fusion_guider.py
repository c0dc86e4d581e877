"""The Fusion Guider: four conditions and the two guidance rules of ProFusion's Fusion Sampling.

    fusion stage     D = D_neg + w_f * (D_fused - D_neg)                                  (eq. 3)
    refinement stage D = D_neg + w1 * (D_concept - D_neg) + w2 * (D_context - D_neg)      (eq. 6)

Combining denoised estimates is the same as combining eps because the weights sum to one (docs/methods/fusion-sampling.md).
A plain sampler connected to this guider gets the refinement rule, i.e. Fusion Sampling with m = 0.
The Fusion Sampler asks for the fusion rule through a key in model_options, so the host's inpainting wrapper
(KSamplerX0Inpaint) still sits between the sampler and both rules.

SDXL: every condition carries the pooled text output and the same size conditioning (width, height, crops,
target size; taken from the concept when a condition has none), and a concept that follows x_t (PromptNet)
re-encodes the pooled output and the UNet's `y` along with the context at every evaluation.
Several reference photos (ProFusion's extra_ref_image_scales, docs/methods/promptnet.md): a concept source may
return one S* per photo with weights r_k; the fused condition becomes the weighted mean of the photos' guided
predictions, D_neg + w_f * sum_k r_k / sum(r) * (D_fused_k - D_neg), and the concept term of the refinement
becomes w1 * sum_k r_k * (D_concept_k - D_neg), as the official pipeline does with r_1 = 1, r_k = s_k / w1.
"""
import math
import uuid

import comfy.conds
import comfy.samplers

from ..concepts.prompt_injection import DYNAMIC_KEY
from ..core.keys import UNCOND_INDICES_KEY

STAGE_KEY = "likeness_fusion_stage"
FUSION, REFINE = "fusion", "refine"
MAX_GUIDANCE = 30.0

# The concept is stored under "positive" so the host's cond processing treats it as the positive side
# (ControlNets applied to the positive only are carried to the other conditions, as KSampler does).
_CONCEPT = "positive"


def _carry_over(source, target, keys=("control", "gligen")):
    """Give each entry of target the ControlNet/GLIGEN of the first source entry when it has none of its own."""
    if not source:
        return target
    extra = {k: source[0][1][k] for k in keys if k in source[0][1]}
    if not extra:
        return target
    return [[t, {**extra, **d}] for t, d in target]


SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")


def _carry_size(source_conds, targets):
    """Give every entry without size conditioning that of the first entry that has one, so all conditions of both
    stages describe the same image (for SDXL the guidance differences are then about the text alone)."""
    size = next(({k: d[k] for k in SIZE_KEYS if k in d} for cond in source_conds if cond for _, d in cond
                 if any(k in d for k in SIZE_KEYS)), None)
    if size is None:
        return targets
    return [None if cond is None else [[t, d if any(k in d for k in SIZE_KEYS) else {**d, **size}] for t, d in cond]
            for cond in targets]


def size_of(entry: dict, x) -> dict:
    """The size conditioning of a processed condition entry, with the host's defaults (encode_model_conds)."""
    width, height = entry.get("width", x.shape[-1] * 8), entry.get("height", x.shape[-2] * 8)
    return {"width": width, "height": height, "crop_w": entry.get("crop_w", 0), "crop_h": entry.get("crop_h", 0),
            "target_width": entry.get("target_width", width), "target_height": entry.get("target_height", height)}


def dynamic_prompts(*conditionings):
    return [d[DYNAMIC_KEY] for cond in conditionings if cond for _, d in cond if DYNAMIC_KEY in d]


class FusionGuider(comfy.samplers.CFGGuider):
    def set_fusion_conds(self, negative, fused, concept, context):
        fused = _carry_over(concept, fused)
        context = _carry_over(concept, context) if context is not None else None
        negative, fused, concept, context = _carry_size([concept, fused, context, negative],
                                                        [negative, fused, concept, context])
        conds = {"negative": negative, "fused": fused, _CONCEPT: concept}
        if context is not None:
            conds["context"] = context
        self.inner_set_conds(conds)
        dynamic = dynamic_prompts(negative, fused, concept, context)
        for d in dynamic:
            check = getattr(d.concept.dynamic, "check_model", None)
            if check is not None:
                check(self.model_patcher)
        if dynamic:
            # PromptNet and the text encoder run inside the loop: load them with the UNet (on a clone, so the
            # upstream MODEL is not changed).
            models = []
            for d in dynamic:
                models += [m for m in d.models() if m not in models]
            self.model_patcher = self.model_patcher.clone()
            self.model_patcher.set_additional_models("likeness_dynamic_concepts", models)
            self.model_options = self.model_patcher.model_options

    def set_weights(self, w_fusion: float, w_concept: float, w_context: float):
        for name, w in (("w_fusion", w_fusion), ("w_concept", w_concept), ("w_context", w_context)):
            if not 0.0 <= w <= MAX_GUIDANCE:
                raise ValueError(f"{name} must be between 0 and {MAX_GUIDANCE:g} (got {w})")
        self.w_fusion, self.w_concept, self.w_context = float(w_fusion), float(w_concept), float(w_context)
        self.cfg = self.w_concept  # what generic host code reads as "the" CFG scale

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if model_options.get(STAGE_KEY, REFINE) == FUSION:
            return self._guided(x, timestep, model_options, ["fused"], [self.w_fusion], mean_over_photos=True)
        names = [_CONCEPT]
        weights = [self.w_concept]
        if "context" in self.conds and not math.isclose(self.w_context, 0.0):
            names.append("context")
            weights.append(self.w_context)
        return self._guided(x, timestep, model_options, names, weights, mean_over_photos=False)

    def _follow_latent(self, cond, x, timestep):
        """[(cond, weight)]: the condition as it is, or - where its concept follows the current latent (PromptNet's
        S*) - re-encoded with the S* of each reference photo: one source call and one text encoding per photo
        and evaluation, as in ProFusion's pipeline."""
        if not cond or not any(DYNAMIC_KEY in c for c in cond):
            return [(cond, 1.0)]
        variants, cache = None, {}
        for i, c in enumerate(cond):
            dynamic = c.get(DYNAMIC_KEY)
            if dynamic is None:
                continue
            size = size_of(c, x)
            key = (id(dynamic.concept.dynamic), tuple(size.values()))
            if key not in cache:
                cache[key] = dynamic.concept.dynamic(x, timestep, self.model_patcher, size)
            photos = cache[key]
            if variants is None:
                variants = [(list(cond), w) for _, w in photos]
            if len(photos) != len(variants):
                raise ValueError("the entries of one conditioning carry concepts with different numbers of photos")
            for (entries, _), (vectors, _) in zip(variants, photos):
                tensor, pooled = dynamic.encode_with_pooled(vectors)
                entries[i] = self._reencoded(c, tensor, pooled, x, first=entries is variants[0][0])
        return variants

    def _reencoded(self, c, tensor, pooled, x, first):
        model_conds = {**c["model_conds"], "c_crossattn": comfy.conds.CONDCrossAttn(tensor)}
        out = {**c, "cross_attn": tensor, "model_conds": model_conds}
        if pooled is not None and "y" in c["model_conds"]:
            # SDXL: y holds the pooled output, which changes with S* (the end token attends to it)
            out["pooled_output"] = pooled
            y = self.inner_model.encode_adm(**{**c, **size_of(c, x), "pooled_output": pooled, "device": x.device,
                                               "noise": x})
            model_conds["y"] = comfy.conds.CONDRegular(y)
        if not first:
            out["uuid"] = uuid.uuid4()   # each photo's condition is a condition of its own for the host
        return out

    def _guided(self, x, timestep, model_options, names, weights, mean_over_photos):
        negative = self._follow_latent(self.conds.get("negative"), x, timestep)
        if len(negative) != 1:
            raise ValueError("the negative conditioning cannot carry a concept of several reference photos")
        conds, scales = [negative[0][0]], []
        for name, w in zip(names, weights):
            variants = self._follow_latent(self.conds.get(name), x, timestep)
            total = sum(r for _, r in variants)
            for cond, r in variants:
                conds.append(cond)
                scales.append(w * (r / total if mean_over_photos else r))
        # The negative is index 0 of this cond list (CFGGuider's is [positive, negative]): tell attention
        # patches that route by cond/uncond (attention/dispatcher.py) which rows are unconditional.
        model_options = {**model_options, "transformer_options": {
            **model_options.get("transformer_options", {}), UNCOND_INDICES_KEY: frozenset({0})}}
        # One host call per stage: calc_cond_batch packs all conditions into as few UNet batches as memory allows.
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        uncond = out[0]
        result = uncond
        for scale, pred in zip(scales, out[1:]):
            result = result + scale * (pred - uncond)
        # Post-CFG hooks (RescaleCFG, PAG, SAG ...) see the first condition as "the" cond, like DualCFGGuider.
        for fn in model_options.get("sampler_post_cfg_function", []):
            result = fn({"denoised": result, "cond": conds[1], "uncond": conds[0], "cond_scale": weights[0],
                         "model": self.inner_model, "uncond_denoised": uncond, "cond_denoised": out[1],
                         "sigma": timestep, "model_options": model_options, "input": x})
        return result


def check_conditionings(model_patcher, named: dict, latent_batch: int | None = None):
    """Clear errors for missing, mismatched or wrongly batched conditionings, naming the input."""
    widths = {}
    for name, cond in named.items():
        if cond is None:
            raise ValueError(f"the '{name}' conditioning is missing: connect it (Likeness Prompt gives fused, concept "
                             "and context; any text encode gives negative)")
        if not isinstance(cond, list) or not cond or not all(isinstance(c, (list, tuple)) and len(c) == 2 for c in cond):
            raise ValueError(f"the '{name}' input is not a CONDITIONING")
        for tensor, _ in cond:
            widths.setdefault(int(tensor.shape[-1]), name)
            b = int(tensor.shape[0])
            if latent_batch is not None and b not in (1, latent_batch):
                raise ValueError(f"the '{name}' conditioning has batch {b} but the latent has batch {latent_batch}; "
                                 "use batch 1 or the latent's batch")
    if len(widths) > 1:
        (w1, n1), (w2, n2) = list(widths.items())[:2]
        raise ValueError(f"the '{n1}' conditioning is {w1} wide but '{n2}' is {w2} wide: encode all of them with "
                         "the same CLIP")
    context_dim = getattr(model_patcher.model.model_config, "unet_config", {}).get("context_dim")
    width = next(iter(widths))
    if context_dim is not None and width != context_dim:
        raise ValueError(f"the conditionings are {width} wide but this model's cross-attention expects {context_dim}: "
                         "use the CLIP that came with the checkpoint")
    if _needs_pooled(model_patcher):
        for name, cond in named.items():
            if any(d.get("pooled_output") is None and "unclip_conditioning" not in d for _, d in cond):
                raise ValueError(f"the '{name}' conditioning has no pooled text output, which this SDXL model needs "
                                 "(its `y`): encode it with this checkpoint's CLIP (CLIPTextEncode, "
                                 "CLIPTextEncodeSDXL or Likeness Prompt)")


def _needs_pooled(model_patcher) -> bool:
    import comfy.model_base

    return isinstance(model_patcher.model, (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner))
