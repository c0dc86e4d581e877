"""What every method trainer provides to the shared loop (train/loop.py).

A trainer owns the frozen base models (BaseModels), builds its trainable modules on the pack's own encoder and
attention modules (the ones inference uses), and exposes:
  module            an nn.Module whose forward(prepared batch) returns {"loss": tensor, "logs": {name: float}};
                    its parameters that require grad are what is trained (and what DDP synchronises); the frozen
                    UNet is reached through the training ModelPatcher, never registered as a submodule unless it
                    is itself trained
  dataset()         a torch Dataset of items (train/data.py)
  prepare_batch()   the no-gradient part of a step on the process's device: VAE latents, CLIP features, noise,
                    timesteps (drawn from the given generator)
  export(dir)       the adapter in the pack's file format; returns its path
  sample_images()   a few images made with the inference nodes' own code path and the current weights
  close()           restores the base models (requires_grad flags, loaded weight wrappers)
"""
import contextlib
import logging

import torch

from .diffusion import frozen, load_models, normal_tensors, unload

log = logging.getLogger("likeness.train")


class MethodTrainer:
    name = "method"
    file_name = "adapter.safetensors"
    find_unused_parameters = False
    default_learning_rate = 1e-4

    def __init__(self, base, options: dict | None = None):
        self.base = base
        self.options = dict(options or {})
        self.module: torch.nn.Module | None = None
        self.train_patcher = None
        self.companions = []        # other ModelPatchers that must stay loaded during a step
        self._freeze = contextlib.ExitStack()
        self._frozen = False
        self._entered = False

    # --- lifecycle ------------------------------------------------------------------------------------------
    def option(self, key, default):
        return self.options.get(key, default)

    def freeze_base(self):
        """requires_grad off on everything of the base models (restored by close)."""
        if not self._frozen:
            b = self.base
            mods = [getattr(getattr(b, "model", None), "model", None), getattr(b.clip, "cond_stage_model", None),
                    getattr(b.vae, "first_stage_model", None), getattr(b.clip_vision, "model", None)]
            self._freeze.enter_context(frozen(*mods))
            self._frozen = True

    def setup(self):
        """Build the trainable modules and the training patcher. Subclasses call freeze_base() first."""
        raise NotImplementedError

    def before_step(self):
        load_models(self.train_patcher, *self.companions)

    def enter_training(self):
        """Called by the loops after setup: loads the training patcher, then makes sure autograd can use the base
        models' tensors (normal_tensors; undone by close)."""
        self.before_step()
        if not self._entered:
            b = self.base
            self._freeze.enter_context(normal_tensors(getattr(getattr(b, "model", None), "model", None),
                                                      getattr(b.clip, "cond_stage_model", None),
                                                      getattr(b.vae, "first_stage_model", None)))
            self._entered = True

    def close(self):
        if self.train_patcher is not None:
            unload(self.train_patcher)
        self._freeze.close()
        self._frozen = self._entered = False

    # --- the step ---------------------------------------------------------------------------------------------
    def dataset(self):
        raise NotImplementedError

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        raise NotImplementedError

    def param_groups(self, learning_rate: float) -> list:
        params = [p for p in self.module.parameters() if p.requires_grad]
        return [{"params": params, "lr": learning_rate}]

    # --- outputs ----------------------------------------------------------------------------------------------
    def export(self, directory: str, module=None) -> str:
        raise NotImplementedError

    def sample_images(self, module=None, steps: int = 30):
        return None

    def hyperparameters(self) -> dict:
        return {"method": self.name, **self.options}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad)
