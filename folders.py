"""Model folders the pack reads, registered with the host's folder_paths (extra_model_paths.yaml applies)."""
import os

import folder_paths

SAFETENSORS = {".safetensors", ".sft"}

# key -> folder name under models/. Weights are safetensors only.
PACK_FOLDERS = {
    "likeness": "likeness",                # adapters of the four methods
    "likeness_concepts": "likeness/concepts",  # saved concepts and inversion features
}


def register_model_folders():
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
