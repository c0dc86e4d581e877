"""Files the shipped Inv-Adapter workflows need in a test host.

- models/likeness/inv_adapter_eaa_sd15.safetensors: an EAA file with random weights for the stand-in checkpoint,
  built for the reference size the workflow test uses (SHRINK below: 64x64) with s_c = 16, so the token
  aggregation runs (64 -> 16 tokens). A trained EAA (the training issue) takes its place for real use.
- models/controlnet/control_v11p_sd15_canny_fp16.safetensors: a ControlNet with random weights that the host's own
  ControlNetLoader accepts for the stand-in checkpoint. The stand-in UNet has one level and no middle block; the
  host builds a ControlNet from the config it detects in the ControlNet's own state dict, so this one mirrors the
  stand-in's input blocks (320 channels, one level, one res block + transformer) and has a ResBlock-only middle
  block (transformer_depth_middle -1, detected from 'middle_block.0.in_layers'); the UNet adds the middle
  residual after its (absent) middle block, where the shapes match. The name is the public fp16 SD1.5
  canny ControlNet's, so the shipped workflow runs as is for users who have it.

Both are placed by standins.py under the names the shipped workflows use.
"""
import os

import torch

import standins

EAA_NAME = "inv_adapter_eaa_sd15.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SECOND_PHOTO = "astronaut_2.png"
CONTROLNET_NAME = "control_v11p_sd15_canny_fp16.safetensors"
CHECKPOINT = standins.CHECKPOINT_NAME
REFERENCE_SIZE = 64

SHRINK = {("LikenessInvAdapterExtract", "size"): REFERENCE_SIZE}


def _random_state(module, seed: int, dtype=torch.float16) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("bias"):
            out[k] = torch.zeros(v.shape, dtype=dtype)
        elif v.ndim <= 1:
            out[k] = torch.ones(v.shape, dtype=dtype)
        else:
            fan_in = max(1, int(torch.tensor(v.shape[1:]).prod()))
            out[k] = (torch.randn(v.shape, generator=g) * fan_in ** -0.5).to(dtype)
    return out


def write_standin_controlnet(path: str, seed: int = 3) -> str:
    import comfy.cldm.cldm
    import comfy.ops
    from safetensors.torch import save_file

    net = comfy.cldm.cldm.ControlNet(
        image_size=32, in_channels=4, model_channels=320, hint_channels=3, num_res_blocks=[1], channel_mult=[1],
        transformer_depth=[1], transformer_depth_middle=-1, context_dim=768, num_heads=8,
        use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False, device="meta",
        operations=comfy.ops.disable_weight_init)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.contiguous() for k, v in _random_state(net, seed).items()}, path,
              metadata={"likeness_test_asset": "random ControlNet for the stand-in checkpoint"})
    return path


def write_standin_eaa(path: str, checkpoint_path: str, reference_size: int = REFERENCE_SIZE, s_c: int = 16) -> str:
    import comfy.sd
    from comfyui_likeness.weights.eaa import write_random_eaa

    model = comfy.sd.load_checkpoint_guess_config(checkpoint_path, output_vae=False, output_clip=False)[0]
    return write_random_eaa(path, model, reference_size=reference_size, s_c=s_c, seed=21, scale=0.5)


def prepare(base_dir: str, comfy_dir: str):
    models = os.path.join(base_dir, "models")
    cn = os.path.join(models, "controlnet", CONTROLNET_NAME)
    if not os.path.exists(cn):
        write_standin_controlnet(cn)
    eaa = os.path.join(models, "likeness", EAA_NAME)
    if not os.path.exists(eaa):
        write_standin_eaa(eaa, os.path.join(models, "checkpoints", CHECKPOINT))
    place_sdxl_checkpoint(base_dir, comfy_dir)
    photo = os.path.join(base_dir, "input", SECOND_PHOTO)
    if not os.path.exists(photo):
        write_second_photo(photo)


def place_sdxl_checkpoint(base_dir: str, comfy_dir: str) -> str:
    folder = os.path.join(base_dir, "models", "checkpoints")
    target = os.path.join(folder, SDXL_CHECKPOINT)
    if not os.path.exists(target):
        source = os.path.join(folder, standins.ensure_checkpoint(base_dir, comfy_dir, "sdxl"))
        try:
            os.link(source, target)
        except OSError:
            os.symlink(source, target)
    return SDXL_CHECKPOINT


def write_second_photo(path: str) -> str:
    import numpy as np
    from PIL import Image
    from skimage import data

    face = np.asarray(data.astronaut())[:, ::-1]          # mirrored
    h, w = face.shape[:2]
    Image.fromarray(np.ascontiguousarray(face[20:h - 40, 40:w - 20])).save(path)  # cropped closer
    return path
