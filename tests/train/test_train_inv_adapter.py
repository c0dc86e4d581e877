"""Inv-Adapter trainer on micro models (docs/methods/inv-adapter.md): the reference latent is the inversion of the face crop at
the training t (exact grid points), only the EAA learns, the loss falls on a fixed batch, and the exported file
loads in Load Inv-Adapter EAA and changes what Inv-Adapter Apply makes."""
import pytest
import torch

from fixtures_train import (RES, assert_learns, base_models, config, encode, fixed_batch, install, one_thread,  # noqa: F401
                            sample, train_lib, write_folder)

OPTIONS = {"reference_size": RES, "s_c": 16, "inversion_steps": 3, "face_backend": "none"}


@pytest.fixture(scope="module")
def trainer(pack, base_models, tmp_path_factory):
    from comfyui_likeness.train.data import scan_images
    from comfyui_likeness.train.inv_adapter import InvAdapterTrainer

    root = tmp_path_factory.mktemp("inv")
    records = scan_images(write_folder(str(root / "data"), ("a", "b"), per=1))
    tr = InvAdapterTrainer(base_models, {**OPTIONS, "cache_dir": str(root / "inversions")}, records,
                           config(root, resolution=RES))
    tr.setup()
    yield tr
    tr.close()


def test_reference_is_the_inversion_at_the_same_t(trainer, base_models):
    from comfyui_likeness.samplers.inversion import ddim_invert_trajectory

    batch = fixed_batch(trainer)
    prepared = trainer.prepare_batch(batch, torch.Generator().manual_seed(0))
    sigmas, latents = trainer.trajectories[0]
    assert sigmas.shape[0] == OPTIONS["inversion_steps"] + 1 and latents.shape[1:] == (4, RES // 8, RES // 8)
    # every training sigma is a point of that image's inversion grid (INV7)
    for n, i in enumerate(batch["index"].tolist()):
        assert float(prepared["sigma"][n]) in [float(s) for s in trainer.trajectories[i][0][1:]]
    # the cached trajectory is the inversion of the face crop with its caption (recomputed independently)
    face = batch["face"][0]
    raw = base_models.vae.encode(face[None])
    want = ddim_invert_trajectory(base_models.model, encode(base_models.clip, trainer.caption_of(0)), {"samples": raw},
                                  OPTIONS["inversion_steps"])
    assert torch.allclose(want.latents[:, 0], latents, atol=1e-4)
    # features captured for every attention input of every block, per sample
    from comfyui_likeness.core.layout import attention_layout

    sites = attention_layout(base_models.model).sites
    assert len(prepared["features"]) == 2 * len(sites)
    shapes = {k: tuple(v.shape) for k, v in prepared["features"].items()}
    assert all(s[0] == 2 for s in shapes.values()), shapes


def test_only_the_eaa_learns_and_the_loss_falls(trainer, train_lib, base_models):
    assert_learns(train_lib["loop"].overfit_losses(trainer, fixed_batch(trainer), 5, 2e-3), "Inv-Adapter")
    trainable = {id(p) for p in trainer.module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in trainer.adapter.parameters()}
    assert all(p.grad is None for p in base_models.model.model.parameters())


def test_exported_eaa_loads_and_changes_inv_adapter_apply(trainer, base_models, base_dir, tmp_path):
    from comfyui_likeness.nodes.inv_adapter import LikenessEAALoader, LikenessInvAdapterApply, LikenessInvAdapterExtract

    path = trainer.export(str(tmp_path))
    adapter = LikenessEAALoader.execute(install(path, base_dir, "train_inv_eaa.safetensors")).result[0]
    want = trainer.adapter.state_dict()
    assert all(torch.allclose(v.float(), want[k], atol=2e-3, rtol=1e-2) for k, v in adapter.state_dict().items())
    m, clip = base_models.model, base_models.clip
    caption = encode(clip, trainer.caption_of(0))
    face = fixed_batch(trainer, 1)["face"]
    feats = LikenessInvAdapterExtract.execute(m, base_models.vae, face, caption, 2, "ddim_uniform", RES,
                                              "per-step features").result[0]
    patched = LikenessInvAdapterApply.execute(m, feats, 1.0, True, True, 0.0, 1.0, "cond and uncond",
                                              adapter=adapter).result[0]
    positive, negative = encode(clip, "a photo of a face"), encode(clip, "")
    a = sample(patched, positive, negative, scheduler="ddim_uniform")
    b = sample(m, positive, negative, scheduler="ddim_uniform")
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)
