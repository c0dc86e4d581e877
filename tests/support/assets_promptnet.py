"""Stand-in for the ProFusion workflow's PromptNet: random weights on the SD2 stand-in checkpoint's UNet layout
(cross-attention 1024) with ViT-H/14 tokens (1280 wide), under the public name the workflow uses (standins.py)."""
SHRINK = {}


def write_standin_promptnet_sd2(path: str, seed: int = 0) -> str:
    from comfyui_likeness.weights.promptnet_file import save_promptnet
    from fixtures_promptnet import random_standin_promptnet

    save_promptnet(path, random_standin_promptnet(seed, family="sd2"), base_model="SD2.x (test stand-in)")
    return path
