"""Taming Encoder trainer on micro models (docs/methods/taming-encoder.md, Taming Encoder §3.4, §5): the paper's defaults
(whole UNet, the fixed null embedding of eq. 4, general-domain data mixed in with r = 0.3, and a clear stop without
it), cross-reference with probability omega, the zero-initialised gates opening as it learns, the learned-null and
adapter-only options, SDXL (its `y`) and v-prediction (SD2-768), and exported files that drive Taming Encoder Apply:
each trained export is compared with the export of the same trainer before any step as well as with the base
model, so these tests fail when training is skipped."""
import logging
import os

import pytest
import torch

import micro as m
from fixtures_taming import manual_projection
from fixtures_train import (RES, assert_learns, base_models, config, encode, fixed_batch, install, micro_base,  # noqa: F401
                            one_thread, sample, train_lib, write_folder)

OPTIONS = {"queries": 4, "depth": 1, "face_backend": "none"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("taming")
    return {"domain": write_folder(str(root / "faces"), ("a", "b"), per=2),
            "general": write_folder(str(root / "general"), ("scenery",), per=2), "root": root}


def make(base, folders, general=True, output="run", **options):
    from comfyui_likeness.train.data import scan_images
    from comfyui_likeness.train.taming import TamingTrainer

    extra = {"general_data": folders["general"]} if general else {}
    return TamingTrainer(base, {**OPTIONS, **extra, **options}, scan_images(folders["domain"]),
                         config(folders["root"], resolution=RES, output_dir=str(folders["root"] / output)))


def overfit(tr, steps=3, lr=2e-2, n=None):
    """A few steps on one fixed batch: the whole (tiny) mixed dataset unless n is given."""
    from comfyui_likeness.train.loop import overfit_losses
    return overfit_losses(tr, fixed_batch(tr, n or len(tr.dataset())), steps, lr)


def export_pair(base, folders, tmp_path, steps=3, lr=2e-2, **options):
    """(untrained export, trained export, trainer): the same trainer exported before its first step and after."""
    tr = make(base, folders, **options)
    tr.setup()
    try:
        untrained = tr.export(str(tmp_path / "untrained"))
        losses = overfit(tr, steps, lr)
        trained = tr.export(str(tmp_path / "trained"))
    finally:
        tr.close()
    assert_learns(losses, "Taming Encoder")
    return untrained, trained, tr


def apply_output(model, adapter_path, base_dir, name, embeds, conds):
    from comfyui_likeness.nodes.taming import LikenessTamingApply, LikenessTamingLoader

    adapter = LikenessTamingLoader.execute(install(adapter_path, base_dir, name)).result[0]
    patched = LikenessTamingApply.execute(model, adapter, embeds, 1.0, 0.0, 1.0, "null embedding",
                                          "average").result[0]
    return sample(patched, *conds), adapter


def embeds_of(base, tr):
    from comfyui_likeness.nodes.taming import LikenessTamingEncode

    image = fixed_batch(tr, 1)["image"]
    return LikenessTamingEncode.execute(base.clip_vision, image, "black", "pad to square", 0.1).result[0]


def test_defaults_follow_the_paper(folders):
    """Whole UNet (§3.4), fixed null (eq. 4), r = 0.3 (§5), ω = 0.5, the UNet at its own smaller rate."""
    from comfyui_likeness.encoders.taming_encoder import TamingEncoder

    base = micro_base(seed=4)
    tr = make(base, folders)
    tr.setup()
    try:
        assert tr.train_unet and tr.null_mode == "fixed" and tr.omega == 0.5
        assert tr.dataset().ratio == 0.3
        groups = tr.param_groups(1e-4)
        unet = list(base.model.model.diffusion_model.parameters())
        assert [g["lr"] for g in groups] == [1e-4, 1e-5]
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in unet}
        assert "null_tokens" not in dict(tr.encoder.named_parameters())           # phi is fixed
        adapter_count = sum(p.numel() for p in tr.encoder.parameters())
        assert tr.trainable_count() == adapter_count + sum(p.numel() for p in unet)
        assert adapter_count == sum(p.numel() for k, p in TamingEncoder(tr.encoder.spec, device="meta").state_dict()
                                    .items() if k != "null_tokens")
        assert tr.hyperparameters()["null_embedding"] == "fixed" and tr.hyperparameters()["train_unet"]
    finally:
        tr.close()


def test_without_general_data_the_trainer_stops_unless_told_otherwise(base_models, folders, caplog):
    with pytest.raises(ValueError, match=r"needs general-domain data.*options.general_data.*r = 0.3.*domain_only"):
        make(base_models, folders, general=False, train_unet=False)
    with pytest.raises(ValueError, match="exclude each other"):
        make(base_models, folders, domain_only=True, train_unet=False)
    tr = make(base_models, folders, general=False, domain_only=True, train_unet=False)
    with caplog.at_level(logging.WARNING, logger="likeness.train"):
        tr.setup()
    try:
        assert any("domain data alone (r = 1)" in r.getMessage() for r in caplog.records)
        ds = tr.dataset()
        assert ds.ratio == 1.0 and all(ds[i]["is_domain"] for i in range(len(ds)))
        assert tr.hyperparameters()["domain_ratio"] == 1.0
    finally:
        tr.close()


def test_cross_reference_null_embedding_and_domain_ratio(base_models, folders):
    from comfyui_likeness.encoders.taming_training import CROSS, NULL, OWN

    tr = make(base_models, folders, omega=1.0, domain_ratio=0.5, text_dropout=0.0, train_unet=False)
    tr.setup()
    try:
        ds = tr.dataset()
        items = [ds[i] for i in range(len(ds))]
        domain = [it["is_domain"] for it in items]
        assert any(domain) and not all(domain)            # both kinds are drawn
        batch = fixed_batch(tr, len(ds))
        prepared = tr.prepare_batch(batch, torch.Generator().manual_seed(0))
        assert prepared["y"] is None                       # SD1.5: no vector conditioning
        choice = prepared["choice"].tolist()
        for c, it in zip(choice, items):
            if not it["is_domain"]:
                assert c == NULL                           # general images always get phi
            else:
                assert c == (CROSS if it["other"] >= 0 else OWN)   # omega = 1: always the other image
        # the other image's embedding is a different picture of the same identity
        cross = [n for n, c in enumerate(choice) if c == CROSS]
        assert cross and not torch.allclose(prepared["own"][cross[0]], prepared["other"][cross[0]])
        assert_learns(overfit(tr, 5, 2e-2), "Taming Encoder")
        gates = torch.stack([layer.gate.detach() for layer in tr.encoder.layers.values()])
        assert float(gates.abs().min()) > 0              # the zero-initialised gates opened
    finally:
        tr.close()


@pytest.mark.parametrize("null", ["fixed", "learned"])
def test_null_embedding_is_fixed_by_default_and_learned_as_an_option(base_models, folders, tmp_path, null):
    """Eq. 4: with the fixed phi the exported null tokens are the trained projection of all-zero CLIP tokens; the
    learned option trains free tokens. The file says which it holds."""
    from comfyui_likeness.weights.taming_file import load_taming, read_spec

    untrained, trained, tr = export_pair(base_models, folders, tmp_path, train_unet=False, null_embedding=null,
                                         domain_ratio=0.5)
    ds = tr.dataset()
    assert not all(ds[i]["is_domain"] for i in range(len(ds)))   # the batch had general samples (phi rows)
    assert read_spec(trained).null == null and read_spec(untrained).null == null
    before, after = load_taming(untrained).module.state_dict(), load_taming(trained).module.state_dict()
    spec = tr.encoder.spec
    zeros = torch.zeros(1, spec.vision.tokens, spec.vision.hidden_size)
    if null == "fixed":
        for state in (before, after):
            expected = manual_projection({k: v.float() for k, v in state.items()}, spec, zeros)
            assert torch.allclose(state["null_tokens"].double(), expected, atol=2e-2)
    else:
        assert not torch.allclose(after["null_tokens"].float(), before["null_tokens"].float(), atol=1e-3)
    assert not torch.equal(after["null_tokens"], before["null_tokens"])   # the projection or phi itself trained


def test_trained_adapter_only_export_changes_apply_unlike_the_untrained_one(base_models, folders, base_dir, tmp_path):
    untrained, trained, tr = export_pair(base_models, folders, tmp_path, train_unet=False)
    embeds = embeds_of(base_models, tr)
    conds = (encode(base_models.clip, "a photo of a person"), encode(base_models.clip, ""))
    base_out = sample(base_models.model, *conds)
    before, adapter = apply_output(base_models.model, untrained, base_dir, "taming_untrained.safetensors", embeds, conds)
    after, adapter = apply_output(base_models.model, trained, base_dir, "taming_trained.safetensors", embeds, conds)
    assert adapter.meta["origin"] == "trained" and not adapter.module.spec.extra.get("tuned_unet_digest")
    assert torch.equal(before, base_out)                 # gates at 0: the untrained export is the base model
    assert torch.isfinite(after).all()
    assert not torch.allclose(after, before, atol=1e-6) and not torch.allclose(after, base_out, atol=1e-6)


def test_whole_unet_default_exports_the_tuned_unet_that_apply_expects(folders, base_dir, tmp_path, caplog):
    """The default trains the UNet in place; the tuned UNet file (fp16), loaded into the model as the host's UNet
    loader does, matches the digest in the adapter (no warning), and the pair changes the output where the
    untrained export does not."""
    from safetensors.torch import load_file

    from comfyui_likeness.core.layout import weights_digest

    base = micro_base(seed=6)   # trained in place: a model of its own
    pristine = micro_base(seed=6)
    unet = base.model.model.diffusion_model
    untrained, trained, tr = export_pair(base, folders, tmp_path, lr=1e-3)
    assert any(not torch.equal(v, pristine.model.model.diffusion_model.state_dict()[k])
               for k, v in unet.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in unet.parameters())   # flags as the host had them
    unet_file = os.path.join(os.path.dirname(trained), "taming_unet.safetensors")
    tuned = micro_base(seed=6)
    tuned.model.model.diffusion_model.load_state_dict({k: v.float() for k, v in load_file(unet_file).items()})
    embeds = embeds_of(pristine, tr)
    conds = (encode(pristine.clip, "a photo of a person"), encode(pristine.clip, ""))
    base_out = sample(pristine.model, *conds)
    before, _ = apply_output(pristine.model, untrained, base_dir, "taming_whole_untrained.safetensors", embeds, conds)
    with caplog.at_level(logging.WARNING, logger="likeness"):
        caplog.clear()
        after, adapter = apply_output(tuned.model, trained, base_dir, "taming_whole_trained.safetensors", embeds, conds)
        assert not any("fine-tuned UNet" in r.getMessage() for r in caplog.records)
        assert adapter.module.spec.extra["tuned_unet_digest"] == weights_digest(tuned.model)
        apply_output(pristine.model, trained, base_dir, "taming_whole_trained.safetensors", embeds, conds)
        assert any("taming_unet.safetensors" in r.getMessage() for r in caplog.records)   # the base UNet: warned
    assert torch.equal(before, base_out)
    assert not torch.allclose(after, before, atol=1e-6) and not torch.allclose(after, base_out, atol=1e-6)


def test_whole_unet_training_refuses_half_precision_weights(folders):
    base = micro_base(seed=7)
    base.model.model.diffusion_model.to(torch.float16)
    with pytest.raises(ValueError, match=r"float32 master weights.*float16.*train_unet to false"):
        make(base, folders)
    make(base, folders, train_unet=False)   # the adapter alone trains on any UNet dtype


def test_command_line_loads_the_unet_in_float32_for_whole_unet_training(checkpoint, base_dir):
    from comfyui_likeness.train.base_models import load_base_models
    from comfyui_likeness.train.cli import base_unet_dtype
    from comfyui_likeness.train.config import TrainConfig

    assert base_unet_dtype(TrainConfig(method="taming")) == torch.float32
    assert base_unet_dtype(TrainConfig(method="taming", options={"train_unet": False})) is None
    assert base_unet_dtype(TrainConfig(method="inv_adapter")) is None
    ckpt = os.path.join(base_dir, "models", "checkpoints", checkpoint)
    base = load_base_models(ckpt, None, torch.float32)
    assert {p.dtype for p in base.model.model.diffusion_model.parameters()} == {torch.float32}


def sdxl_base():
    from comfyui_likeness.train.base_models import BaseModels

    return BaseModels(m.micro_sdxl_model(), m.micro_sdxl_clip(), m.micro_vae(), m.micro_clip_vision(layers=32), "sdxl")


def test_sdxl_trains_with_its_size_conditioning_and_the_export_changes_apply(folders, base_dir, tmp_path):
    """SDXL: the batch carries the UNet's `y` (pooled clip_g output + size embeddings, as the host builds it), the
    added attention sits on every attn2 block of depth-2 transformers, and the export drives Apply."""
    from comfyui_likeness.core.layout import attention_layout
    from comfyui_likeness.train.diffusion import size_conditioning_y
    from comfyui_likeness.train.prompt import CaptionEncoder

    base = sdxl_base()
    tr = make(base, folders, text_dropout=0.0, train_unet=False, output="sdxl")
    tr.setup()
    try:
        batch = fixed_batch(tr, 3)
        prepared = tr.prepare_batch(batch, torch.Generator().manual_seed(0))
        _, pooled = CaptionEncoder(base.clip).with_pooled(batch["caption"])
        assert torch.equal(prepared["y"], size_conditioning_y(base.model, pooled, RES, RES))
        assert set(tr.encoder.spec.blocks) == {s.name for s in attention_layout(base.model).sites}
        assert any(name.endswith("_1") for name in tr.encoder.spec.blocks)   # transformer depth 2
        untrained = tr.export(str(tmp_path / "untrained"))
        assert_learns(overfit(tr, 3), "Taming Encoder on SDXL")
        trained = tr.export(str(tmp_path / "trained"))
    finally:
        tr.close()
    embeds = embeds_of(base, tr)
    conds = (m.sdxl_conditioning(base.clip, "a photo of a person", 64, 64), m.sdxl_conditioning(base.clip, "", 64, 64))
    base_out = sample(base.model, *conds)
    before, _ = apply_output(base.model, untrained, base_dir, "taming_sdxl_untrained.safetensors", embeds, conds)
    after, _ = apply_output(base.model, trained, base_dir, "taming_sdxl_trained.safetensors", embeds, conds)
    assert torch.equal(before, base_out)
    assert not torch.allclose(after, before, atol=1e-6) and not torch.allclose(after, base_out, atol=1e-6)


def test_v_prediction_model_trains_and_the_export_changes_apply(folders, base_dir, tmp_path):
    """SD2-768-style v-prediction: the same eps objective through the host's denoised output."""
    from comfyui_likeness.train.base_models import BaseModels

    base = BaseModels(m.micro_model(v_prediction=True, seed=8), m.micro_clip(), m.micro_vae(), m.micro_clip_vision(),
                      "v")
    assert base.model.model.model_type.name == "V_PREDICTION"
    untrained, trained, tr = export_pair(base, folders, tmp_path, train_unet=False)
    embeds = embeds_of(base, tr)
    conds = (encode(base.clip, "a photo of a person"), encode(base.clip, ""))
    base_out = sample(base.model, *conds)
    before, _ = apply_output(base.model, untrained, base_dir, "taming_v_untrained.safetensors", embeds, conds)
    after, _ = apply_output(base.model, trained, base_dir, "taming_v_trained.safetensors", embeds, conds)
    assert torch.equal(before, base_out)
    assert not torch.allclose(after, before, atol=1e-6) and not torch.allclose(after, base_out, atol=1e-6)


def test_the_accelerate_loop_trains_the_whole_unet_checkpoints_and_exports(folders, tmp_path):
    """The shared loop with the default (whole UNet): the checkpoint's trainable state holds the UNet, the run
    ends with the adapter and the tuned UNet, and sample images come from the inference path."""
    from safetensors import safe_open

    from comfyui_likeness.train.data import scan_images
    from comfyui_likeness.train.loop import train
    from comfyui_likeness.train.taming import TamingTrainer

    base = micro_base(seed=9)
    cfg = config(tmp_path, max_steps=2, checkpoint_every=2, sample_every=2, batch_size=2)
    tr = TamingTrainer(base, {**OPTIONS, "general_data": folders["general"]}, scan_images(folders["domain"]), cfg)
    try:
        result = train(tr, cfg)
    finally:
        tr.close()
    assert result["step"] == 2 and os.path.isfile(result["export"])
    assert os.path.isfile(os.path.join(cfg.output_dir, "taming_unet.safetensors"))
    assert os.path.isfile(os.path.join(cfg.output_dir, "samples", "step_000002.png"))
    with safe_open(os.path.join(cfg.output_dir, "checkpoints", "step_000002", "trainable.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("encoder.layers.") for k in keys)
