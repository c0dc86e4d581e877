"""Taming Encoder trainer on micro models (docs/methods/taming-encoder.md): cross-reference with probability omega, the null
embedding for general-domain samples, the domain ratio r, the zero-initialised gates opening as it learns, the
whole-UNet option, and the exported file driving Taming Encoder Apply."""
import os

import pytest
import torch

from fixtures_train import (RES, assert_learns, base_models, config, encode, fixed_batch, install, micro_base,  # noqa: F401
                            one_thread, sample, train_lib, write_folder)

OPTIONS = {"queries": 4, "depth": 1, "face_backend": "none"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("taming")
    return {"domain": write_folder(str(root / "faces"), ("a", "b"), per=2),
            "general": write_folder(str(root / "general"), ("scenery",), per=2), "root": root}


def make(base, folders, **options):
    from comfyui_likeness.train.data import scan_images
    from comfyui_likeness.train.taming import TamingTrainer

    return TamingTrainer(base, {**OPTIONS, **options}, scan_images(folders["domain"]),
                         config(folders["root"], resolution=RES))


def test_cross_reference_null_embedding_and_domain_ratio(base_models, folders):
    from comfyui_likeness.encoders.taming_training import CROSS, NULL, OWN

    tr = make(base_models, folders, omega=1.0, domain_ratio=0.5, general_data=folders["general"], text_dropout=0.0)
    tr.setup()
    try:
        ds = tr.dataset()
        items = [ds[i] for i in range(len(ds))]
        domain = [it["is_domain"] for it in items]
        assert any(domain) and not all(domain)            # both kinds are drawn
        batch = fixed_batch(tr, len(ds))
        prepared = tr.prepare_batch(batch, torch.Generator().manual_seed(0))
        choice = prepared["choice"].tolist()
        for c, it in zip(choice, items):
            if not it["is_domain"]:
                assert c == NULL                           # general images always get phi
            else:
                assert c == (CROSS if it["other"] >= 0 else OWN)   # omega = 1: always the other image
        # the other image's embedding is a different picture of the same identity
        cross = [n for n, c in enumerate(choice) if c == CROSS]
        assert cross and not torch.allclose(prepared["own"][cross[0]], prepared["other"][cross[0]])
        assert_learns(__import__("comfyui_likeness.train.loop", fromlist=["x"]).overfit_losses(
            tr, batch, 5, 2e-2), "Taming Encoder")
        gates = torch.stack([layer.gate.detach() for layer in tr.encoder.layers.values()])
        assert float(gates.abs().min()) > 0              # the zero-initialised gates opened
    finally:
        tr.close()


def test_exported_adapter_loads_and_changes_taming_apply(base_models, folders, base_dir, tmp_path):
    from comfyui_likeness.nodes.taming import LikenessTamingApply, LikenessTamingEncode, LikenessTamingLoader
    from comfyui_likeness.train.loop import overfit_losses

    tr = make(base_models, folders)
    tr.setup()
    try:
        overfit_losses(tr, fixed_batch(tr), 3, 2e-2)
        path = tr.export(str(tmp_path))
    finally:
        tr.close()
    adapter = LikenessTamingLoader.execute(install(path, base_dir, "train_taming.safetensors")).result[0]
    assert adapter.meta["origin"] == "trained"
    image = fixed_batch(tr, 1)["image"]
    embeds = LikenessTamingEncode.execute(base_models.clip_vision, image, "black", "pad to square", 0.1).result[0]
    patched = LikenessTamingApply.execute(base_models.model, adapter, embeds, 1.0, 0.0, 1.0, "null embedding",
                                          "average").result[0]
    positive, negative = encode(base_models.clip, "a photo of a person"), encode(base_models.clip, "")
    a, b = sample(patched, positive, negative), sample(base_models.model, positive, negative)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-6)


def test_whole_unet_option_trains_and_exports_the_unet(folders, tmp_path, pack):
    base = micro_base(seed=6)   # trained in place: a model of its own
    unet = base.model.model.diffusion_model
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    tr = make(base, folders, train_unet=True)
    tr.setup()
    try:
        groups = tr.param_groups(1e-3)
        assert len(groups) == 2 and groups[1]["lr"] == 1e-5   # TAM6: a smaller rate for the UNet
        from comfyui_likeness.train.loop import overfit_losses
        overfit_losses(tr, fixed_batch(tr), 2, 1e-3)
        path = tr.export(str(tmp_path))
    finally:
        tr.close()
    assert any(not torch.equal(before[k], v) for k, v in unet.state_dict().items())
    assert os.path.isfile(tmp_path / "taming_unet.safetensors")
    from comfyui_likeness.weights.taming_file import read_spec
    from comfyui_likeness.core.layout import weights_digest

    assert read_spec(path).extra["tuned_unet_digest"] == weights_digest(base.model)
    assert all(p.requires_grad and p.grad is None for p in unet.parameters())   # flags as the host had them
