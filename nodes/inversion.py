"""DDIM Inversion node: a latent back to noise on the sampler's own sigma grid."""
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..samplers.inversion import ddim_invert


class LikenessDDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessDDIMInversion",
            display_name="DDIM Inversion (Likeness)",
            category="Likeness/sampling",
            description=("Deterministic DDIM inversion (CFG 1) of a latent. Sample the result with a deterministic "
                         "sampler (euler), the same scheduler and steps, and noise disabled to get the image back."),
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("conditioning", tooltip="a caption of the image; an empty prompt also works"),
                io.Latent.Input("latent"),
                io.Int.Input("steps", default=50, min=1, max=1000),
                io.Combo.Input("scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), default="ddim_uniform"),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="invert only this fraction of the schedule (matches KSampler's denoise)"),
            ],
            outputs=[io.Latent.Output(display_name="noised_latent"), io.Sigmas.Output(display_name="sigmas")],
        )

    @classmethod
    def execute(cls, model, conditioning, latent, steps, scheduler, denoise) -> io.NodeOutput:
        callback = latent_preview.prepare_callback(model, steps)
        out, sigmas = ddim_invert(model, conditioning, latent, steps, scheduler, denoise, callback=callback,
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        return io.NodeOutput(out, sigmas)


NODES = [LikenessDDIMInversion]
