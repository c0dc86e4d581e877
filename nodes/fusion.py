"""Fusion Sampling nodes: the guider, the sampler and the all-in-one KSampler (Fusion)."""
import comfy.samplers
from comfy_api.latest import io

from ..samplers.fusion_sampler import fusion_ksampler
from ..samplers.ksampler_fusion import build_guider, ksampler_fusion
from ..samplers.refine_steps import REFINE_SAMPLERS

CATEGORY = "Likeness/sampling"


def _guidance_inputs():
    return [
        io.Float.Input("w_fusion", default=7.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="guidance of the fused condition in the fusion stage (w_f)"),
        io.Float.Input("w_concept", default=7.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="guidance of the concept condition in the refinement stage (w1)"),
        io.Float.Input("w_context", default=5.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="guidance of the context (class word) condition in the refinement stage (w2); 0 skips it"),
    ]


def _sampler_inputs(include_refine_sampler: bool):
    inputs = [
        io.Int.Input("fusion_steps", default=1, min=0, max=10, tooltip="m: fusion repeats per step; 0 = independent conditions only"),
        io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="stochasticity of the fusion re-noise"),
        io.Boolean.Input("refine", default=True, tooltip="run the refinement stage after the fusion stage"),
    ]
    if include_refine_sampler:
        inputs.append(io.Combo.Input("refine_sampler", options=list(REFINE_SAMPLERS), default="euler",
                                     tooltip="euler is ProFusion's deterministic DDIM"))
    inputs += [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="fusion starts here"),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="fusion stops here"),
    ]
    return inputs


def _conditioning_inputs():
    return [
        io.Conditioning.Input("negative", tooltip="the unconditional prompt (empty or a negative prompt)"),
        io.Conditioning.Input("fused", tooltip="concept with rows scaled by gamma (Likeness Prompt: fused)"),
        io.Conditioning.Input("concept", tooltip="prompt with the concept (Likeness Prompt: concept)"),
        io.Conditioning.Input("context", tooltip="prompt with the class word (Likeness Prompt: context)"),
    ]


class LikenessFusionGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFusionGuider",
            display_name="Fusion Guider (Likeness)",
            category=CATEGORY,
            description="ProFusion's guidance: fusion stage on (negative, fused), refinement on (negative, concept, context).",
            inputs=[io.Model.Input("model"), *_conditioning_inputs(), *_guidance_inputs()],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, negative, fused, concept, context, w_fusion, w_concept, w_context) -> io.NodeOutput:
        return io.NodeOutput(build_guider(model, negative, fused, concept, context, w_fusion, w_concept, w_context))


class LikenessFusionSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessFusionSampler",
            display_name="Fusion Sampler (Likeness)",
            category=CATEGORY,
            description="Fusion Sampling's step loop; use with the Fusion Guider in SamplerCustomAdvanced.",
            inputs=_sampler_inputs(include_refine_sampler=True),
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, fusion_steps, eta, refine, refine_sampler, start_percent, end_percent) -> io.NodeOutput:
        return io.NodeOutput(fusion_ksampler(fusion_steps, eta, refine, refine_sampler, start_percent, end_percent))


class KSamplerFusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessKSamplerFusion",
            display_name="KSampler (Fusion)",
            category=CATEGORY,
            description="KSampler with ProFusion's Fusion Sampling: a fusion stage and a refinement stage per step.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("steps", default=30, min=1, max=10000),
                io.Combo.Input("sampler_name", options=list(REFINE_SAMPLERS), default="euler",
                               tooltip="sampler of the refinement step (euler = ProFusion's deterministic DDIM)"),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="ddim_uniform"),
                *_conditioning_inputs(),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                *_guidance_inputs(),
                *_sampler_inputs(include_refine_sampler=False),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, sampler_name, scheduler, negative, fused, concept, context, latent_image,
                denoise, w_fusion, w_concept, w_context, fusion_steps, eta, refine, start_percent,
                end_percent) -> io.NodeOutput:
        return io.NodeOutput(ksampler_fusion(
            model, seed, steps, sampler_name, scheduler, negative, fused, concept, context, latent_image, denoise,
            w_fusion, w_concept, w_context, fusion_steps, eta, refine, start_percent, end_percent))


NODES = [LikenessFusionGuider, LikenessFusionSampler, KSamplerFusion]
