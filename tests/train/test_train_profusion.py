"""ProFusion trainers on micro models: PromptNet pre-training (docs/methods/promptnet.md) through the shared accelerate loop,
and the test-time fine-tuning as the node does it, inside inference mode like a running host. Their
outputs load in the PromptNet nodes and change what KSampler (Fusion) makes; the inputs stay as they were."""
import os

import pytest
import torch

from fixtures_train import (RES, assert_learns, base_models, config, fixed_batch, install, micro_base,  # noqa: F401
                            one_thread, train_lib, write_folder)


def fusion_image(base, promptnet_model, model, image, seed=3):
    """PromptNet Concept node -> Likeness Prompt -> KSampler (Fusion) -> latent."""
    import nodes
    from comfyui_likeness.concepts.prompt_injection import encode_likeness_prompt
    from comfyui_likeness.samplers.ksampler_fusion import ksampler_fusion
    from comfyui_likeness.nodes.promptnet import LikenessPromptNetConcept

    concept = LikenessPromptNetConcept.execute(promptnet_model, base.clip_vision, base.vae, model, image).result[0]
    fused, concept_cond, context = encode_likeness_prompt(base.clip, "a holder at the beach", concept, "holder",
                                                          "person", 0.7)
    negative = nodes.CLIPTextEncode().encode(base.clip, "")[0]
    latent = {"samples": torch.zeros(1, 4, RES // 8, RES // 8)}
    return ksampler_fusion(model, seed, 2, "euler", "ddim_uniform", negative, fused, concept_cond, context, latent, 1.0,
                           6.0, 6.0, 3.0, 1, 1.0, True, 0.0, 1.0)["samples"]


@pytest.fixture(scope="module")
def records(train_lib, tmp_path_factory):
    root = write_folder(str(tmp_path_factory.mktemp("pf_data")), ("a", "b"), per=2)
    return train_lib["data"].scan_images(root)


def test_pretraining_learns_and_runs_the_accelerate_loop(train_lib, base_models, records, tmp_path, base_dir):
    from accelerate.state import AcceleratorState, GradientState
    from comfyui_likeness.nodes.promptnet import LikenessPromptNetLoader

    pf, loop = train_lib["profusion"], train_lib["loop"]
    trainer = pf.PromptNetPretrainer(base_models, {"region_channels": 8}, records, resolution=RES)
    trainer.setup()
    try:
        initial = trainer.export(str(tmp_path / "initial"))
        assert_learns(loop.overfit_losses(trainer, fixed_batch(trainer), 6, 1e-3), "PromptNet pre-training")
    finally:
        trainer.close()

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = config(tmp_path, max_steps=2, sample_every=2, cpu=True, learning_rate=1e-3, max_grad_norm=1.0)
    run = pf.PromptNetPretrainer(base_models, {"region_channels": 8}, records, resolution=RES)
    try:
        result = loop.train(run, cfg)
    finally:
        run.close()
    assert result["step"] == 2 and all(map(lambda v: v == v, result["losses"]))
    assert os.path.isfile(tmp_path / "run" / "samples" / "step_000002.png")  # made with KSampler (Fusion)

    # the exported file loads in the PromptNet Loader node and changes the Fusion sampler's output
    trained = LikenessPromptNetLoader.execute(install(result["export"], base_dir, "train_pf_trained.safetensors")).result[0]
    start = LikenessPromptNetLoader.execute(install(initial, base_dir, "train_pf_initial.safetensors")).result[0]
    assert trained.meta["origin"] == "trained"
    want = result["module"].promptnet.state_dict()
    assert all(torch.allclose(v.float(), want[k].float()) for k, v in trained.patcher.model.state_dict().items())
    image = fixed_batch(run, 1)["image"]
    a = fusion_image(base_models, trained, base_models.model, image)
    b = fusion_image(base_models, start, base_models.model, image)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)


def test_views_follow_profusions_recipe(train_lib):
    pf = train_lib["profusion"]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(70, 90, 3, generator=g)
    views = pf.make_views(image, 4, 32, seed=1)
    assert views.shape == (5, 32, 32, 3) and float(views.min()) >= 0 and float(views.max()) <= 1
    assert torch.equal(views, pf.make_views(image, 4, 32, seed=1))          # deterministic per seed
    assert not torch.equal(views[1], views[2])                              # each view its own affine
    black = pf.make_views(image, 2, 32, seed=1, fill="black")
    assert float(black[1][0, 0].abs().max()) == 0.0                         # outside the face box: emptied
    with pytest.raises(ValueError, match="fill"):
        pf.make_views(image, 1, 32, fill="outpaint")


def promptnet_file(train_lib, base, base_dir, name):
    pf = train_lib["profusion"]
    from comfyui_likeness.weights.promptnet_file import save_promptnet

    torch.manual_seed(0)
    net = pf.new_promptnet(base.model, base.clip_vision, 64, RES // 8, 8)
    path = os.path.join(base_dir, "models", "likeness", name)
    save_promptnet(path, net)
    return name


def test_finetune_node_in_inference_mode(train_lib, pack, base_dir):
    """The node as the host runs it: models from 'loaders' (inference tensors), execute under inference mode."""
    from comfyui_likeness.nodes.promptnet import LikenessPromptNetLoader
    from comfyui_likeness.nodes.training import LikenessPromptNetFineTune

    assert pack.NODE_CLASS_MAPPINGS["LikenessPromptNetFineTune"] is LikenessPromptNetFineTune
    base = micro_base(seed=4, inference_mode=True)
    name = promptnet_file(train_lib, base, base_dir, "train_pf_finetune_source.safetensors")
    image = torch.rand(1, 72, 64, 3, generator=torch.Generator().manual_seed(2))
    params_before = {n: p for n, p in base.model.model.named_parameters()}
    with torch.inference_mode():
        source = LikenessPromptNetLoader.execute(name).result[0]
        before = {k: v.clone() for k, v in source.patcher.model.state_dict().items()}
        out_model, tuned, lora = LikenessPromptNetFineTune.execute(base.model, base.clip, base.vae, base.clip_vision,
                                                                   source, image, 3, 2, 1e-3, 3, True, 0).result
    from comfyui_likeness.core.layout import attention_layout

    keys = train_lib["profusion"].attention_qkv_keys(base.model)
    blocks = len(attention_layout(base.model).sites)
    assert set(out_model.patches) == set(keys) and len(keys) == 3 * 2 * blocks   # q/k/v of attn1 and attn2
    assert not base.model.patches and out_model is not base.model
    assert any(float(out_model.patches[k][0][1][0].abs().max()) > 0 for k in keys)
    assert all(torch.equal(v, source.patcher.model.state_dict()[k]) for k, v in before.items())   # input untouched
    assert any(not torch.equal(v, tuned.patcher.model.state_dict()[k]) for k, v in before.items())
    assert tuned.meta["fine_tuned"]["steps"] == 3
    # the base model is the same set of parameter objects, with their flags and no gradients left behind
    assert all(params_before[n] is p and p.grad is None for n, p in base.model.model.named_parameters())
    assert all(p.requires_grad for p in base.model.model.parameters())
    with torch.inference_mode():
        a = fusion_image(base, tuned, out_model, image)
        b = fusion_image(base, source, base.model, image)
    assert torch.isfinite(a).all() and not torch.allclose(a, b, atol=1e-4)
    # the lora output holds exactly the patches, under the host's LoRA key names
    assert len(lora) == len(keys) and all(k.startswith("lora_unet_") and k.endswith(".diff") for k in lora)


def test_finetune_bad_input_is_named(train_lib, base_models, base_dir):
    from comfyui_likeness.nodes.promptnet import LikenessPromptNetLoader
    from comfyui_likeness.nodes.training import LikenessPromptNetFineTune

    import micro as m

    source = LikenessPromptNetLoader.execute(
        promptnet_file(train_lib, base_models, base_dir, "train_pf_bad_source.safetensors")).result[0]
    args = dict(model=base_models.model, clip=base_models.clip, vae=base_models.vae, clip_vision=base_models.clip_vision,
                promptnet=source, image=torch.rand(1, 64, 64, 3), steps=1, batch_size=1, learning_rate=1e-3, views=1,
                tune_unet_attention=True, seed=0)
    with pytest.raises(ValueError, match="must come from"):
        LikenessPromptNetFineTune.execute(**{**args, "promptnet": "not a promptnet"})
    with pytest.raises(ValueError, match="IMAGE batch"):
        LikenessPromptNetFineTune.execute(**{**args, "image": torch.rand(64, 64)})
    with pytest.raises(ValueError, match="CLIP-vision tokens"):
        LikenessPromptNetFineTune.execute(**{**args, "clip_vision": m.micro_clip_vision(width=48)})
    with pytest.raises(ValueError, match=r"cross-attention 64.*\(32\)"):
        LikenessPromptNetFineTune.execute(**{**args, "model": m.micro_model(context=32)})
    with pytest.raises(ValueError, match="inpaint_model has cross-attention 32"):
        LikenessPromptNetFineTune.execute(**{**args, "inpaint_model": m.micro_model(context=32)})
    with pytest.raises(ValueError, match="outpaint_steps"):
        LikenessPromptNetFineTune.execute(**{**args, "inpaint_model": m.micro_inpaint_model(), "outpaint_steps": 0})
    assert not base_models.model.patches


def test_trainable_prompt_is_the_hosts_encoding_with_gradients(train_lib, base_models):
    """The learned vectors go through the Likeness Prompt path: the same conditioning as the host's own encoding
    of the injected prompt, and gradients reach the vectors (the encoder's in-place additions run out of place)."""
    from comfyui_likeness.concepts.concept import HIDDEN_SPACE, TOKEN_SPACE
    from comfyui_likeness.train.diffusion import gradients_on
    from comfyui_likeness.train.prompt import TrainablePrompt

    clip = base_models.clip
    for space, n in ((HIDDEN_SPACE, 1), (TOKEN_SPACE, 3)):
        prompt = TrainablePrompt(clip, "a photo of holder", "holder", 64, n, space)
        vectors = torch.randn(2, n, 64, generator=torch.Generator().manual_seed(n)) * 0.05
        with torch.no_grad():
            want = prompt.dynamic.encode(vectors)      # the host's forward, as Fusion sampling runs it
        with gradients_on():
            v = vectors.clone().requires_grad_(True)
            got = prompt.encode(v)
            got.square().mean().backward()
        assert torch.allclose(got.detach(), want, atol=1e-5) and not torch.allclose(want[0], want[1])
        assert v.grad is not None and float(v.grad.abs().sum()) > 0
    from comfy.clip_model import CLIPLayer
    assert not any("forward" in m.__dict__ for m in clip.cond_stage_model.modules() if isinstance(m, CLIPLayer))


def test_finetuner_learns_on_a_fixed_batch(train_lib, base_models):
    pf, loop = train_lib["profusion"], train_lib["loop"]
    torch.manual_seed(1)
    net = pf.new_promptnet(base_models.model, base_models.clip_vision, 64, RES // 8, 8)
    views = pf.make_views(torch.rand(70, 60, 3, generator=torch.Generator().manual_seed(3)), 3, RES, 0)
    tuner = pf.PromptNetFineTuner(base_models, net, {}, views)
    tuner.setup()
    try:
        assert_learns(loop.overfit_losses(tuner, fixed_batch(tuner), 5, 1e-3), "ProFusion fine-tuning")
        assert any(float(d.detach().abs().max()) > 0 for d in tuner.deltas.values())   # the attention deltas moved
    finally:
        tuner.close()
    assert not base_models.model.patches and all(p.grad is None for p in base_models.model.model.parameters())


# --- outpainting augmentation and the LoRA export ---------------------------------------------------------------

def test_outpainting_fills_the_emptied_area_with_the_inpainting_model(train_lib, base_models, caplog):
    """With an inpainting model the views' emptied area comes from the host's inpainting path (the UNet sees the
    mask and the masked image as its extra channels); the visible pixels stay; without one, the mean-colour fill
    is used and the log says so."""
    import logging

    import micro as m
    from comfyui_likeness.train.outpaint import Outpainter

    pf = train_lib["profusion"]
    image = torch.rand(70, 60, 3, generator=torch.Generator().manual_seed(5))
    inpaint = m.micro_inpaint_model()
    channels = []

    def wrapper(apply_model, args):
        channels.append(int(args["c"]["c_concat"].shape[1]) if args["c"].get("c_concat") is not None else 0)
        return apply_model(args["input"], args["timestep"], **args["c"])

    spied = inpaint.clone()
    spied.set_model_unet_function_wrapper(wrapper)
    outpainter = Outpainter(spied, base_models.clip, base_models.vae, steps=2)
    views, visible = pf.augment_views(image, 2, RES, seed=1)
    with caplog.at_level(logging.INFO, logger="likeness.train"):
        painted = pf.make_views(image, 2, RES, seed=1, outpainter=outpainter)
    assert "outpainting 2 views with an inpainting model" in caplog.text
    assert channels and set(channels) == {5}                  # mask (1) + masked image latent (4)
    filled = pf.make_views(image, 2, RES, seed=1)
    full = visible[..., 0] > 0.999
    hole = visible[..., 0] < 0.001
    assert torch.allclose(painted[full], views[full], atol=1e-6)         # the subject is untouched
    assert torch.equal(painted[0], filled[0])                          # the photo itself is not outpainted
    assert float((painted[hole] - filled[hole]).abs().mean()) > 1e-2   # the emptied area is painted, not filled
    assert torch.equal(painted, pf.make_views(image, 2, RES, seed=1, outpainter=outpainter))   # seeded
    with caplog.at_level(logging.INFO, logger="likeness.train"):
        caplog.clear()
        pf.make_views(image, 2, RES, seed=1)
    assert "filled (with the mean colour) instead of outpainted" in caplog.text


@pytest.fixture(scope="module")
def cond(base_models):
    import nodes
    return nodes.CLIPTextEncode().encode(base_models.clip, "a photo of a person")[0]


def unet_out(model, cond, seed=0):
    """The model's denoised output on a fixed input (its weights as patched)."""
    from fixtures_fusion import direct_denoise

    x = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(seed)) * 3
    return direct_denoise(model, x, 3.0, cond)


def load_lora(base_dir, path, name, model):
    import shutil

    import nodes

    folder = os.path.join(base_dir, "models", "loras")
    os.makedirs(folder, exist_ok=True)
    shutil.copy(path, os.path.join(folder, name))
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]


def test_node_result_saves_as_a_lora_and_a_promptnet_the_loaders_read(train_lib, pack, base_dir, base_models, cond,
                                                                       caplog):
    """Fine-tune -> Save ProFusion Fine-Tune -> LoraLoaderModelOnly gives the fine-tuned model; the saved PromptNet
    loads in the PromptNet Loader; a second save gets new names; an untrained LoRA leaves the model as it was."""
    import logging

    import nodes
    from comfyui_likeness.nodes.promptnet import LikenessPromptNetLoader
    from comfyui_likeness.nodes.training import LikenessPromptNetFineTune, LikenessSaveProFusionFineTune

    source = LikenessPromptNetLoader.execute(
        promptnet_file(train_lib, base_models, base_dir, "train_pf_lora_source.safetensors")).result[0]
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(8))
    tuned_model, tuned, lora = LikenessPromptNetFineTune.execute(
        base_models.model, base_models.clip, base_models.vae, base_models.clip_vision, source, image, 3, 2, 1e-3, 2,
        True, 0).result
    saved = LikenessSaveProFusionFineTune.execute(lora, tuned, "pf_test/subject", 0)
    text = saved.ui.as_dict()["text"][0]
    assert "loras/pf_test/subject_00001_.safetensors" in text and "likeness/pf_test/subject_00001_.safetensors" in text
    with caplog.at_level(logging.WARNING):
        loaded = nodes.LoraLoaderModelOnly().load_lora_model_only(base_models.model, "pf_test/subject_00001_.safetensors",
                                                                  1.0)[0]
    assert "lora key not loaded" not in caplog.text
    want, base, got = unet_out(tuned_model, cond), unet_out(base_models.model, cond), unet_out(loaded, cond)
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())       # fp16 file, exact changes
    assert float((want - base).abs().max()) > 1e-3 * float(base.abs().max())
    pn = LikenessPromptNetLoader.execute("pf_test/subject_00001_.safetensors").result[0]
    assert all(torch.equal(v, tuned.patcher.model.state_dict()[k]) for k, v in pn.patcher.model.state_dict().items())
    # a second save never overwrites; a rank-2 LoRA is an approximation that still loads
    again = LikenessSaveProFusionFineTune.execute(lora, tuned, "pf_test/subject", 2).ui.as_dict()["text"][0]
    assert "subject_00002_" in again
    low = nodes.LoraLoaderModelOnly().load_lora_model_only(base_models.model, "pf_test/subject_00002_.safetensors", 1.0)[0]
    assert torch.isfinite(unet_out(low, cond)).all() and not torch.equal(unet_out(low, cond), base)
    # the same export from an untrained fine-tune (zero changes) gives the base model back
    zero = {k: torch.zeros_like(v) for k, v in lora.items()}
    LikenessSaveProFusionFineTune.execute(zero, source, "pf_test/untrained", 0)
    untrained = nodes.LoraLoaderModelOnly().load_lora_model_only(base_models.model, "pf_test/untrained_00001_.safetensors",
                                                                 1.0)[0]
    assert torch.allclose(unet_out(untrained, cond), base) and not torch.allclose(unet_out(untrained, cond), got, atol=1e-4)
    for bad in ("", ".hidden", "pf_test/"):
        with pytest.raises(ValueError, match="filename_prefix"):
            LikenessSaveProFusionFineTune.execute(lora, tuned, bad, 0)
    with pytest.raises(ValueError, match="empty"):
        LikenessSaveProFusionFineTune.execute({}, tuned, "pf_test/none", 0)


def test_cli_finetune_exports_a_lora_and_a_promptnet(train_lib, base_models, base_dir, cond, tmp_path):
    """The command line's promptnet_finetune (train/cli.py with the shared loop) writes the tuned PromptNet and the
    LoRA; the trained LoRA changes the model, the export made before training does not."""
    from comfyui_likeness.train.cli import build_trainer

    data = write_folder(str(tmp_path / "photo"), ("me",), per=1)
    name = promptnet_file(train_lib, base_models, base_dir, "train_pf_cli_source.safetensors")
    cfg = config(tmp_path, max_steps=2, batch_size=2, learning_rate=1e-3, cpu=True, data=data, method="promptnet_finetune",
                 options={"promptnet": os.path.join(base_dir, "models", "likeness", name), "views": 2})
    trainer = build_trainer(cfg, base_models)
    trainer.setup()
    try:
        before = trainer.export(str(tmp_path / "before"))
    finally:
        trainer.close()
    run = build_trainer(cfg, base_models)
    try:
        result = train_lib["loop"].train(run, cfg)
        want = unet_out(run.patched_model(result["module"]), cond)
    finally:
        run.close()
    out = os.path.dirname(result["export"])
    assert {"promptnet_finetuned.safetensors", "promptnet_finetuned_lora.safetensors"} <= set(os.listdir(out))
    trained = load_lora(base_dir, os.path.join(out, "promptnet_finetuned_lora.safetensors"), "pf_cli_trained.safetensors",
                        base_models.model)
    untrained = load_lora(base_dir, os.path.join(os.path.dirname(before), "promptnet_finetuned_lora.safetensors"),
                          "pf_cli_untrained.safetensors", base_models.model)
    base, got = unet_out(base_models.model, cond), unet_out(trained, cond)
    assert float((got - want).abs().max()) < 1e-3 * float(want.abs().max())
    assert not torch.allclose(got, base, atol=1e-4) and torch.allclose(unet_out(untrained, cond), base)


def test_finetune_node_outpaints_with_a_connected_inpainting_model(train_lib, pack, base_dir):
    """The node as the host runs it (inference mode) with an inpainting model connected: the views are outpainted
    (the host's inpainting path runs) before the fine-tune."""
    import micro as m
    from comfyui_likeness.nodes.promptnet import LikenessPromptNetLoader
    from comfyui_likeness.nodes.training import LikenessPromptNetFineTune

    base = micro_base(seed=4, inference_mode=True)
    with torch.inference_mode():
        inpaint = m.micro_inpaint_model()
    calls = []
    inpaint.set_model_unet_function_wrapper(lambda f, a: calls.append(a["c"]["c_concat"].shape[1]) or
                                            f(a["input"], a["timestep"], **a["c"]))
    name = promptnet_file(train_lib, base, base_dir, "train_pf_outpaint_source.safetensors")
    image = torch.rand(1, 72, 64, 3, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        source = LikenessPromptNetLoader.execute(name).result[0]
        out_model, tuned, lora = LikenessPromptNetFineTune.execute(
            base.model, base.clip, base.vae, base.clip_vision, source, image, 1, 2, 1e-3, 2, True, 0,
            inpaint_model=inpaint, outpaint_steps=2).result
    assert calls and set(calls) == {5} and tuned.meta["fine_tuned"]["outpainted"] is True
    assert lora and not base.model.patches and not inpaint.patches
