"""Files the PromptNet workflow needs: a random PromptNet for the stand-in checkpoint and the stand-in CLIP vision."""
import os

NAME = "likeness_test_promptnet_sd15.safetensors"


def prepare(base_dir, comfy_dir):
    from comfyui_likeness.weights.promptnet_file import save_promptnet
    import standins
    from fixtures_promptnet import random_standin_promptnet

    standins.ensure_clip_vision(base_dir, comfy_dir)
    path = os.path.join(base_dir, "models", "likeness", NAME)
    if os.path.exists(path):
        return
    net = random_standin_promptnet()
    save_promptnet(path, net, base_model="SD1.x (test stand-in)")
