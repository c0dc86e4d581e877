"""Where insightface model packs live: models/insightface/models/<pack>/*.onnx, the folder users of IPAdapter,
InstantID and PuLID already have. Registered with the host's folder_paths under the key "insightface", so
extra_model_paths.yaml entries with that key are searched too. Nothing here imports insightface."""
import glob
import logging
import os
from dataclasses import dataclass

from .errors import FaceModelMissing

log = logging.getLogger("likeness.faces")

FOLDER_KEY = "insightface"
ONNX = {".onnx"}

# What the two packs users have contain (from the insightface model zoo zips); used in messages only.
KNOWN_PACKS = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx", "2d106det.onnx", "1k3d68.onnx", "genderage.onnx"),
}


def register_insightface_folder():
    """Make models/insightface a known model folder (idempotent; keeps paths and extensions others added)."""
    import folder_paths

    default = os.path.join(folder_paths.models_dir, "insightface")
    if FOLDER_KEY in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER_KEY]
        if default not in paths:
            paths.append(default)
        # an empty extension set means "every file" (what add_model_folder_path gives a new key): keep it
        exts = set(exts) | ONNX if exts else exts
        folder_paths.folder_names_and_paths[FOLDER_KEY] = (paths, exts)
    else:
        folder_paths.folder_names_and_paths[FOLDER_KEY] = ([default], set(ONNX))


def insightface_roots() -> list:
    try:
        import folder_paths
    except ImportError:
        return []
    register_insightface_folder()
    return folder_paths.get_folder_paths(FOLDER_KEY)


def _onnx_files(folder: str) -> list:
    return sorted(glob.glob(os.path.join(folder, "*.onnx")))


def available_packs() -> list:
    """Pack names found under every registered insightface folder (including the two common misplacements)."""
    names = set()
    for root in insightface_roots():
        for base in (os.path.join(root, "models"), root):
            if not os.path.isdir(base):
                continue
            for entry in os.scandir(base):
                if entry.is_dir() and entry.name != "models" and (
                        _onnx_files(entry.path) or _onnx_files(os.path.join(entry.path, entry.name))):
                    names.add(entry.name)
    return sorted(names)


@dataclass
class PackLocation:
    name: str
    folder: str            # the folder that holds the .onnx files
    root: str              # the insightface folder it was found under
    misplaced: str = ""    # a note when the files are not where other packs expect them

    @property
    def onnx_files(self) -> list:
        return _onnx_files(self.folder)


def check_pack_name(name: str) -> str:
    name = (name or "").strip()
    if not name or name in (".", "..") or os.sep in name or "/" in name or (os.altsep and os.altsep in name):
        raise ValueError(f"insightface_pack: '{name}' is not a pack name (a folder name such as antelopev2 or buffalo_l)")
    return name


def locate_pack(name: str, roots=None) -> PackLocation:
    """Find a pack by name, checking the files before anything insightface could try to download."""
    name = check_pack_name(name)
    roots = insightface_roots() if roots is None else list(roots)
    empty = []
    for root in roots:
        canonical = os.path.join(root, "models", name)
        if _onnx_files(canonical):
            return PackLocation(name, canonical, root)
        nested = os.path.join(canonical, name)
        if _onnx_files(nested):
            return PackLocation(name, nested, root, misplaced=(
                f"the {name} files are one folder too deep ({nested}); the zip holds a folder of the same name. "
                f"Move them up to {canonical} so other packs (IPAdapter, InstantID, PuLID) find them too"))
        flat = os.path.join(root, name)
        if _onnx_files(flat):
            return PackLocation(name, flat, root, misplaced=(
                f"the {name} files are in {flat}; insightface expects them in {canonical} (note the 'models' folder). "
                "Move the folder there so other packs find it too"))
        if os.path.isdir(canonical):
            empty.append(canonical)
    raise FaceModelMissing(missing_pack_message(name, roots, empty))


def missing_pack_message(name: str, roots, empty_folders=()) -> str:
    where = [os.path.join(r, "models", name) for r in roots] or ["ComfyUI/models/insightface/models/" + name]
    lines = [f"insightface model pack '{name}' not found. Searched: {', '.join(where)}."]
    for folder in empty_folders:
        lines.append(f"The folder {folder} exists but holds no .onnx files.")
    files = KNOWN_PACKS.get(name)
    example = files[0] if files else "det_10g.onnx"
    lines.append(f"Download {name}.zip from the insightface model zoo and unzip it so the .onnx files sit directly in "
                 f"{where[0]} (for example {os.path.join(where[0], example)}).")
    if files:
        lines.append(f"That pack holds: {', '.join(files)}.")
    lines.append("Careful: the antelopev2 zip contains a folder named antelopev2; unzipping it inside "
                 "models/insightface/models/antelopev2 puts the files one level too deep (antelopev2/antelopev2/*.onnx).")
    lines.append("This pack never downloads models. Without insightface models, choose the 'blazeface' or 'opencv' "
                 "backend (no download; no identity embeddings).")
    lines.append("insightface's pretrained models are licensed for non-commercial research use only.")
    return " ".join(lines)
