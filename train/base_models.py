"""The frozen models a trainer works on, loaded through the host's own classes.

From files (the command line): comfy.sd.load_checkpoint_guess_config for the checkpoint (UNet in a
ModelPatcher, CLIP, VAE) and comfy.clip_vision.load for the CLIP vision tower, exactly what
CheckpointLoaderSimple and CLIPVisionLoader do. From a running host (the fine-tuning node, tests): the MODEL,
CLIP, VAE and CLIP_VISION objects as they are; trainers never change them (clones, restored flags).
"""
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("likeness.train")


@dataclass
class BaseModels:
    model: object                 # ModelPatcher around the host's BaseModel
    clip: object = None           # comfy.sd.CLIP
    vae: object = None            # comfy.sd.VAE
    clip_vision: object = None    # comfy.clip_vision.ClipVisionModel
    name: str = ""

    def require(self, *what: str, method: str = "this trainer"):
        missing = [w for w in what if getattr(self, w) is None]
        if missing:
            raise ValueError(f"{method} needs {', '.join(missing)}: give --{missing[0].replace('_', '-')} on the command "
                             "line (clip and vae come from the checkpoint)")
        return self


def load_base_models(checkpoint: str, clip_vision: str | None = None, unet_dtype=None) -> BaseModels:
    """unet_dtype: the UNet's weight dtype (None: the host's choice for the device, e.g. fp16 on a GPU); a trainer
    that trains the UNet's own weights needs torch.float32 master weights."""
    import comfy.clip_vision
    import comfy.sd
    import folder_paths

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint: '{checkpoint}' does not exist")
    if not checkpoint.lower().endswith((".safetensors", ".sft")):
        raise ValueError(f"checkpoint: '{checkpoint}' is not a .safetensors file; the trainers never unpickle "
                         "checkpoints (convert it first)")
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        checkpoint, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths("embeddings"),
        model_options={} if unet_dtype is None else {"dtype": unet_dtype})
    cv = None
    if clip_vision:
        if not os.path.isfile(clip_vision):
            raise FileNotFoundError(f"clip_vision: '{clip_vision}' does not exist")
        cv = comfy.clip_vision.load(clip_vision)
        if cv is None:
            raise ValueError(f"clip_vision: '{clip_vision}' is not a CLIP vision model the host recognises")
    log.info("Likeness trainer: base model %s", os.path.basename(checkpoint))
    return BaseModels(model, clip, vae, cv, os.path.basename(checkpoint))
