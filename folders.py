"""Model folders the pack reads, registered with the host's folder_paths (extra_model_paths.yaml applies)."""
import os

import folder_paths

SAFETENSORS = {".safetensors", ".sft"}
TORCH_WEIGHTS = {".pt", ".pth", ".bin"}

ADAPTERS = "likeness"
IDENTITIES = "likeness_identities"

# key -> folders under models/, first one first (saves go to the first). Weights are safetensors only.
PACK_FOLDERS = {
    ADAPTERS: ("likeness",),   # adapters of the four methods, PromptNet
    # saved identities: PhotoVerse concepts, Inv-Adapter features, Taming object embeddings. A folder of their
    # own, so the adapter loaders never list them; files saved by earlier versions in likeness/concepts still load.
    IDENTITIES: ("likeness_identities", "likeness/concepts"),
}
LEGACY_IDENTITY_SUBFOLDER = "concepts"   # inside likeness/: not an adapter
# earlier versions' key for the identities folder, kept for code that still names it
ALIASES = {"likeness_concepts": IDENTITIES}
LABELS = {ADAPTERS: "models/likeness", IDENTITIES: "models/likeness_identities"}
# Other projects' published weights as their users download them (PyTorch files, read only with the host's
# weights-only loader and converted to safetensors): ELITE's global_mapper.pt / local_mapper.pt.
FOREIGN_FOLDERS = {"likeness_elite": "likeness/elite"}


def register_model_folders():
    for key, sub in FOREIGN_FOLDERS.items():
        path = os.path.join(folder_paths.models_dir, *sub.split("/"))
        paths = folder_paths.folder_names_and_paths.get(key, ([], set()))[0]
        folder_paths.folder_names_and_paths[key] = (paths + [path] if path not in paths else paths, TORCH_WEIGHTS)
    for key, subs in {**PACK_FOLDERS, **{alias: PACK_FOLDERS[key] for alias, key in ALIASES.items()}}.items():
        wanted = [os.path.join(folder_paths.models_dir, *sub.split("/")) for sub in subs]
        if key in folder_paths.folder_names_and_paths:
            paths, _ = folder_paths.folder_names_and_paths[key]
            for path in wanted:
                if path not in paths:
                    paths.append(path)
            folder_paths.folder_names_and_paths[key] = (paths, SAFETENSORS)
        else:
            # add_model_folder_path would give a new key an empty extension set (every file listed).
            folder_paths.folder_names_and_paths[key] = (wanted, SAFETENSORS)


def folder_label(key: str) -> str:
    return LABELS.get(ALIASES.get(key, key), f"the '{key}' model folder")


def _not_an_adapter(name: str) -> bool:
    """Files under models/likeness that are earlier versions' identities (ELITE's converted files are adapters)."""
    parts = name.replace("\\", "/").split("/", 1)
    return len(parts) == 2 and parts[0] == LEGACY_IDENTITY_SUBFOLDER


def safetensors_files(key: str) -> list[str]:
    names = [f for f in folder_paths.get_filename_list(key) if os.path.splitext(f)[1].lower() in SAFETENSORS]
    if ALIASES.get(key, key) == ADAPTERS:
        names = [f for f in names if not _not_an_adapter(f)]
    return names
