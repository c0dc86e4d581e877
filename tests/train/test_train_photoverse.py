"""PhotoVerse trainer on micro models (docs/methods/photoverse.md, "Training"): the four loss terms (L_face through the
differentiable ArcFace on the decoded one-step estimate, L_rv per attention head), random fusion drawn per sample,
the unconditional state trained on the zero CLIP input and the empty prompt, the training forward against the
fused-attention equation with the LoRA deltas, and the exported file driving PhotoVerse Encode / Apply (a trained
export against an untrained one)."""
import math

import pytest
import torch

from fixtures_photoverse import Attn2Recorder, manual_attention
from fixtures_train import (RES, assert_learns, base_models, config, encode, fixed_batch, install, one_thread,  # noqa: F401
                            sample, train_lib, write_folder)


def tiny_arcface():
    from comfyui_likeness.faces.arcface import ArcFace
    from comfyui_likeness.faces.iresnet import IResNet

    torch.manual_seed(0)
    net = IResNet((1, 1, 1, 1), (8, 8, 16, 16), 32, 112).eval()
    return ArcFace(net, torch.full((3,), 2.0), torch.full((3,), -1.0), "tiny")


def make_trainer(base_models, root, arcface=None, **options):
    from comfyui_likeness.train.data import scan_images
    from comfyui_likeness.train.photoverse import PhotoVerseTrainer

    records = scan_images(write_folder(str(root / "data"), ("a", "b"), per=1))
    opts = {"hidden": 32, "face_backend": "none", "face_fraction": 0.5, **options}
    return PhotoVerseTrainer(base_models, opts, records, config(root, resolution=RES), arcface=arcface).setup()


@pytest.fixture(scope="module")
def trainer(pack, base_models, tmp_path_factory):
    tr = make_trainer(base_models, tmp_path_factory.mktemp("pv"), tiny_arcface(), uncond_fraction=0.0)
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
    from comfyui_likeness.train.diffusion import gradients_on

    prepared = trainer.prepare_batch(face_batch(trainer), torch.Generator().manual_seed(1))
    assert prepared["face_rows"].numel() == 1                           # face_fraction 0.5 of a batch of 2
    sigmas = trainer.train_patcher.get_model_object("model_sampling").sigmas
    for s in range(8):
        p = trainer.prepare_batch(face_batch(trainer), torch.Generator().manual_seed(s))
        assert float(p["sigma"][p["face_rows"]].max()) <= float(sigmas[499]) + 1e-6   # t below 500
    modes = {(float(g), float(s)) for g, s in zip(prepared["gamma"], prepared["sigma_v"])}
    assert modes <= set(FUSION_MODES)
    trainer.before_step()
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


def test_l_rv_is_the_value_norm_per_attention_head(trainer):
    """L_rv = mean over blocks of the mean over samples, tokens and heads of ||V^S_h||_2, V^S_h the head-h slice of
    visual_v(f); the norm over the whole inner width would be about sqrt(heads) larger."""
    from comfyui_likeness.core.layout import attention_layout

    prepared = trainer.prepare_batch(face_batch(trainer), torch.Generator().manual_seed(2))
    trainer.before_step()
    with torch.no_grad():
        logs = trainer.module(prepared)["logs"]
        f = trainer.adapter.visual_tokens(prepared["features"]).double()
        per_block, whole = [], []
        for site in attention_layout(trainer.base.model).sites:
            v = f @ trainer.adapter.layers[site.name].visual_v.weight.double().T          # (B, n, inner)
            heads = v.reshape(*v.shape[:2], site.heads, site.dim_head)
            per_block.append(torch.sqrt((heads ** 2).sum(-1)).mean())
            whole.append(v.norm(dim=-1).mean())
    assert attention_layout(trainer.base.model).sites[0].heads > 1
    assert logs["rv"] == pytest.approx(float(torch.stack(per_block).mean()), rel=1e-5)
    assert logs["rv"] != pytest.approx(float(torch.stack(whole).mean()), rel=1e-2)


def test_loss_falls_on_a_fixed_batch(trainer, train_lib):
    assert_learns(train_lib["loop"].overfit_losses(trainer, face_batch(trainer), 5, 2e-3), "PhotoVerse")


def test_training_forward_is_the_fused_attention_with_the_lora(pack, base_models, tmp_path):
    """Every attn2 block of the training forward: to_out(gamma_b * Attn(Q, K^T, V^T) + sigma_b * Attn(Q, K^S, V^S))
    per sample b, with Q, K^T, V^T from W + alpha * B @ A; recomputed here from the raw weights in float64. One
    sample is in the unconditional state: its context is the empty prompt and its features the zero CLIP input's."""
    from comfyui_likeness.concepts.photoverse_concept import zero_input_features
    from comfyui_likeness.core.layout import attention_layout

    alpha = 0.7
    tr = make_trainer(base_models, tmp_path, alpha=alpha, uncond_fraction=0.5)
    try:
        tr.adapter.init_random(seed=4, scale=0.5)        # non-zero LoRA pairs, so alpha * B @ A matters
        gen = next(s for s in range(50)
                   if tr.prepare_batch(fixed_batch(tr), torch.Generator().manual_seed(s))["uncond"].tolist() == [False, True])
        prepared = tr.prepare_batch(fixed_batch(tr), torch.Generator().manual_seed(gen))
        prepared["gamma"], prepared["sigma_v"] = torch.tensor([1.3, 0.0]), torch.tensor([0.6, 2.0])
        base_sd = {k: v.double() for k, v in tr.base.model.model.diffusion_model.state_dict().items()}
        recorder = Attn2Recorder()
        recorder.attach(tr.train_patcher)
        tr.before_step()
        with torch.no_grad():
            tr.module(prepared)
            f = tr.adapter.visual_tokens(prepared["features"]).double()
        zero = zero_input_features(tr.base.clip_vision, tr.adapter.spec.clip_layers)
        assert torch.allclose(prepared["features"][1].cpu(), zero[0], atol=1e-5)
        empty = encode(tr.base.clip, "")[0][0][0, :77]
        layout = attention_layout(tr.base.model)
        assert set(recorder.outputs) == set(layout.keys)
        sd = {k: v.double() for k, v in tr.adapter.state_dict().items()}
        for site in layout.sites:
            n, context, eo = recorder.inputs[site.key]
            assert torch.allclose(context[1].float(), empty.float(), atol=1e-5)
            p, lay = f"{site.path}.attn2", f"layers.{site.name}"

            def w(t):
                return base_sd[f"{p}.to_{t}.weight"] + alpha * sd[f"{lay}.lora_{t}.up.weight"] @ sd[f"{lay}.lora_{t}.down.weight"]

            q, k, v = n.double() @ w("q").T, context.double() @ w("k").T, context.double() @ w("v").T
            text = manual_attention(q, k, v, site.heads)
            ks, vs = f @ sd[f"{lay}.visual_k.weight"].T, f @ sd[f"{lay}.visual_v.weight"].T
            rows = []
            for b, (g, s) in enumerate(zip(prepared["gamma"].tolist(), prepared["sigma_v"].tolist())):
                visual = manual_attention(q[b:b + 1], ks[b:b + 1], vs[b:b + 1], site.heads)
                rows.append(g * text[b:b + 1] + s * visual)
            expected = torch.cat(rows) @ base_sd[f"{p}.to_out.0.weight"].T + base_sd[f"{p}.to_out.0.bias"]
            assert torch.allclose(recorder.outputs[site.key].double(), expected, atol=1e-4), site.name
    finally:
        tr.close()


def _concept_and_sample(path, name, base_models, base_dir, item):
    from comfyui_likeness.concepts.prompt_injection import encode_likeness_prompt
    from comfyui_likeness.nodes.photoverse import (LikenessPhotoVerseApply, LikenessPhotoVerseEncode,
                                                   LikenessPhotoVerseLoader)

    adapter = LikenessPhotoVerseLoader.execute(install(path, base_dir, name)).result[0]
    concept = LikenessPhotoVerseEncode.execute(adapter, base_models.clip_vision, item["face"], 1, "all",
                                               mask=item["face_mask"]).result[0]
    patched = LikenessPhotoVerseApply.execute(base_models.model, adapter, concept, 1.0, 1.0, 1.0, 0.0, 1.0).result[0]
    _, positive, _ = encode_likeness_prompt(base_models.clip, "a photo of holder", concept, "holder", "person", 1.0)
    negative = encode(base_models.clip, "")
    return adapter, sample(patched, positive, negative), sample(base_models.model, positive, negative)


def test_exported_adapter_loads_and_changes_photoverse_apply(pack, base_models, base_dir, tmp_path, train_lib):
    """The trained export drives Encode / Apply and gives another image than both the base model and the export of
    the same trainer before its optimizer steps (so skipping training fails this test)."""
    tr = make_trainer(base_models, tmp_path, uncond_fraction=0.0)
    try:
        untrained_path = tr.export(str(tmp_path / "untrained"))
        assert_learns(train_lib["loop"].overfit_losses(tr, fixed_batch(tr), 6, 5e-3), "PhotoVerse")
        trained_path = tr.export(str(tmp_path / "trained"))
        item = fixed_batch(tr, 1)
        adapter, trained, base = _concept_and_sample(trained_path, "train_pv_trained.safetensors", base_models,
                                                     base_dir, item)
        untrained_adapter, untrained, _ = _concept_and_sample(untrained_path, "train_pv_untrained.safetensors",
                                                              base_models, base_dir, item)
        assert adapter.origin == "trained" and adapter.spec.text_mapper == "mlp"
        want = tr.adapter.state_dict()
        assert all(torch.allclose(v.float(), want[k], atol=2e-3, rtol=1e-2) for k, v in adapter.module.state_dict().items())
        moved = max(float((v.float() - untrained_adapter.module.state_dict()[k].float()).abs().max())
                    for k, v in adapter.module.state_dict().items())
        assert moved > 1e-3
        assert torch.isfinite(trained).all()
        assert not torch.allclose(trained, base, atol=1e-4)
        assert not torch.allclose(trained, untrained, atol=1e-4), "the trained adapter gives the untrained image"
    finally:
        tr.close()


def test_elite_mapper_option_trains_elites_heads(pack, base_models, tmp_path, train_lib):
    tr = make_trainer(base_models, tmp_path, mapper="elite", uncond_fraction=0.0)
    try:
        assert tr.adapter.spec.text_mapper == tr.adapter.spec.image_mapper == "elite"
        assert any(".mapping_patch_0." in n for n, _ in tr.module.named_parameters())
        assert_learns(train_lib["loop"].overfit_losses(tr, fixed_batch(tr), 4, 2e-3), "PhotoVerse (ELITE heads)")
    finally:
        tr.close()


def test_the_trainers_face_mask_default_is_the_face_crop_nodes(pack):
    import inspect

    from comfyui_likeness.nodes.faces import LikenessFaceCrop
    from comfyui_likeness.train.face_data import FaceCropDataset

    schema = LikenessFaceCrop.GET_SCHEMA()
    node_default = next(i for i in schema.inputs if i.id == "mask_source").default
    assert inspect.signature(FaceCropDataset).parameters["mask_source"].default == node_default == "face_oval"


def test_uncond_fraction_draws_the_unconditional_state(trainer, base_models, tmp_path):
    tr = make_trainer(base_models, tmp_path, uncond_fraction=0.5)
    try:
        drawn = [tr.prepare_batch(fixed_batch(tr), torch.Generator().manual_seed(s)).get("uncond") for s in range(40)]
        rate = sum(int(d.sum()) for d in drawn if d is not None) / (2 * len(drawn))
        assert 0.3 < rate < 0.7
        assert math.isclose(trainer.uncond_fraction, 0.0)
        assert all("uncond" not in trainer.prepare_batch(fixed_batch(trainer), torch.Generator().manual_seed(s))
                   for s in range(5))
    finally:
        tr.close()


def test_v_prediction_model_trains_and_its_export_changes_the_output(pack, tmp_path, train_lib, base_dir):
    """SD2-768's kind of model (v-prediction): the same eps objective through the host's denoised output."""
    import micro as m
    from comfyui_likeness.train.base_models import BaseModels

    base = BaseModels(m.micro_model(v_prediction=True), m.micro_clip(), m.micro_vae(), m.micro_clip_vision(), "micro-v")
    tr = make_trainer(base, tmp_path, uncond_fraction=0.0)
    try:
        assert tr.train_patcher.model.model_type.name == "V_PREDICTION"
        assert_learns(train_lib["loop"].overfit_losses(tr, fixed_batch(tr), 5, 5e-3), "PhotoVerse (v-prediction)")
        _, patched, plain = _concept_and_sample(tr.export(str(tmp_path / "out")), "train_pv_vpred.safetensors", base,
                                                base_dir, fixed_batch(tr, 1))
        assert torch.isfinite(patched).all() and not torch.allclose(patched, plain, atol=1e-4)
    finally:
        tr.close()


def test_sdxl_trains_both_text_adapters_with_the_pooled_size_conditioning(pack, tmp_path, train_lib, base_dir):
    """SDXL: words for clip_l and clip_g, the UNet's `y` from the pooled clip_g output of the prompt with the words
    (so the words get gradients through `y` too), visual tokens at the 160-wide micro SDXL context."""
    import micro as m
    from comfyui_likeness.train.base_models import BaseModels
    from comfyui_likeness.train.diffusion import gradients_on

    base = BaseModels(m.micro_sdxl_model(), m.micro_sdxl_clip(), m.micro_vae(), m.micro_clip_vision(), "micro-sdxl")
    tr = make_trainer(base, tmp_path, uncond_fraction=0.5)
    try:
        assert tr.adapter.spec.text_widths == (64, 96) and tr.adapter.spec.context_dim == 160
        prepared = next(p for p in (tr.prepare_batch(fixed_batch(tr), torch.Generator().manual_seed(s)) for s in range(20))
                        if "uncond" in p and p["uncond"].tolist() == [False, True])
        assert prepared["empty_pooled"].shape == (2, 96)
        tr.before_step()
        with gradients_on():
            out = tr.module(prepared)
            out["loss"].backward()
        for width in ("64", "96"):
            grads = [p.grad for p in tr.adapter.text_adapters[width].parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(float(g.abs().max()) > 0 for g in grads)
        tr.module.zero_grad(set_to_none=True)
        assert_learns(train_lib["loop"].overfit_losses(tr, fixed_batch(tr), 5, 5e-3), "PhotoVerse (SDXL)")
        adapter, patched, plain = _concept_and_sample(tr.export(str(tmp_path / "out")), "train_pv_sdxl.safetensors",
                                                      base, base_dir, fixed_batch(tr, 1))
        assert adapter.spec.text_widths == (64, 96)
        assert torch.isfinite(patched).all() and not torch.allclose(patched, plain, atol=1e-4)
    finally:
        tr.close()
