"""ComfyUI-Likeness: one-shot subject and identity customization nodes (PhotoVerse, Inv-Adapter,
Taming Encoder, ProFusion). Importing this package registers model folders and nodes; nothing heavy or
optional is imported here."""
from .folders import register_model_folders
from .nodes import collect_nodes

register_model_folders()

NODE_CLASS_MAPPINGS = collect_nodes()
NODE_DISPLAY_NAME_MAPPINGS = {k: v.GET_SCHEMA().display_name or k for k, v in NODE_CLASS_MAPPINGS.items()}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
