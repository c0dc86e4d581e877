"""Model folders the pack reads, registered with the host's folder_paths (extra_model_paths.yaml applies)."""
import os

import folder_paths

SAFETENSORS = {".safetensors", ".sft"}
TORCH_WEIGHTS = {".pt", ".pth", ".bin"}

# key -> folder name under models/. Weights are safetensors only.
PACK_FOLDERS = {
    "likeness": "likeness",                # adapters of the four methods
    "likeness_concepts": "likeness/concepts",  # saved concepts and inversion features
}
# Other projects' published weights as their users download them (PyTorch files, read only with the host's
# weights-only loader and converted to safetensors): ELITE's global_mapper.pt / local_mapper.pt.
FOREIGN_FOLDERS = {"likeness_elite": "likeness/elite"}


def register_model_folders():
    for key, sub in FOREIGN_FOLDERS.items():
        path = os.path.join(folder_paths.models_dir, *sub.split("/"))
        paths = folder_paths.folder_names_and_paths.get(key, ([], set()))[0]
        folder_paths.folder_names_and_paths[key] = (paths + [path] if path not in paths else paths, TORCH_WEIGHTS)
    for key, sub in PACK_FOLDERS.items():
        path = os.path.join(folder_paths.models_dir, *sub.split("/"))
        if key in folder_paths.folder_names_and_paths:
            paths, _ = folder_paths.folder_names_and_paths[key]
            if path not in paths:
                paths.append(path)
            folder_paths.folder_names_and_paths[key] = (paths, SAFETENSORS)
        else:
            # add_model_folder_path would give a new key an empty extension set (every file listed).
            folder_paths.folder_names_and_paths[key] = ([path], SAFETENSORS)


def safetensors_files(key: str) -> list[str]:
    return [f for f in folder_paths.get_filename_list(key) if os.path.splitext(f)[1].lower() in SAFETENSORS]
