"""ELITE's published weights in the PhotoVerse nodes (docs/methods/photoverse.md, "ELITE's weights"), on synthetic
checkpoints in ELITE's layout (key names and shapes of csyxwei/ELITE train_global.py / train_local.py), saved as
pickled .pt files as users download them: read with the host's weights-only loader, mapped block by block onto
the model, the words and local tokens equal ELITE's mapper equations, every cross-attention block of a sampled
model equals ELITE's global + local attention, the conversion is cached as safetensors and never overwritten, and
bad files fail in plain words."""
import math
import os

import pytest
import torch

import fixtures_inv_adapter as fia
import micro as m
from fixtures_photoverse import (SD15_ELITE_BLOCKS, Attn2Recorder, elite_checkpoints, face_image, head_by_hand,
                                 manual_attention, random_cond, sample)

HIDDEN = 24


@pytest.fixture(scope="module")
def setup(pack, tmp_path_factory):
    from comfyui_likeness.concepts.photoverse_concept import clip_vision_signature
    from comfyui_likeness.core.layout import attention_layout

    tmp = tmp_path_factory.mktemp("elite")
    model = fia.layout_model("sd15")          # SD1.x's 16 cross-attention blocks at micro widths, context 64
    cv = m.micro_clip_vision()
    layout = attention_layout(model)
    widths = {s.name: (s.inner_dim, s.context_dim) for s in layout.sites}
    global_sd, local_sd = elite_checkpoints(SD15_ELITE_BLOCKS, widths, 32, 64, HIDDEN, seed=1)
    torch.save(global_sd, tmp / "global_mapper.pt")
    torch.save(local_sd, tmp / "local_mapper.pt")
    return {"tmp": tmp, "model": model, "cv": cv, "sig": clip_vision_signature(cv), "layout": layout,
            "global": global_sd, "local": local_sd}


def convert(setup, local=True, cache=None):
    from comfyui_likeness.weights.elite_convert import convert_elite
    from comfyui_likeness.weights.photoverse import load_photoverse

    tmp = setup["tmp"]
    path = convert_elite(str(tmp / "global_mapper.pt"), str(tmp / "local_mapper.pt") if local else None,
                         setup["model"], setup["sig"], str(cache or tmp / "converted"))
    return path, load_photoverse(path)


def test_every_weight_lands_on_its_block(setup):
    path, loaded = convert(setup)
    spec = loaded.spec
    assert (spec.text_mapper, spec.image_mapper, spec.text_kv, spec.preprocess) == ("elite", "elite_local", "replace", "elite")
    assert "no face training" in spec.source and loaded.origin == "converted"
    assert spec.num_visual_tokens == 256 and spec.text_widths == (64,)
    sd = loaded.module.state_dict()
    assert len(SD15_ELITE_BLOCKS) == len(setup["layout"].sites) == 16
    for site, module in SD15_ELITE_BLOCKS.items():
        name = f"{module}.transformer_blocks.0.attn2".replace(".", "_")
        for ours, theirs, source in (("text_k", "to_k", "global"), ("text_v", "to_v", "global"),
                                     ("visual_k", "to_k", "local"), ("visual_v", "to_v", "local")):
            assert torch.equal(sd[f"layers.{site}.{ours}.weight"].float(),
                               setup[source][f"{name}_{theirs}.weight"].half().float()), (site, ours)
    for k, v in setup["global"].items():
        if k.startswith("mapping"):
            assert torch.equal(sd[f"text_adapters.64.{k}"].float(), v.half().float())
            assert torch.equal(sd[f"image_adapter.{k}"].float(), setup["local"][k].half().float())
    assert os.path.dirname(path) == str(setup["tmp"] / "converted")


def _features(cv, image, layers):
    import comfy.clip_vision

    pix = comfy.clip_vision.clip_preprocess(image, size=224, mean=cv.image_mean, std=cv.image_std, crop=False).float()
    last, _, _, _ = cv.model(pixel_values=pix)
    return [last.float()] + [cv.model(pixel_values=pix, intermediate_output=i - 1)[1].float() for i in layers[1:]]


def test_words_and_local_tokens_are_elites_mappers(setup):
    """Words: ELITE's global mapper on the unmasked image (resized, not cropped); local tokens: per patch, the mean
    over layers of cls head + patch head on the masked image, times the mask on the 16 x 16 patch grid."""
    from comfyui_likeness.concepts.photoverse_concept import encode_photoverse_concept

    _, loaded = convert(setup)
    image = face_image(96, 80)
    mask = torch.zeros(1, 96, 80)
    mask[:, 20:70, 16:60] = 1.0
    concept = encode_photoverse_concept(loaded, setup["cv"], image, mask=mask, words=2)
    module, layers = loaded.module, loaded.spec.clip_layers
    text = _features(setup["cv"], image, layers)
    words = torch.stack([(head_by_hand(getattr(module.text_adapters["64"], f"mapping_{i}"), text[i][:, :1])
                          + head_by_hand(getattr(module.text_adapters["64"], f"mapping_patch_{i}"), text[i][:, 1:]).mean(1, keepdim=True))[0, 0]
                         for i in range(5)])
    assert torch.allclose(concept.vectors[64], words[:2].float(), atol=1e-4)
    obj = _features(setup["cv"], image * mask[..., None], layers)
    local = sum(head_by_hand(getattr(module.image_adapter, f"mapping_{i}"), obj[i][:, :1])
                + head_by_hand(getattr(module.image_adapter, f"mapping_patch_{i}"), obj[i][:, 1:]) for i in range(5)) / 5
    grid = torch.nn.functional.interpolate(mask[:, None], size=(16, 16), mode="nearest").reshape(1, 256, 1)
    data = concept.metadata["photoverse"]
    assert data["visual"].shape == (256, 64) and data["visual_uncond"] is None
    assert torch.allclose(data["visual"], (local * grid)[0].float(), atol=1e-4)
    assert 0 < int(grid.sum()) < 256


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.8), (0.6, 1.0)])
def test_sampled_blocks_equal_elites_global_and_local_attention(setup, alpha, sigma):
    """Every attn2 block: to_out(Attn(Q, X W_k', X W_v') + sigma * Attn(Q, f W_k^l, f W_v^l)) on the conditional rows
    and to_out(Attn(Q, X W_k', X W_v')) on the unconditional ones (ELITE's uncond pass has no local branch), where
    W' = W + alpha (W_global - W) (ELITE's to_k_global at alpha 1); to_q is ELITE's own."""
    from comfyui_likeness.attention.photoverse import apply_photoverse
    from comfyui_likeness.concepts.photoverse_concept import encode_photoverse_concept

    import comfy.model_management

    _, loaded = convert(setup)
    model = setup["model"]
    concept = encode_photoverse_concept(loaded, setup["cv"], face_image(64, 64), mask=torch.ones(1, 64, 64))
    comfy.model_management.unload_all_models()   # an earlier patched clone may still hold the weights patched
    base_sd = {k: v.double() for k, v in model.model.diffusion_model.state_dict().items()}
    patched = apply_photoverse(model, loaded, concept, lora_strength=alpha, visual_scale=sigma)
    recorder = Attn2Recorder()
    recorder.attach(patched)
    sample(patched, random_cond(64, 1), random_cond(64, 2), steps=1)
    f = concept.metadata["photoverse"]["visual"].double()
    for site in setup["layout"].sites:
        name = f"{SD15_ELITE_BLOCKS[site.name]}.transformer_blocks.0.attn2".replace(".", "_")
        n, context, eo = recorder.inputs[site.key]
        p = f"{site.path}.attn2"
        wk = base_sd[f"{p}.to_k.weight"] + alpha * (setup["global"][f"{name}_to_k.weight"].half().double() - base_sd[f"{p}.to_k.weight"])
        wv = base_sd[f"{p}.to_v.weight"] + alpha * (setup["global"][f"{name}_to_v.weight"].half().double() - base_sd[f"{p}.to_v.weight"])
        q = n.double() @ base_sd[f"{p}.to_q.weight"].T
        text = manual_attention(q, context.double() @ wk.T, context.double() @ wv.T, eo["n_heads"])
        kl = (f @ setup["local"][f"{name}_to_k.weight"].half().double().T)[None]
        vl = (f @ setup["local"][f"{name}_to_v.weight"].half().double().T)[None]
        per = q.shape[0] // len(eo["cond_or_uncond"])
        rows = []
        for i, c in enumerate(eo["cond_or_uncond"]):
            qi = q[i * per:(i + 1) * per]
            local = 0 if c == 1 else sigma * manual_attention(qi, kl, vl, eo["n_heads"])
            rows.append(text[i * per:(i + 1) * per] + local)
        expected = torch.cat(rows) @ base_sd[f"{p}.to_out.0.weight"].T + base_sd[f"{p}.to_out.0.bias"]
        assert torch.allclose(recorder.outputs[site.key].double(), expected, atol=1e-4), site.name


def test_global_mapper_alone_gives_the_text_branch_only(setup):
    from comfyui_likeness.attention.dispatcher import dispatchers
    from comfyui_likeness.attention.photoverse import apply_photoverse
    from comfyui_likeness.concepts.photoverse_concept import encode_photoverse_concept

    _, loaded = convert(setup, local=False)
    assert loaded.spec.image_mapper == "none" and not loaded.spec.has_visual
    concept = encode_photoverse_concept(loaded, setup["cv"], face_image())
    assert concept.metadata["photoverse"]["visual"] is None and concept.vectors[64].shape == (1, 64)
    patched = apply_photoverse(setup["model"], loaded, concept)
    assert dispatchers(patched, "attn2") == {} and len(patched.patches) == 2 * 16
    pos, neg = random_cond(64, 3), random_cond(64, 4)
    assert not torch.allclose(sample(patched, pos, neg), sample(setup["model"], pos, neg), atol=1e-4)
    # Apply while a patched clone holds the weights patched in place: the change is still W' - W of the original W
    import comfy.model_management

    sample(patched, pos, neg)
    again = apply_photoverse(setup["model"], loaded, concept)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    diff = again.patches[key][0][1][0]
    comfy.model_management.unload_all_models()
    original = setup["model"].model.diffusion_model.state_dict()[key[len("diffusion_model."):]]
    name = "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.weight"
    assert torch.allclose(diff, setup["global"][name].half().float() - original.float(), atol=1e-6)


def test_conversion_is_cached_and_never_overwritten(setup, tmp_path):
    first, _ = convert(setup, cache=tmp_path)
    stamp = os.stat(first).st_mtime_ns
    again, _ = convert(setup, cache=tmp_path)
    assert again == first and os.stat(first).st_mtime_ns == stamp and os.listdir(tmp_path) == [os.path.basename(first)]
    other, _ = convert(setup, local=False, cache=tmp_path)
    assert other != first and len(os.listdir(tmp_path)) == 2
    with open(first, "r+b") as f:                    # a damaged cache file is reported, not replaced
        f.truncate(100)
    size = os.path.getsize(first)
    with pytest.raises(ValueError, match="cached conversion .* is damaged .* delete it"):
        convert(setup, cache=tmp_path)
    assert os.path.getsize(first) == size


class _Marker:
    """Unpickling this would create a file: the weights-only loader must refuse it without running it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_files_are_read_only_through_the_weights_only_loader(setup, tmp_path):
    from comfyui_likeness.weights.elite_convert import read_elite_checkpoint

    marker = tmp_path / "ran"
    torch.save({"mapping_0.0.weight": torch.zeros(2, 2), "payload": _Marker(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="safe \\(weights-only\\) loader"):
        read_elite_checkpoint(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    plain = read_elite_checkpoint(str(setup["tmp"] / "global_mapper.pt"))
    assert set(plain) == set(setup["global"])


def test_bad_elite_files_are_refused_in_plain_words(setup, tmp_path):
    from comfyui_likeness.weights.elite_convert import convert_elite

    def run(global_sd, local_sd=None, model=None, sig=None):
        torch.save(global_sd, tmp_path / "g.pt")
        if local_sd is not None:
            torch.save(local_sd, tmp_path / "l.pt")
        return convert_elite(str(tmp_path / "g.pt"), str(tmp_path / "l.pt") if local_sd is not None else None,
                             model or setup["model"], sig or setup["sig"], str(tmp_path / "out"))

    with pytest.raises(ValueError, match="has no mapping_0.* weights: it is not an ELITE mapper"):
        run({"emb_params": torch.zeros(1, 64)})
    with pytest.raises(ValueError, match="reads 32-wide CLIP features but the connected CLIP vision is .*width 48"):
        run(setup["global"], sig={**setup["sig"], "width": 48})
    with pytest.raises(ValueError, match="does not fit this model: .* belong to no block of this model"):
        run(setup["global"], model=m.micro_model())
    broken = dict(setup["global"])
    broken.pop("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v.weight")
    with pytest.raises(ValueError, match="1 weights the model needs are missing .*down_blocks_0_attentions_0"):
        run(broken)
    small = {k: v for k, v in setup["local"].items()}
    small["mapping_0.0.weight"] = torch.zeros(HIDDEN, 16)
    with pytest.raises(ValueError, match="is not the local mapper of the same ELITE model"):
        run(setup["global"], small)
    with pytest.raises(ValueError, match="does not exist"):
        convert_elite(str(tmp_path / "missing.pt"), None, setup["model"], setup["sig"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_real_elite_shapes_convert_for_a_full_size_sd15(setup, tmp_path):
    """ELITE's published sizes: CLIP ViT-L/14 features (1024), hidden 1024, 768-wide words, to_k_global of SD1.5's
    16 blocks (320 / 640 / 1280 inner); the model is a full SD1.5 UNet on the meta device (layout only)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    from comfyui_likeness.core.layout import attention_layout
    from comfyui_likeness.weights.elite_convert import convert_elite
    from comfyui_likeness.weights.photoverse import read_spec

    cfg = comfy.supported_models.SD15({**m.unet_config(768, 320), "num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4],
                                       "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                                       "transformer_depth_output": [1] * 9 + [0] * 3})
    cfg.set_inference_dtype(torch.float32, None)
    full = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(cfg, device="meta"), "cpu", "cpu")
    widths = {s.name: (s.inner_dim, s.context_dim) for s in attention_layout(full).sites}
    assert sorted({w for w, _ in widths.values()}) == [320, 640, 1280]
    global_sd, _ = elite_checkpoints(SD15_ELITE_BLOCKS, widths, 1024, 768, 1024, dtype=torch.float16)
    assert global_sd["mapping_0.0.weight"].shape == (1024, 1024) and global_sd["mapping_4.6.weight"].shape == (768, 1024)
    assert global_sd["up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k.weight"].shape == (320, 768)
    torch.save(global_sd, tmp_path / "global_mapper.pt")
    vit_l = {"width": 1024, "layers": 24, "image_size": 224, "patch": 14}
    spec = read_spec(convert_elite(str(tmp_path / "global_mapper.pt"), None, full, vit_l, str(tmp_path / "out")))
    params = sum(math.prod(s) for s in spec.expected_shapes().values())
    kv = sum(math.prod(s) for k, s in spec.expected_shapes().items() if ".text_" in k)
    assert spec.text_widths == (768,) and round(kv / 1e6, 2) == 19.17 and round(params / 1e6, 1) == 48.1
