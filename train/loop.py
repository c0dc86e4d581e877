"""The training loop shared by every method, on accelerate (one process, several GPUs, several machines).

accelerate launch starts one process per device; each builds the same trainer (same seed, so the same initial
weights; DDP also broadcasts rank 0's at wrap time), reads its own shard of the data, draws its own noise, and
DDP all-reduces the gradients, so the weights stay identical on every process. Mixed precision is accelerate's
autocast (weights stay fp32, a gradient scaler for fp16); gradient accumulation is accelerator.accumulate.
The main process writes logs (logs/train_log.jsonl and the Python logger), sample images (samples/), the
checkpoints (train/checkpoint.py) and the final adapter file; a tqdm bar shows progress on it.
"""
import json
import logging
import math
import os
import time

import torch

from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .data import collate
from .diffusion import gradients_on

log = logging.getLogger("likeness.train")


def learning_rate(trainer, config) -> float:
    return float(config.learning_rate or trainer.default_learning_rate)


def make_optimizer(trainer, config):
    lr = learning_rate(trainer, config)
    groups = trainer.param_groups(lr)
    if not any(g["params"] for g in groups):
        raise ValueError(f"the {trainer.name} trainer has nothing to train")
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    warmup = max(0, int(config.lr_warmup_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def save_images(images: torch.Tensor, path: str):
    """IMAGE (B, H, W, 3) -> one PNG, the images side by side."""
    import numpy as np
    from PIL import Image

    row = torch.cat(list(images.float().clamp(0, 1).cpu()), dim=1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((row.numpy() * 255).round().astype(np.uint8)).save(path)
    return path


class JsonlLog:
    def __init__(self, path: str | None):
        self.path = path
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(self, record: dict):
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def train(trainer, config, accelerator=None) -> dict:
    """Run a whole training; returns {"step", "export", "losses"} on every process (export on the main one)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from tqdm.auto import tqdm

    config.validate()
    if accelerator is None:
        accelerator = Accelerator(
            # accelerate only starts its multi-process CPU (gloo) mode when told it is on the CPU
            cpu=config.cpu or not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=trainer.find_unused_parameters)],
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
            log_with=config.report_to or None, project_dir=config.output_dir)
    main = accelerator.is_main_process
    set_seed(config.seed)                     # identical initial weights on every process
    trainer.setup()
    if config.report_to and main:
        accelerator.init_trackers(f"likeness_{trainer.name}", config=_flat(config.to_dict()))
    module = trainer.module
    optimizer, scheduler = make_optimizer(trainer, config)
    dataset = trainer.dataset()
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         num_workers=config.num_workers, collate_fn=collate)
    if len(loader) == 0:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than one batch of {config.batch_size}")
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    trainer.enter_training()
    noise = torch.Generator().manual_seed(config.seed * 1000 + 17 + accelerator.process_index)  # per process
    step, epoch, consumed = 0, 0, 0
    resume = resolve_resume(config.output_dir, config.resume)
    if resume:
        info = load_checkpoint(resume, accelerator.unwrap_model(module), optimizer, scheduler,
                               accelerator.scaler, accelerator.process_index, {"noise": noise})
        step, epoch, consumed = int(info["step"]), int(info.get("epoch", 0)), int(info.get("batches_in_epoch", 0))
        if main:
            log.info("Likeness trainer: resumed %s from %s (step %d)", trainer.name, resume, step)
    logs = JsonlLog(os.path.join(config.output_dir, "logs", "train_log.jsonl") if main else None)
    if main:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)
        log.info("Likeness trainer: %s, %d trainable parameters, %d processes, batch %d x %d accumulation, "
                 "mixed precision %s", trainer.name, trainer.trainable_count(), accelerator.num_processes,
                 config.batch_size, config.gradient_accumulation_steps, config.mixed_precision)
    bar = tqdm(total=config.max_steps, initial=step, disable=not main, desc=f"train {trainer.name}", unit="step")
    params = [p for p in module.parameters() if p.requires_grad]
    losses, window, t_last, last_logged = [], [], time.perf_counter(), step

    def export(directory):
        return trainer.export(directory, accelerator.unwrap_model(module))

    def checkpoint():
        save_checkpoint(config.output_dir, step, accelerator.unwrap_model(module), optimizer, scheduler,
                        accelerator.scaler, {"epoch": epoch, "batches_in_epoch": consumed, "method": trainer.name},
                        config.to_dict(), export, main, accelerator.process_index, {"noise": noise},
                        config.keep_checkpoints, accelerator.wait_for_everyone)

    with gradients_on():
        module.train()
        while step < config.max_steps:
            loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(loader, consumed) if consumed else loader
            for batch in batches:
                trainer.before_step()
                with accelerator.accumulate(module):
                    prepared = trainer.prepare_batch(batch, noise)
                    out = module(prepared)
                    accelerator.backward(out["loss"])
                    if accelerator.sync_gradients and config.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                consumed += 1
                window.append({"loss": float(out["loss"].detach()), **out.get("logs", {})})
                if not accelerator.sync_gradients:
                    continue
                lr = scheduler.get_last_lr()[0]   # the rate this step used
                scheduler.step()
                step += 1
                mean = {k: sum(w.get(k, 0.0) for w in window) / len(window) for k in window[0]}
                window = []
                reduced = accelerator.reduce(torch.tensor(mean["loss"], device=accelerator.device), "mean")
                mean["loss"] = float(reduced)
                losses.append(mean["loss"])
                if not math.isfinite(mean["loss"]):
                    raise FloatingPointError(f"the {trainer.name} loss became {mean['loss']} at step {step}; lower the "
                                             "learning rate or use bf16/fp32")
                bar.update(1)
                bar.set_postfix(loss=f"{mean['loss']:.4f}")
                if main and (step % max(1, config.log_every) == 0 or step == config.max_steps):
                    now = time.perf_counter()
                    record = {"step": step, "epoch": epoch, "lr": lr, **mean,
                              "seconds_per_step": (now - t_last) / max(1, step - last_logged)}
                    t_last, last_logged = now, step
                    logs.write(record)
                    log.info("Likeness trainer %s: %s", trainer.name, json.dumps(record))
                    if config.report_to:
                        accelerator.log(mean, step=step)
                if config.sample_every and step % config.sample_every == 0:
                    if main:
                        _sample(trainer, accelerator.unwrap_model(module), config, step)
                    accelerator.wait_for_everyone()
                if config.checkpoint_every and step % config.checkpoint_every == 0:
                    checkpoint()
                if step >= config.max_steps:
                    break
            else:
                epoch += 1
                consumed = 0
    bar.close()
    if not (config.checkpoint_every and step % config.checkpoint_every == 0):
        checkpoint()
    path = None
    if main:
        path = trainer.export(config.output_dir, accelerator.unwrap_model(module))
        log.info("Likeness trainer: %s written to %s", trainer.name, path)
    accelerator.wait_for_everyone()
    if config.report_to:
        accelerator.end_training()
    return {"step": step, "export": path, "losses": losses, "accelerator": accelerator, "module": module}


def _sample(trainer, module, config, step):
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            images = trainer.sample_images(module, config.sample_steps)
        if images is not None:
            save_images(images, os.path.join(config.output_dir, "samples", f"step_{step:06d}.png"))
    except Exception:
        log.exception("Likeness trainer: making sample images at step %d failed; training goes on", step)
    finally:
        module.train(was_training)


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def overfit_losses(trainer, batch: dict, steps: int, learning_rate: float, seed: int = 0) -> list[float]:
    """One fixed prepared batch (same noise and timesteps every step), plain AdamW: the losses. A trainer that
    cannot fit one batch has a broken gradient path (the CI check, also --overfit-check on the command line)."""
    trainer.enter_training()
    generator = torch.Generator().manual_seed(seed)
    with gradients_on():
        prepared = trainer.prepare_batch(batch, generator)
        params = [p for p in trainer.module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        losses = []
        for _ in range(steps):
            trainer.before_step()
            out = trainer.module(prepared)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            losses.append(float(out["loss"].detach()))
    return losses
