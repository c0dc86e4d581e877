"""Optimizer, scheduler, gradient-scaler and RNG state as safetensors + JSON: no pickle anywhere.

accelerate's save_state writes the optimizer with torch.save (a pickle), which this pack never reads back. Here
a torch optimizer's state_dict() is split into its tensors (safetensors, keys "state.<param index>.<name>") and
everything else (param_groups, non-tensor per-parameter values such as a float 'step') as JSON in the file's
metadata. Reading rebuilds the same state_dict() and hands it to optimizer.load_state_dict, which checks that
the parameter groups match.
"""
import json
import random

import torch

from ..weights.safetensors_file import WeightFileError, load_file, register_format, save_file

OPTIMIZER_FORMAT, RNG_FORMAT = "likeness.train.optimizer", "likeness.train.rng"
VERSION = 1
register_format(OPTIMIZER_FORMAT, "optimizer state file")
register_format(RNG_FORMAT, "random-number state file")

_TUPLE_KEYS = ("betas",)


def _json_value(value, where: str):
    try:
        json.dumps(value)
    except TypeError as e:
        raise TypeError(f"{where} holds {type(value).__name__}, which cannot be stored without pickle") from e
    return value


def optimizer_to_tensors(optimizer_state: dict) -> tuple[dict, dict]:
    """A torch optimizer state_dict() -> (tensors, JSON-able metadata)."""
    tensors, scalars = {}, {}
    for index, per_param in optimizer_state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{int(index)}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(int(index)), {})[name] = _json_value(value, f"optimizer state {name}")
    groups = [{k: _json_value(list(v) if isinstance(v, tuple) else v, f"param group {k}") for k, v in g.items()}
              for g in optimizer_state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_tensors(tensors: dict, meta: dict) -> dict:
    state = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        groups.append({k: (tuple(v) if k in _TUPLE_KEYS and isinstance(v, list) else v) for k, v in g.items()})
    return {"state": state, "param_groups": groups}


def save_optimizer(path: str, optimizer, scheduler=None, scaler=None, extra: dict | None = None) -> str:
    tensors, meta = optimizer_to_tensors(optimizer.state_dict())
    if not tensors:  # safetensors wants at least one tensor; an optimizer that never stepped has none
        tensors = {"empty": torch.zeros(1)}
    if scheduler is not None:
        meta["scheduler"] = _json_value(scheduler.state_dict(), "scheduler state")
    if scaler is not None:
        meta["scaler"] = _json_value(scaler.state_dict(), "gradient-scaler state")
    meta.update(extra or {})
    return save_file(path, tensors, OPTIMIZER_FORMAT, VERSION, meta)


def load_optimizer(path: str, optimizer, scheduler=None, scaler=None, map_location="cpu") -> dict:
    """Restores the optimizer (and scheduler, scaler) in place; returns the file's metadata."""
    tensors, meta = load_file(path, OPTIMIZER_FORMAT, (VERSION,), "optimizer state file", device=map_location)
    tensors.pop("empty", None)
    for k in ("param_groups", "scalars", "scheduler", "scaler"):
        if isinstance(meta.get(k), str):
            meta[k] = json.loads(meta[k])
    state = optimizer_from_tensors(tensors, meta)
    if len(state["param_groups"]) != len(optimizer.param_groups):
        raise WeightFileError(f"'{path}' holds {len(state['param_groups'])} parameter groups but the optimizer has "
                              f"{len(optimizer.param_groups)}: it belongs to another trainer configuration")
    for saved, own in zip(state["param_groups"], optimizer.param_groups):
        if len(saved["params"]) != len(own["params"]):
            raise WeightFileError(f"'{path}' was saved for {len(saved['params'])} parameters in a group where the "
                                  f"optimizer has {len(own['params'])}: it belongs to another trainer configuration")
    optimizer.load_state_dict(state)
    if scheduler is not None and isinstance(meta.get("scheduler"), dict):
        scheduler.load_state_dict(meta["scheduler"])
    if scaler is not None and isinstance(meta.get("scaler"), dict):
        scaler.load_state_dict(meta["scaler"])
    return meta


# --- random-number state of one process -----------------------------------------------------------------------

def save_rng(path: str, generators: dict | None = None) -> str:
    """torch CPU (and CUDA) state as tensors, Python's random state as JSON; named torch.Generators too."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    for name, g in (generators or {}).items():
        tensors[f"generator.{name}"] = g.get_state()
    version, state, gauss = random.getstate()
    return save_file(path, tensors, RNG_FORMAT, VERSION, {"python": [version, list(state), gauss]})


def load_rng(path: str, generators: dict | None = None):
    tensors, meta = load_file(path, RNG_FORMAT, (VERSION,), "random-number state file")
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    for name, g in (generators or {}).items():
        if f"generator.{name}" in tensors:
            g.set_state(tensors[f"generator.{name}"])
    py = meta["python"]
    if isinstance(py, str):
        py = json.loads(py)
    random.setstate((py[0], tuple(py[1]), py[2]))
