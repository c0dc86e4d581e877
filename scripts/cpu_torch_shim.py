"""Import hook that lets PyPI's CUDA builds of torchvision/torchaudio import on a CPU-only torch.

Installed by scripts/setup_host.sh as a .pth file in the test host's venv (CPU route only). It does nothing
until torchvision.extension or torchaudio._extension.utils is imported:
- torchvision: when its compiled _C is unusable, declare the nms/qnms operator schemas (so the meta
  registrations that run at import time find them) and give nms a plain CPU kernel;
- torchaudio: treat a library that fails to load as absent instead of raising.
"""
import importlib.abc
import importlib.util
import sys

_HOOKED = {"torchvision.extension", "torchaudio._extension.utils"}
_libraries = []


def _cpu_nms(boxes, scores, iou_threshold):
    import torch

    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    removed = torch.zeros(len(boxes), dtype=torch.bool)
    kept = []
    for i in order.tolist():
        if removed[i]:
            continue
        kept.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        removed |= inter / (area[i] + area - inter) > iou_threshold
    return torch.tensor(kept, dtype=torch.long, device=boxes.device)


def _after_import(name, module):
    if name == "torchvision.extension" and not module._has_ops():
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.impl("nms", _cpu_nms, "CPU")
        _libraries.append(lib)
        module._assert_has_ops = lambda: None
    elif name == "torchaudio._extension.utils":
        load = module._load_lib

        def tolerant_load(lib):
            try:
                return load(lib)
            except OSError:
                return False

        module._load_lib = tolerant_load


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _after_import(fullname, module)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(f, _Hook) for f in sys.meta_path):
    sys.meta_path.insert(0, _Hook())
