"""Inv-Adapter trainer on micro models (docs/methods/inv-adapter.md): the reference latent is the inversion of the face
crop at the training t (exact grid points), the reference features are the frozen UNet's norm outputs there, only
the EAA learns and the loss falls on a fixed batch, a trained export changes Inv-Adapter Apply's image against
both the base model and the untrained adapter, and the same trainer runs on the micro SDXL with its `y`."""
import pytest
import torch

import micro as m
from fixtures_inv_adapter import direct_norm_features
from fixtures_train import (RES, assert_learns, base_models, config, encode, fixed_batch, install, one_thread,  # noqa: F401
                            sample, train_lib, write_folder)

OPTIONS = {"reference_size": RES, "s_c": 16, "inversion_steps": 3, "face_backend": "none"}


def make_trainer(base, root, **options):
    from comfyui_likeness.train.data import scan_images
    from comfyui_likeness.train.inv_adapter import InvAdapterTrainer

    records = scan_images(write_folder(str(root / "data"), ("a", "b"), per=1))
    tr = InvAdapterTrainer(base, {**OPTIONS, "cache_dir": str(root / "inversions"), **options}, records,
                           config(root, resolution=RES))
    tr.setup()
    return tr


@pytest.fixture(scope="module")
def trainer(pack, base_models, tmp_path_factory):
    tr = make_trainer(base_models, tmp_path_factory.mktemp("inv"))
    yield tr
    tr.close()


def test_reference_is_the_inversion_at_the_same_t(trainer, base_models):
    from comfyui_likeness.samplers.inversion import ddim_invert_trajectory

    batch = fixed_batch(trainer)
    prepared = trainer.prepare_batch(batch, torch.Generator().manual_seed(0))
    sigmas, latents = trainer.trajectories[0]
    assert sigmas.shape[0] == OPTIONS["inversion_steps"] + 1 and latents.shape[1:] == (4, RES // 8, RES // 8)
    # every training sigma is a point of that image's inversion grid
    for n, i in enumerate(batch["index"].tolist()):
        assert float(prepared["sigma"][n]) in [float(s) for s in trainer.trajectories[i][0][1:]]
    # the cached trajectory is the inversion of the face crop with its caption (recomputed independently)
    face = batch["face"][0]
    raw = base_models.vae.encode(face[None])
    want = ddim_invert_trajectory(base_models.model, encode(base_models.clip, trainer.caption_of(0)), {"samples": raw},
                                  OPTIONS["inversion_steps"])
    assert torch.allclose(want.latents[:, 0], latents, atol=1e-4)
    assert prepared["y"] is None  # SD1.x: no vector conditioning


def check_reference_features(trainer, base, prepared, indices, y_ref=None):
    """The features handed to the EAA equal the frozen UNet's norm1/norm2 outputs on Z^p at the training sigma."""
    from comfyui_likeness.core.layout import attention_layout

    layout = attention_layout(base.model)
    assert set(prepared["features"]) == {(site, s.key) for s in layout.sites for site in ("attn1", "attn2")}
    for n, i in enumerate(indices):
        sigmas, latents = trainer.trajectories[i]
        sigma = float(prepared["sigma"][n])
        k = [float(s) for s in sigmas].index(sigma)
        y = None if y_ref is None else y_ref[n:n + 1]
        direct = direct_norm_features(base.model, layout, latents[k][None], sigma, prepared["context"][n:n + 1].cpu(), y)
        for key, t in direct.items():
            got = prepared["features"][key][n:n + 1].cpu()
            assert torch.allclose(got, t, atol=1e-4, rtol=1e-4), (n, key)
        # at another sigma the reference branch gives other features: the check can tell
        other = float(sigmas[2 if k == 1 else 1])
        moved = direct_norm_features(base.model, layout, latents[k][None], other, prepared["context"][n:n + 1].cpu(), y)
        assert any(not torch.allclose(prepared["features"][key][n:n + 1].cpu(), moved[key], atol=1e-4) for key in moved)


def test_reference_features_are_the_frozen_unets_norm_outputs_at_the_training_sigma(trainer, base_models):
    batch = fixed_batch(trainer)
    prepared = trainer.prepare_batch(batch, torch.Generator().manual_seed(3))
    check_reference_features(trainer, base_models, prepared, batch["index"].tolist())


def test_only_the_eaa_learns_and_the_loss_falls(trainer, train_lib, base_models):
    assert_learns(train_lib["loop"].overfit_losses(trainer, fixed_batch(trainer), 5, 2e-3), "Inv-Adapter")
    trainable = {id(p) for p in trainer.module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in trainer.adapter.parameters()}
    assert all(p.grad is None for p in base_models.model.model.parameters())


def test_a_trained_export_changes_apply_against_the_base_and_the_untrained_adapter(pack, base_models, base_dir,
                                                                                  train_lib, tmp_path):
    from comfyui_likeness.nodes.inv_adapter import LikenessEAALoader, LikenessInvAdapterApply, LikenessInvAdapterExtract

    tr = make_trainer(base_models, tmp_path)
    try:
        untrained = LikenessEAALoader.execute(install(tr.export(str(tmp_path / "untrained")), base_dir,
                                                      "train_inv_eaa_untrained.safetensors")).result[0]
        assert_learns(train_lib["loop"].overfit_losses(tr, fixed_batch(tr), 8, 1e-2), "Inv-Adapter")
        path = tr.export(str(tmp_path / "trained"))
        trained = LikenessEAALoader.execute(install(path, base_dir, "train_inv_eaa.safetensors")).result[0]
        want = tr.adapter.state_dict()
        assert all(torch.allclose(v.float(), want[k], atol=2e-3, rtol=1e-2) for k, v in trained.state_dict().items())
        m_, clip = base_models.model, base_models.clip
        caption = encode(clip, tr.caption_of(0))
        face = fixed_batch(tr, 1)["face"]
        feats = LikenessInvAdapterExtract.execute(m_, base_models.vae, face, caption, 2, "ddim_uniform", RES,
                                                  "per-step features").result[0]
        positive, negative = encode(clip, "a photo of a face"), encode(clip, "")

        def image(adapter):
            patched = LikenessInvAdapterApply.execute(m_, feats, 1.0, True, True, 0.0, 1.0, "cond and uncond",
                                                      adapter=adapter).result[0]
            return sample(patched, positive, negative, scheduler="ddim_uniform")

        a, b, base = image(trained), image(untrained), sample(m_, positive, negative, scheduler="ddim_uniform")
        assert torch.isfinite(a).all()
        assert not torch.allclose(a, base, atol=1e-4)
        assert not torch.allclose(a, b, atol=1e-4), "the exported adapter is the untrained one"
    finally:
        tr.close()


# --- SDXL -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sdxl_base(pack):
    from comfyui_likeness.train.base_models import BaseModels
    return BaseModels(m.micro_sdxl_model(), m.micro_sdxl_clip(), m.micro_vae(), None, "micro_sdxl")


def test_the_trainer_runs_on_sdxl_with_both_branches_y(sdxl_base, train_lib, tmp_path):
    from comfyui_likeness.train.diffusion import size_conditioning_y

    reference = 2 * RES  # another size than the images: the two branches' y differ
    tr = make_trainer(sdxl_base, tmp_path, reference_size=reference)
    try:
        batch = fixed_batch(tr)
        prepared = tr.prepare_batch(batch, torch.Generator().manual_seed(1))
        context, pooled = tr.captions.with_pooled([tr.caption_of(i) for i in batch["index"].tolist()])
        assert torch.equal(prepared["y"].cpu(), size_conditioning_y(sdxl_base.model, pooled, RES, RES))
        assert prepared["y"].shape == (2, m.SDXL_ADM)
        y_ref = size_conditioning_y(sdxl_base.model, pooled, reference, reference)
        assert not torch.allclose(y_ref, prepared["y"].cpu())
        check_reference_features(tr, sdxl_base, prepared, batch["index"].tolist(), y_ref)
        # the generation branch runs with its y (an SDXL UNet without one would fail)
        assert_learns(train_lib["loop"].overfit_losses(tr, batch, 4, 2e-3), "Inv-Adapter on SDXL")
        assert any(k[2] == 1 for k in tr.adapter.spec.keys())  # transformer depth 2 in the adapter's layout
    finally:
        tr.close()
