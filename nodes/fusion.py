"""Fusion Sampling nodes: the guider, the sampler, the all-in-one KSampler (Fusion) and the ProFusion DDIM
schedule."""
from comfy_api.latest import io

from ..samplers.fusion_sampler import fusion_ksampler
from ..samplers.ksampler_fusion import FUSION_SCHEDULERS, build_guider, ksampler_fusion
from ..samplers.profusion_schedule import FULL_ST, profusion_ddim_sigmas
from ..samplers.refine_steps import REFINE_SAMPLERS

CATEGORY = "Likeness/sampling"


def _guidance_inputs():
    return [
        io.Float.Input("w_fusion", default=7.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="guidance of the fused condition in the fusion stage (w_f; ProFusion's pipeline 3, its notebook 7)"),
        io.Float.Input("w_concept", default=7.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="guidance of the concept condition in the refinement stage (w1; ProFusion's pipeline 5, its notebook 7)"),
        io.Float.Input("w_context", default=5.0, min=0.0, max=30.0, step=0.1, round=0.01,
                       tooltip="guidance of the context (class word) condition in the refinement stage (w2; ProFusion's pipeline "
                               "0, its notebook 5); 0 skips it"),
    ]


def _sampler_inputs(include_refine_sampler: bool):
    inputs = [
        io.Int.Input("fusion_steps", default=1, min=0, max=10,
                     tooltip="m: fusion repeats per step (the paper: 1; ProFusion's pipeline default 0); 0 = "
                             "independent conditions only"),
        io.Float.Input("eta", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="stochasticity of the fusion re-noise"),
        io.Boolean.Input("refine", default=True, tooltip="run the refinement stage after the fusion stage"),
    ]
    if include_refine_sampler:
        inputs.append(io.Combo.Input("refine_sampler", options=list(REFINE_SAMPLERS), default="euler",
                                     tooltip="euler is ProFusion's deterministic DDIM"))
    inputs += [
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, tooltip="fusion starts here"),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, tooltip="fusion stops here"),
        _refine_eta_input(),
    ]
    return inputs


def _refine_eta_input():
    # Optional inputs added after the first release keep older workflow files valid.
    return io.Float.Input("refine_eta", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                          tooltip="eta of the DDIM refinement step with the euler refinement sampler (ProFusion's "
                                  "pipeline eta, default 0: deterministic; 1 = euler_ancestral)")


def _st_input():
    return io.Int.Input("st", default=FULL_ST, min=1, max=FULL_ST, optional=True,
                        tooltip="ProFusion's st: denoising starts at the first step with timestep <= st, from the "
                                "latent noised to that level (img2img); 1000 runs every step")


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
            inputs=[*_sampler_inputs(include_refine_sampler=True),
                    io.Boolean.Input("profusion_ddim", default=False, optional=True,
                                     tooltip="the sigmas come from 'ProFusion DDIM Schedule': start from pure noise on "
                                             "the whole grid and return the latent at the grid's last level, as "
                                             "ProFusion's official pipeline")],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, fusion_steps, eta, refine, refine_sampler, start_percent, end_percent, refine_eta=0.0,
                profusion_ddim=False) -> io.NodeOutput:
        return io.NodeOutput(fusion_ksampler(fusion_steps, eta, refine, refine_sampler, start_percent, end_percent,
                                             refine_eta, profusion_ddim))


class LikenessProFusionDDIMSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessProFusionDDIMSchedule",
            display_name="ProFusion DDIM Schedule (Likeness)",
            category=CATEGORY,
            description=("The timestep grid of ProFusion's official pipeline (DDIM, T // steps apart, from "
                         "(steps - 1) * (T // steps) + 1 down to 1, the last step ending at alpha_bar_0) as SIGMAS. "
                         "Use it with the Fusion Sampler's profusion_ddim on."),
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="ProFusion's pipeline: 50"),
                io.Int.Input("st", default=FULL_ST, min=1, max=FULL_ST,
                             tooltip="keep the steps with timestep <= st (ProFusion's st); 1000 keeps all"),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="as KSampler: the last `steps` of a grid of steps / denoise"),
            ],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, steps, st, denoise) -> io.NodeOutput:
        return io.NodeOutput(profusion_ddim_sigmas(model, steps, st, denoise))


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
                io.Combo.Input("scheduler", options=list(FUSION_SCHEDULERS), default="ddim_uniform",
                               tooltip="profusion_ddim: ProFusion's official DDIM grid, starting noise and last step"),
                *_conditioning_inputs(),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01),
                *_guidance_inputs(),
                *_sampler_inputs(include_refine_sampler=False),
                _st_input(),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, sampler_name, scheduler, negative, fused, concept, context, latent_image,
                denoise, w_fusion, w_concept, w_context, fusion_steps, eta, refine, start_percent,
                end_percent, refine_eta=0.0, st=FULL_ST) -> io.NodeOutput:
        return io.NodeOutput(ksampler_fusion(
            model, seed, steps, sampler_name, scheduler, negative, fused, concept, context, latent_image, denoise,
            w_fusion, w_concept, w_context, fusion_steps, eta, refine, start_percent, end_percent, st, refine_eta))


NODES = [LikenessFusionGuider, LikenessFusionSampler, KSamplerFusion, LikenessProFusionDDIMSchedule]
