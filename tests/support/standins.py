"""Stand-in model files the tests write at test time, and the names they are written under.

Shipped workflows name the public files users have; tests place random-weight stand-ins of the same
architecture under those names in the test host's own models folder (nothing is downloaded).
"""
import os

CHECKPOINT_NAME = "likeness_standin_sd15.safetensors"
CLIP_VISION_NAME = "likeness_standin_vit_l14.safetensors"
# family -> the checkpoint name the stand-in of that family is written under
CHECKPOINT_NAMES = {"sd15": CHECKPOINT_NAME, "sd2": "likeness_standin_sd2.safetensors",
                    "sdxl": "likeness_standin_sdxl.safetensors"}


def ensure_checkpoint(base_dir: str, comfy_dir: str, family: str = "sd15") -> str:
    """The stand-in checkpoint of a family (sd15, sd2, sdxl) in base_dir/models/checkpoints (built once per session;
    SD1.5 0.3 GB, SD2 0.7 GB, SDXL 1.9 GB because the text encoders are full size)."""
    from standin_checkpoint import build_standin_checkpoint

    name = CHECKPOINT_NAMES[family]
    path = os.path.join(base_dir, "models", "checkpoints", name)
    if not os.path.exists(path):
        build_standin_checkpoint(comfy_dir, path, family=family)
    return name


def ensure_clip_vision(base_dir: str, comfy_dir: str) -> str:
    """The stand-in ViT-L/14 CLIP vision file in base_dir/models/clip_vision (0.6 GB, built once per session)."""
    from standin_clip_vision import build_standin_clip_vision

    path = os.path.join(base_dir, "models", "clip_vision", CLIP_VISION_NAME)
    if not os.path.exists(path):
        build_standin_clip_vision(comfy_dir, path)
    return CLIP_VISION_NAME


def place_as(base_dir: str, folder: str, built_name: str, public_name: str) -> str:
    """Make a built stand-in visible under the public file name a shipped workflow names (a hard link, or a copy
    where links are not possible), in base_dir/models/<folder>."""
    import shutil

    root = os.path.join(base_dir, "models", folder)
    target = os.path.join(root, public_name)
    if not os.path.exists(target):
        try:
            os.link(os.path.join(root, built_name), target)
        except OSError:
            shutil.copy(os.path.join(root, built_name), target)
    return public_name
