"""Stand-in model files the tests write at test time, and the names they are written under.

Shipped workflows name the public files users have; tests place random-weight stand-ins of the same
architecture under those names in the test host's own models folder (nothing is downloaded).
"""
import os

CHECKPOINT_NAME = "likeness_standin_sd15.safetensors"
CLIP_VISION_NAME = "likeness_standin_vit_l14.safetensors"


def ensure_checkpoint(base_dir: str, comfy_dir: str) -> str:
    """The stand-in SD1.5 checkpoint in base_dir/models/checkpoints (built once per session)."""
    from standin_checkpoint import build_standin_checkpoint

    path = os.path.join(base_dir, "models", "checkpoints", CHECKPOINT_NAME)
    if not os.path.exists(path):
        build_standin_checkpoint(comfy_dir, path)
    return CHECKPOINT_NAME


def ensure_clip_vision(base_dir: str, comfy_dir: str) -> str:
    """The stand-in ViT-L/14 CLIP vision file in base_dir/models/clip_vision (0.6 GB, built once per session)."""
    from standin_clip_vision import build_standin_clip_vision

    path = os.path.join(base_dir, "models", "clip_vision", CLIP_VISION_NAME)
    if not os.path.exists(path):
        build_standin_clip_vision(comfy_dir, path)
    return CLIP_VISION_NAME
