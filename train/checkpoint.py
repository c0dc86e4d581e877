"""Training checkpoints and resume, safetensors only.

    <output_dir>/checkpoints/step_000500/
        trainable.safetensors     the trainable tensors (fp32, their state_dict names) + the run's config
        optimizer.safetensors     optimizer tensors; param groups, scheduler and gradient scaler as JSON metadata
        rng_rank<r>.safetensors   each process's random-number state
        <method file>             the adapter exported in the pack's own format (loads in the Apply/Load node)
        state.json                step, epoch, batches consumed in the epoch, method; written last

A checkpoint is complete when state.json exists; resume="latest" takes the complete one with the highest step.
"""
import json
import logging
import os
import re
import shutil

import torch

from ..weights.safetensors_file import load_file, register_format, save_file
from .optim_state import load_optimizer, load_rng, save_optimizer, save_rng

log = logging.getLogger("likeness.train")

TRAINABLE_FORMAT = "likeness.train.trainable"
VERSION = 1
register_format(TRAINABLE_FORMAT, "trainable-state file")
STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoint_root(output_dir), f"step_{int(step):06d}")


def complete_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    root = checkpoint_root(output_dir)
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, "state.json")):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def resolve_resume(output_dir: str, resume: str | None) -> str | None:
    """None/'' -> None; 'latest' -> the newest complete checkpoint (None if there is none); else a directory."""
    if not resume:
        return None
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    if not os.path.isfile(os.path.join(resume, "state.json")):
        raise FileNotFoundError(f"resume: '{resume}' is not a complete training checkpoint (no state.json in it)")
    return resume


def trainable_state(module: torch.nn.Module) -> dict:
    """The tensors that training changes: every parameter that requires grad, plus all buffers."""
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    buffers = dict(module.named_buffers())
    return {k: v.detach().float().cpu().contiguous() for k, v in {**params, **buffers}.items()
            if v.is_floating_point()}


def save_checkpoint(output_dir: str, step: int, module, optimizer, scheduler=None, scaler=None, state: dict | None = None,
                    config: dict | None = None, export=None, is_main: bool = True, process_index: int = 0,
                    generators: dict | None = None, keep: int = 0, barrier=None) -> str:
    """Write one checkpoint. Every process writes its RNG file; the main process writes the rest, then
    state.json (after `barrier`, so the RNG files are there). export(path_dir) writes the method's file."""
    final = step_dir(output_dir, step)
    os.makedirs(final, exist_ok=True)
    save_rng(os.path.join(final, f"rng_rank{process_index}.safetensors"), generators)
    if is_main:
        save_file(os.path.join(final, "trainable.safetensors"), trainable_state(module), TRAINABLE_FORMAT, VERSION,
                  {"step": int(step), "config": config or {}})
        save_optimizer(os.path.join(final, "optimizer.safetensors"), optimizer, scheduler, scaler)
        if export is not None:
            export(final)
    if barrier is not None:
        barrier()
    if is_main:
        info = {"step": int(step), **(state or {})}
        tmp = os.path.join(final, "state.json.tmp")
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2)
        os.replace(tmp, os.path.join(final, "state.json"))
        if keep > 0:
            for _, old in complete_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        log.info("Likeness trainer: checkpoint at step %d written to %s", step, final)
    if barrier is not None:
        barrier()
    return final


def load_checkpoint(path: str, module, optimizer, scheduler=None, scaler=None, process_index: int = 0,
                    generators: dict | None = None) -> dict:
    """Restore module tensors, optimizer, scheduler, scaler and this process's RNG; returns state.json."""
    with open(os.path.join(path, "state.json")) as f:
        info = json.load(f)
    tensors, _ = load_file(os.path.join(path, "trainable.safetensors"), TRAINABLE_FORMAT, (VERSION,),
                           "trainable-state file")
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    missing = [k for k in trainable_state(module) if k not in tensors]
    unknown = [k for k in tensors if k not in own]
    if missing or unknown:
        raise ValueError(f"the checkpoint '{path}' does not fit this trainer: {len(missing)} trainable tensors are "
                         f"missing (e.g. {missing[:2]}), {len(unknown)} are unknown (e.g. {unknown[:2]}); resume "
                         "with the configuration it was written with")
    with torch.no_grad():
        for k, v in tensors.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise ValueError(f"the checkpoint '{path}' has {k} of shape {tuple(v.shape)}, the trainer "
                                 f"{tuple(own[k].shape)}: resume with the configuration it was written with")
            own[k].copy_(v.to(own[k].dtype))
    load_optimizer(os.path.join(path, "optimizer.safetensors"), optimizer, scheduler, scaler)
    rng = os.path.join(path, f"rng_rank{process_index}.safetensors")
    if os.path.isfile(rng):
        load_rng(rng, generators)
    else:
        log.warning("Likeness trainer: %s has no random-number state for process %d; continuing with a fresh one",
                    path, process_index)
    return info
