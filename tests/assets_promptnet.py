"""Files the PromptNet workflow needs: a random PromptNet for the stand-in checkpoint and the stand-in CLIP vision."""
import os

import torch

NAME = "likeness_test_promptnet_sd15.safetensors"


def prepare(base_dir, comfy_dir):
    from comfyui_likeness.encoders.promptnet import PromptNet
    from comfyui_likeness.weights.promptnet_file import save_promptnet
    from conftest import ensure_clip_vision
    from fixtures_promptnet import STANDIN_UNET

    ensure_clip_vision(base_dir)
    path = os.path.join(base_dir, "models", "likeness", NAME)
    if os.path.exists(path):
        return
    # latent_size 8 keeps the one-level stand-in's head small (its grid is the whole latent).
    net = PromptNet(STANDIN_UNET, vision_width=1024, prompt_width=768, latent_size=8, region_channels=32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            v.copy_(torch.zeros_like(v) if k.endswith("bias") else torch.ones_like(v) if v.ndim <= 1
                    else torch.randn(v.shape, generator=g) * v[0].numel() ** -0.5 * 0.1)
    save_promptnet(path, net, base_model="SD1.x (test stand-in)")
