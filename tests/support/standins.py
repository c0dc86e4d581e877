"""Stand-in model files the tests write at test time, and the names they are written under.

Shipped workflows name the public files users have; tests place random-weight stand-ins of the same
architecture under those names in the test host's own models folder (nothing is downloaded).
"""
import os

CHECKPOINT_NAME = "likeness_standin_sd15.safetensors"
CLIP_VISION_NAME = "likeness_standin_vit_l14.safetensors"
# variant -> the CLIP vision name the stand-in of that layout is written under
CLIP_VISION_NAMES = {"vitl": CLIP_VISION_NAME, "vith": "likeness_standin_vit_h14.safetensors"}
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


def ensure_clip_vision(base_dir: str, comfy_dir: str, variant: str = "vitl") -> str:
    """The stand-in CLIP vision file of a layout (vitl: ViT-L/14, 0.6 GB; vith: ViT-H/14, 1.3 GB) in
    base_dir/models/clip_vision (built once per session)."""
    from standin_clip_vision import build_standin_clip_vision

    name = CLIP_VISION_NAMES[variant]
    path = os.path.join(base_dir, "models", "clip_vision", name)
    if not os.path.exists(path):
        build_standin_clip_vision(comfy_dir, path, variant=variant)
    return name


def place_as(base_dir: str, folder: str, name: str, public_name: str) -> str:
    """Make a stand-in in base_dir/models/<folder> answer to a public file name too (a hard link, no copy), so a
    shipped workflow that names the public file runs on it."""
    import shutil

    source = os.path.join(base_dir, "models", folder, name)
    target = os.path.join(base_dir, "models", folder, public_name)
    if name != public_name and not os.path.exists(target):
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return public_name
