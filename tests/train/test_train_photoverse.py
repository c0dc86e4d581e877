"""PhotoVerse trainer on micro models (docs/methods/photoverse.md): the four loss terms (L_face through the differentiable
ArcFace on the decoded one-step estimate), random fusion drawn per sample, LoRA deltas applied as host weight
wrappers, and the exported file driving PhotoVerse Encode / Apply."""
import pytest
import torch

from fixtures_train import (RES, assert_learns, base_models, config, encode, fixed_batch, install, one_thread,  # noqa: F401
                            sample, train_lib, write_folder)


def tiny_arcface():
    from comfyui_likeness.faces.arcface import ArcFace
    from comfyui_likeness.faces.iresnet import IResNet

    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1), (8, 8, 16, 16), 32, 112).eval()
    return ArcFace(net, torch.full((3,), 2.0), torch.full((3,), -1.0), "tiny")


@pytest.fixture(scope="module")
def trainer(pack, base_models, tmp_path_factory):
    from comfyui_likeness.train.data import scan_images
    from comfyui_likeness.train.photoverse import PhotoVerseTrainer

    root = tmp_path_factory.mktemp("pv")
    records = scan_images(write_folder(str(root / "data"), ("a", "b"), per=1))
    tr = PhotoVerseTrainer(base_models, {"hidden": 32, "face_backend": "none", "face_fraction": 0.5}, records,
                           config(root, resolution=RES), arcface=tiny_arcface())
    tr.setup()
    yield tr
    tr.close()


def face_batch(trainer):
    """The fixed batch with landmarks for a face in the middle of each 64 px image (for L_face)."""
    batch = fixed_batch(trainer)
    kps = torch.tensor([[24.0, 26.0], [40.0, 26.0], [32.0, 35.0], [26.0, 44.0], [38.0, 44.0]])
    batch["image_kps"] = kps.expand(2, 5, 2).clone()
    return batch


def test_all_four_losses_and_random_fusion(trainer):
    from comfyui_likeness.encoders.photoverse import FUSION_MODES

    prepared = trainer.prepare_batch(face_batch(trainer), torch.Generator().manual_seed(1))
    assert prepared["face_rows"].tolist() == [0]                        # face_fraction 0.5 of a batch of 2
    sigmas = trainer.train_patcher.get_model_object("model_sampling").sigmas
    face_sigmas = [float(trainer.prepare_batch(face_batch(trainer), torch.Generator().manual_seed(s))["sigma"][0])
                   for s in range(8)]
    assert max(face_sigmas) <= float(sigmas[499]) + 1e-6               # t below 500 for the face rows (PV7)
    modes = {(float(g), float(s)) for g, s in zip(prepared["gamma"], prepared["sigma_v"])}
    assert modes <= set(FUSION_MODES)
    trainer.before_step()
    from comfyui_likeness.train.diffusion import gradients_on
    with gradients_on():
        out = trainer.module(prepared)
        out["loss"].backward()
    logs = out["logs"]
    assert {"diffusion", "rt", "rv", "face"} <= set(logs) and 0.0 <= logs["face"] <= 2.0
    want = (logs["diffusion"] + 0.01 * logs["rt"] + 0.001 * logs["rv"] + 0.01 * logs["face"])
    assert float(out["loss"].detach()) == pytest.approx(want, rel=1e-4)
    grads = {n: p.grad for n, p in trainer.module.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    # the LoRA's up matrices start at 0, so the down matrices get no gradient at first; the ups do
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if ".lora_" in n and n.endswith("up.weight"))
    trainer.module.zero_grad(set_to_none=True)


def test_loss_falls_on_a_fixed_batch(trainer, train_lib):
    assert_learns(train_lib["loop"].overfit_losses(trainer, face_batch(trainer), 5, 2e-3), "PhotoVerse")


def test_exported_adapter_loads_and_changes_photoverse_apply(trainer, base_models, base_dir, tmp_path):
    from comfyui_likeness.concepts.prompt_injection import encode_likeness_prompt
    from comfyui_likeness.nodes.photoverse import (LikenessPhotoVerseApply, LikenessPhotoVerseEncode,
                                                   LikenessPhotoVerseLoader)

    path = trainer.export(str(tmp_path))
    adapter = LikenessPhotoVerseLoader.execute(install(path, base_dir, "train_photoverse.safetensors")).result[0]
    assert adapter.origin == "trained"
    want = trainer.adapter.state_dict()
    assert all(torch.allclose(v.float(), want[k], atol=2e-3, rtol=1e-2) for k, v in adapter.module.state_dict().items())
    item = fixed_batch(trainer, 1)
    concept = LikenessPhotoVerseEncode.execute(adapter, base_models.clip_vision, item["face"], 1, "all",
                                               mask=item["face_mask"]).result[0]
    patched = LikenessPhotoVerseApply.execute(base_models.model, adapter, concept, 1.0, 1.0, 1.0, 0.0, 1.0).result[0]
    _, positive, _ = encode_likeness_prompt(base_models.clip, "a photo of holder", concept, "holder", "person", 1.0)
    negative = encode(base_models.clip, "")
    a, b = sample(patched, positive, negative), sample(base_models.model, positive, negative)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)
