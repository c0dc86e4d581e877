"""Training nodes: ProFusion's test-time fine-tuning on one photo (a user-facing step of about half a minute on a
GPU in the paper). The trainers for the other methods run from the command line (train/launch.py)."""
import logging

import comfy.utils
from comfy_api.latest import io

from ..train.profusion import finetune_promptnet
from .promptnet import PromptNetModel

log = logging.getLogger("likeness")

PromptNetType = io.Custom("LIKENESS_PROMPTNET")
CATEGORY = "Likeness/training"


class LikenessPromptNetFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessPromptNetFineTune",
            display_name="PromptNet Fine-Tune (ProFusion)",
            category=CATEGORY,
            description=("ProFusion's test-time fine-tuning on one subject: PromptNet and every attention to_q/to_k/"
                         "to_v of the UNet learn the subject from augmented views of the photo (reference and target "
                         "drawn independently), with 'a photo of S*' and the diffusion loss. Outputs the model with "
                         "the learned changes as weight patches and the tuned PromptNet; the inputs are not changed. "
                         "Give a batch of images to use them as the views instead (e.g. outpainted variations)."),
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                io.ClipVision.Input("clip_vision", tooltip="the CLIP vision the PromptNet was trained with"),
                PromptNetType.Input("promptnet"),
                io.Image.Input("image", tooltip="the subject: one photo (augmented into views) or a batch of views"),
                io.Int.Input("steps", default=100, min=1, max=10000,
                             tooltip="optimizer steps (ProFusion: 50 at batch 8; its notebook: 100 at batch 4)"),
                io.Int.Input("batch_size", default=4, min=1, max=64),
                io.Float.Input("learning_rate", default=2e-5, min=1e-7, max=1e-2, step=1e-6, round=1e-7,
                               tooltip="AdamW (ProFusion: 2e-5)"),
                io.Int.Input("views", default=31, min=1, max=256,
                             tooltip="augmented views made from a single photo (ProFusion keeps 31 plus the photo)"),
                io.Boolean.Input("tune_unet_attention", default=True,
                                 tooltip="also tune the UNet's attention q/k/v (the paper); off: PromptNet only"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff),
            ],
            outputs=[io.Model.Output(display_name="model"), PromptNetType.Output(display_name="promptnet")],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, promptnet, image, steps, batch_size, learning_rate, views,
                tune_unet_attention, seed) -> io.NodeOutput:
        if not isinstance(promptnet, PromptNetModel):
            raise ValueError("the promptnet input must come from 'PromptNet Loader (ProFusion)' or this node")
        bar = comfy.utils.ProgressBar(steps)

        def progress(step, total, loss):
            bar.update_absolute(step, total)  # the host's hook also stops the loop when the queue is interrupted

        patched, net, losses = finetune_promptnet(
            model, clip, vae, clip_vision, promptnet.patcher.model, promptnet.meta, image, steps, batch_size,
            learning_rate, views, seed, train_unet_qkv=tune_unet_attention, progress=progress)
        meta = {**promptnet.meta, "fine_tuned": {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1]}}
        return io.NodeOutput(patched, PromptNetModel(net, meta, f"{promptnet.name} (fine-tuned)"))


NODES = [LikenessPromptNetFineTune]
