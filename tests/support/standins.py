"""Stand-in model files the tests write at test time, under the public names the shipped workflows use.

Shipped workflows name the files users have (scripts/model_files.py lists them); tests place random-weight
stand-ins of the same architecture under those names in the test host's own models folder (nothing is
downloaded). STANDINS is the one mapping name -> builder: a workflow that names a file with no builder here, or
a file that is not in the catalog, fails tests/workflows/test_workflows.py with the name to add.
"""
import os

import model_files

CHECKPOINT_NAMES = {"sd15": "v1-5-pruned-emaonly-fp16.safetensors", "sd2": "v2-1_512-ema-pruned.safetensors",
                    "sdxl": "sd_xl_base_1.0.safetensors"}
CHECKPOINT_NAME = CHECKPOINT_NAMES["sd15"]
CLIP_VISION_NAMES = {"vitl": "clip-vit-large-patch14.safetensors", "vith": "clip_vision_h.safetensors"}
CLIP_VISION_NAME = CLIP_VISION_NAMES["vitl"]
# Names only tests may use: a shipped workflow that names one of these names a stand-in.
TEST_ONLY_PREFIXES = ("likeness_standin", "likeness_test", "likeness_example", "likeness_centre", "likeness_random",
                      "likeness_mxnet", "likeness_detonly", "likeness_nested")


def _checkpoint(family):
    def build(base_dir, comfy_dir, path):
        from standin_checkpoint import build_standin_checkpoint
        build_standin_checkpoint(comfy_dir, path, family=family)
    return build


def _clip_vision(tower):
    def build(base_dir, comfy_dir, path):
        from standin_clip_vision import build_standin_clip_vision
        build_standin_clip_vision(comfy_dir, path, variant=tower)
    return build


def _needs(name, builder):
    """A builder that needs another stand-in first (an adapter is shaped by the checkpoint it is for)."""
    def build(base_dir, comfy_dir, path):
        builder(path, ensure(base_dir, comfy_dir, name, full_path=True))
    return build


def _controlnet(base_dir, comfy_dir, path):
    from assets_inv_adapter import write_standin_controlnet
    write_standin_controlnet(path)


def _eaa(path, checkpoint_path):
    from assets_inv_adapter import write_standin_eaa
    write_standin_eaa(path, checkpoint_path)


def _photoverse(path, checkpoint_path):
    from assets_photoverse import write_standin_photoverse
    write_standin_photoverse(path, checkpoint_path)


def _taming(path, checkpoint_path):
    from assets_taming import write_standin_taming
    write_standin_taming(path, checkpoint_path)


def _promptnet_official(base_dir, comfy_dir, path):
    from assets_promptnet import write_standin_official_promptnet
    write_standin_official_promptnet(base_dir, comfy_dir, path)


def _by_family(module_name):
    """Files a family's assets module writes in its prepare() (several files from one stand-in, such as ELITE's two
    mappers, or adapters shaped by the SDXL checkpoint and the ViT-H/14 tower)."""
    def build(base_dir, comfy_dir, path):
        import importlib
        importlib.import_module(module_name).prepare(base_dir, comfy_dir)
    return build


def _embedding(base_dir, comfy_dir, path):
    from assets_fusion import write_standin_embedding
    write_standin_embedding(path)


def _face_pack(base_dir, comfy_dir, path):
    from fixtures_faces import write_pack
    write_pack(path, detector="centre", recognizer="torch", seed=11)


STANDINS = {
    **{name: _checkpoint(family) for family, name in CHECKPOINT_NAMES.items()},
    **{name: _clip_vision(tower) for tower, name in CLIP_VISION_NAMES.items()},
    "control_v11p_sd15_canny_fp16.safetensors": _controlnet,
    "antelopev2": _face_pack,
    "photoverse_sd15.safetensors": _needs(CHECKPOINT_NAME, _photoverse),
    "inv_adapter_eaa_sd15.safetensors": _needs(CHECKPOINT_NAME, _eaa),
    "taming_encoder_sd15_vitl14.safetensors": _needs(CHECKPOINT_NAME, _taming),
    "profusion_ffhq/promptnet/diffusion_pytorch_model.bin": _promptnet_official,
    "subject_embedding.safetensors": _embedding,
    "subject_embedding_sdxl.safetensors": _by_family("assets_fusion_sdxl"),
    "photoverse_sdxl.safetensors": _by_family("assets_photoverse"),
    "global_mapper.pt": _by_family("assets_photoverse"),
    "local_mapper.pt": _by_family("assets_photoverse"),
    "taming_encoder_sdxl_vith14.safetensors": _by_family("assets_taming"),
}


def path_for(base_dir: str, name: str) -> str:
    model = model_files.CATALOG[name]
    return os.path.join(base_dir, "models", *model.directory.split("/"), name)


def ensure(base_dir: str, comfy_dir: str, name: str, full_path: bool = False) -> str:
    """The stand-in for a public file name, written once per session under that name; returns the name (or its
    path)."""
    if name not in model_files.CATALOG:
        raise KeyError(f"{name} is not in scripts/model_files.py: add it there (with its url, or a Note text)")
    if name not in STANDINS:
        raise KeyError(f"{name} has no stand-in builder in tests/support/standins.py STANDINS")
    path = path_for(base_dir, name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        STANDINS[name](base_dir, comfy_dir, path)
    return path if full_path else name


def ensure_checkpoint(base_dir: str, comfy_dir: str, family: str = "sd15") -> str:
    """The stand-in checkpoint of a family (sd15, sd2, sdxl) under its public name in base_dir/models/checkpoints
    (built once per session; SD1.5 0.3 GB, SD2 0.7 GB, SDXL 1.9 GB because the text encoders are full size)."""
    return ensure(base_dir, comfy_dir, CHECKPOINT_NAMES[family])


def ensure_clip_vision(base_dir: str, comfy_dir: str, variant: str = "vitl") -> str:
    """The stand-in CLIP vision file (vitl: ViT-L/14, 0.6 GB; vith: ViT-H/14, 1.3 GB) under its public name."""
    return ensure(base_dir, comfy_dir, CLIP_VISION_NAMES[variant])


def place_for(base_dir: str, comfy_dir: str, prompt: dict) -> list[str]:
    """Stand-ins for every model file an API prompt names."""
    return [ensure(base_dir, comfy_dir, value) for _, _, value in model_files.files_named(prompt)]
