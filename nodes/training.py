"""Training nodes: ProFusion's test-time fine-tuning on one photo (a user-facing step of about half a minute on a
GPU in the paper) and the node that saves its result. The trainers for the other methods run from the command
line (train/launch.py)."""
import logging
import os

import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..train.outpaint import PROMPT, Outpainter
from ..train.profusion import finetune_promptnet
from ..weights.lora_file import lora_state_dict, reduce_lora, save_lora
from ..weights.promptnet_file import save_promptnet
from .promptnet import PromptNetModel

log = logging.getLogger("likeness")

PromptNetType = io.Custom("LIKENESS_PROMPTNET")
LoraType = io.Custom("LORA_MODEL")      # the host's type: what its Save LoRA Weights and Load LoRA Model take
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
                         "the learned changes as weight patches, the tuned PromptNet and the changes as a LoRA; the "
                         "inputs are not changed. Connect an inpainting model to outpaint the views as ProFusion "
                         "does (otherwise the emptied area is filled with the mean colour), or give a batch of "
                         "images to use them as the views."),
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
                io.Model.Input("inpaint_model", optional=True,
                               tooltip="an inpainting model of the same family (SD-2-inpainting for SD2) to outpaint "
                                       "the views' emptied area, as ProFusion does; it uses this node's clip and vae"),
                io.Int.Input("outpaint_steps", default=50, min=1, max=1000, optional=True,
                             tooltip="sampling steps of each outpainting (ProFusion: 50, CFG 7.5)"),
                io.String.Input("outpaint_prompt", default=PROMPT.format(subject="person"), multiline=True,
                                optional=True, tooltip="ProFusion's prompt says 'a man' or 'a woman'"),
            ],
            outputs=[io.Model.Output(display_name="model"), PromptNetType.Output(display_name="promptnet"),
                     LoraType.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, model, clip, vae, clip_vision, promptnet, image, steps, batch_size, learning_rate, views,
                tune_unet_attention, seed, inpaint_model=None, outpaint_steps=50,
                outpaint_prompt=PROMPT.format(subject="person")) -> io.NodeOutput:
        if not isinstance(promptnet, PromptNetModel):
            raise ValueError("the promptnet input must come from 'PromptNet Loader (ProFusion)' or this node")
        outpainter = None
        if inpaint_model is not None:
            outpainter = Outpainter(inpaint_model, clip, vae, outpaint_steps, outpaint_prompt)
        bar = comfy.utils.ProgressBar(steps)

        def progress(step, total, loss):
            bar.update_absolute(step, total)  # the host's hook also stops the loop when the queue is interrupted

        patched, net, losses, deltas = finetune_promptnet(
            model, clip, vae, clip_vision, promptnet.patcher.model, promptnet.meta, image, steps, batch_size,
            learning_rate, views, seed, train_unet_qkv=tune_unet_attention, progress=progress, outpainter=outpainter)
        meta = {**promptnet.meta, "fine_tuned": {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                                                 "outpainted": outpainter is not None}}
        lora = lora_state_dict(deltas, rank=0, dtype=torch.float32)   # exact; shares the patches' tensors
        return io.NodeOutput(patched, PromptNetModel(net, meta, f"{promptnet.name} (fine-tuned)"), lora)


def _prefix_error(prefix: str) -> str | None:
    name = os.path.basename(prefix.replace("\\", "/"))
    if not prefix.strip() or not name or name.startswith("."):
        return f"filename_prefix '{prefix}' gives an empty or hidden file name: use a name such as profusion/subject"
    return None


class LikenessSaveProFusionFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LikenessSaveProFusionFineTune",
            display_name="Save ProFusion Fine-Tune (Likeness)",
            category=CATEGORY,
            description=("Writes a fine-tune's result as two files with one number: the UNet attention changes as a "
                         "LoRA in models/loras (load it with LoraLoaderModelOnly on the same checkpoint) and the tuned "
                         "PromptNet in models/likeness (PromptNet Loader). Earlier files are never overwritten."),
            is_output_node=True,
            inputs=[
                LoraType.Input("lora", tooltip="the fine-tune's lora output"),
                PromptNetType.Input("promptnet", tooltip="the fine-tune's promptnet output"),
                io.String.Input("filename_prefix", default="profusion/subject"),
                io.Int.Input("lora_rank", default=0, min=0, max=1024,
                             tooltip="0 stores the changes exactly (full rank); r > 0 their best rank-r approximation, "
                                     "a smaller file"),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, lora, promptnet, filename_prefix, lora_rank) -> io.NodeOutput:
        if not isinstance(promptnet, PromptNetModel):
            raise ValueError("the promptnet input must come from 'PromptNet Fine-Tune (ProFusion)'")
        if not isinstance(lora, dict) or not lora:
            raise ValueError("the lora input is empty: the fine-tune tuned no UNet weights (tune_unet_attention off)")
        problem = _prefix_error(filename_prefix)
        if problem:
            raise ValueError(problem)
        roots = [folder_paths.get_folder_paths(key)[0] for key in ("loras", "likeness")]
        places = [folder_paths.get_save_image_path(filename_prefix, root) for root in roots]
        counter = max(p[2] for p in places)
        paths = [os.path.join(folder, f"{filename}_{counter:05}_.safetensors") for folder, filename, *_ in places]
        if any(os.path.exists(p) for p in paths):
            raise ValueError(f"filename_prefix '{filename_prefix}': {counter:05} is taken; try again")
        for folder, *_ in places:
            os.makedirs(folder, exist_ok=True)
        lora_path, promptnet_path = paths
        names = [os.path.relpath(p, r).replace(os.sep, "/") for p, r in zip(paths, roots)]
        save_lora(lora_path, reduce_lora(lora, int(lora_rank)),
                  {"method": "ProFusion test-time fine-tuning", "applies_to": "UNet attention to_q/to_k/to_v",
                   "promptnet": names[1]})
        save_promptnet(promptnet_path, promptnet.patcher.model,
                       extra={"origin": "fine-tuned", "fine_tuned": promptnet.meta.get("fine_tuned", {}),
                              "lora": names[0]})
        log.info("Likeness: saved the ProFusion fine-tune as %s (LoRA) and %s (PromptNet)", lora_path, promptnet_path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved loras/{names[0]} and likeness/{names[1]}"))


NODES = [LikenessPromptNetFineTune, LikenessSaveProFusionFineTune]
