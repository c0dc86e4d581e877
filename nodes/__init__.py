"""ComfyUI node classes, one module per family. Each module lists its classes in NODES."""
import importlib
import logging

from .validation import install_input_checks

log = logging.getLogger("likeness")

# Families in menu order. A family whose module fails to import is logged and skipped, so one broken
# optional piece never takes the whole pack down.
FAMILIES = ("prompt", "fusion", "inversion", "faces", "inv_adapter", "photoverse", "taming", "promptnet", "training")


def collect_nodes() -> dict:
    mapping = {}
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"{__name__}.{family}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{family}":
                continue  # family not written yet
            log.exception("Likeness: the %s nodes could not be loaded", family)
            continue
        except Exception:
            log.exception("Likeness: the %s nodes could not be loaded", family)
            continue
        for cls in module.NODES:
            install_input_checks(cls)   # NaN/inf, missing files and unsafe save names refused at /prompt
            node_id = cls.GET_SCHEMA().node_id
            if node_id in mapping:
                raise RuntimeError(f"duplicate node id {node_id}")
            mapping[node_id] = cls
    return mapping
