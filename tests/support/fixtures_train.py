"""Shared pieces of the trainer tests: micro base models (tests/support/micro.py), small image folders written at test
time, a one-thread setting for the tests' duration (the micro models are too small to gain from threads and CI
has two cores), and helpers to run the inference nodes on what a trainer exported."""
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import micro as m

RES = 64   # micro models: 64 px images, 8 x 8 latents


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def train_lib(pack):
    from comfyui_likeness.train import (base_models, checkpoint, config, data, diffusion, face_data, loop,
                                        optim_state, profusion)
    return {"base": base_models, "ckpt": checkpoint, "config": config, "data": data, "diff": diffusion,
            "faces": face_data, "loop": loop, "optim": optim_state, "profusion": profusion}


def micro_base(seed=0, inference_mode=False):
    """BaseModels of micro models; inference_mode builds them as a running host's loaders would (every tensor an
    inference tensor)."""
    from comfyui_likeness.train.base_models import BaseModels

    if inference_mode:
        with torch.inference_mode():
            return BaseModels(m.micro_model(seed=seed), m.micro_clip(), m.micro_vae(), m.micro_clip_vision(), "micro")
    return BaseModels(m.micro_model(seed=seed), m.micro_clip(), m.micro_vae(), m.micro_clip_vision(), "micro")


@pytest.fixture(scope="session")
def base_models(pack):
    return micro_base()


def noise_image(seed, h=80, w=96):
    """A smooth random colour field (IMAGE-like array, uint8)."""
    g = np.random.RandomState(seed)
    coarse = g.rand(5, 6, 3)
    img = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    return np.clip(img + g.rand(h, w, 3) * 25, 0, 255).astype(np.uint8)


def write_folder(root, identities=("anna", "ben"), per=2, captions=True, size=(80, 96)):
    """root/<identity>/img<i>.png with sidecar captions; returns the folder."""
    os.makedirs(root, exist_ok=True)
    for k, ident in enumerate(identities):
        os.makedirs(os.path.join(root, ident), exist_ok=True)
        for i in range(per):
            Image.fromarray(noise_image(10 * k + i, *size)).save(os.path.join(root, ident, f"img{i}.png"))
            if captions:
                with open(os.path.join(root, ident, f"img{i}.txt"), "w") as f:
                    f.write(f"a photo of {ident}, picture {i}\n")
    return root


def config(tmp_path, **kw):
    from comfyui_likeness.train.config import TrainConfig

    defaults = dict(output_dir=str(tmp_path / "run"), resolution=RES, batch_size=2, max_steps=2, checkpoint_every=0,
                    log_every=1, sample_steps=2)
    defaults.update(kw)
    return TrainConfig(**defaults)


def fixed_batch(trainer, n=2):
    from comfyui_likeness.train.data import collate

    ds = trainer.dataset()
    return collate([ds[i] for i in range(n)])


def assert_learns(losses, what):
    assert all(np.isfinite(losses)), f"{what}: non-finite loss {losses}"
    assert losses[-1] < losses[0], f"{what}: the loss did not decrease on a fixed batch: {losses}"


def install(path, base_dir, name):
    """Copy an exported file into the host's models/likeness folder under `name`."""
    target = os.path.join(base_dir, "models", "likeness", name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy(path, target)
    return name


def sample(model, positive, negative, steps=2, seed=0, size=8, sampler="euler", scheduler="normal"):
    import comfy.sample

    latent = torch.zeros(1, 4, size, size)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, 5.0, sampler, scheduler,
                               positive, negative, latent, seed=seed, disable_pbar=True)


def encode(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]
