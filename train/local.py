"""A single-process loop for training inside a running ComfyUI (the fine-tuning node): the same trainer and step
module as the accelerate loop, with the host's progress bar and interruption, autocast on GPUs, and no
dependency on accelerate."""
import logging

import torch

from .data import collate
from .diffusion import gradients_on

log = logging.getLogger("likeness.train")


def _autocast(device: torch.device, model_dtype):
    if device.type == "cuda" and model_dtype in (torch.float16, torch.bfloat16):
        return torch.autocast("cuda", dtype=model_dtype), model_dtype == torch.float16
    return torch.autocast(device.type, enabled=False), False


def train_local(trainer, steps: int, batch_size: int, learning_rate: float, seed: int = 0, weight_decay: float = 1e-2,
                max_grad_norm: float = 0.0, progress=None) -> list[float]:
    """Runs `steps` optimizer steps; progress(step, total, loss) is called after each (it may raise to stop).
    The trainer must be set up; the caller closes it."""
    import comfy.model_management

    params = [p for p in trainer.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, betas=(0.9, 0.999), weight_decay=weight_decay, eps=1e-8)
    dataset = trainer.dataset()
    batch_size = max(1, min(int(batch_size), len(dataset))) if len(dataset) else int(batch_size)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.Generator().manual_seed(int(seed) + 17)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=g,
                                         collate_fn=collate)
    device = trainer.train_patcher.load_device
    autocast, use_scaler = _autocast(torch.device(device), trainer.train_patcher.model.get_dtype())
    scaler = torch.amp.GradScaler("cuda") if use_scaler else None
    losses = []
    with gradients_on():
        trainer.enter_training()
        trainer.module.train()
        it = iter(loader)
        for step in range(int(steps)):
            comfy.model_management.throw_exception_if_processing_interrupted()
            try:
                batch = next(it)
            except StopIteration:
                it = iter(loader)
                batch = next(it)
            trainer.before_step()
            prepared = trainer.prepare_batch(batch, noise)
            with autocast:
                loss = trainer.module(prepared)["loss"]
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            value = float(loss.detach())
            if value != value or value in (float("inf"), float("-inf")):
                raise FloatingPointError(f"the {trainer.name} loss became {value} at step {step + 1}; lower the "
                                         "learning rate")
            losses.append(value)
            if progress is not None:
                progress(step + 1, int(steps), value)
    trainer.module.eval()
    return losses
