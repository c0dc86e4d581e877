"""PhotoVerse on SDXL and SD2-768 (v-prediction) micro models built from the host's classes (docs/methods/photoverse.md,
"Model families"): adapters sized from the connected models (SDXL: words for clip_l and clip_g, visual tokens at the
cross-attention width, transformer depth 2), off settings equal the unpatched model, every sampled block equals
the fused-attention equation, each encoder's own words reach its encoder, and the combine modes at SDXL widths."""
import pytest
import torch

import micro as m
from fixtures_photoverse import check_sampled_blocks, face_image, loaded_adapter, random_cond, sample, unet_model


@pytest.fixture(scope="module")
def sdxl(pack, tmp_path_factory):
    from comfyui_likeness.concepts.photoverse_concept import clip_text_widths, encode_photoverse_concept

    model, clip, cv = m.micro_sdxl_model(), m.micro_sdxl_clip(), m.micro_clip_vision()
    widths = clip_text_widths(clip)
    loaded = loaded_adapter(tmp_path_factory.mktemp("pv_sdxl") / "sdxl.safetensors", model, cv, seed=5,
                            text_widths=widths)
    concept = encode_photoverse_concept(loaded, cv, face_image(), words=2)
    return {"model": model, "clip": clip, "cv": cv, "widths": widths, "loaded": loaded, "concept": concept}


def sdxl_cond(clip, text):
    return m.sdxl_conditioning(clip, text, 64, 64)


def test_sdxl_adapter_is_sized_from_the_model_and_both_text_encoders(sdxl):
    from comfyui_likeness.core.layout import attention_layout

    spec, layout = sdxl["loaded"].spec, attention_layout(sdxl["model"])
    assert sdxl["widths"] == (m.SDXL_L_WIDTH, m.SDXL_G_WIDTH) == (64, 96)
    assert spec.text_widths == (64, 96) and spec.context_dim == m.SDXL_CONTEXT == 160
    assert any(s.key[2] == 1 for s in layout.sites)               # transformer depth 2
    shapes = {k: tuple(v.shape) for k, v in sdxl["loaded"].module.state_dict().items()}
    assert shapes["text_adapters.64.mlp_0.3.weight"] == (64, 32) and shapes["text_adapters.96.mlp_4.3.weight"] == (96, 32)
    assert shapes["image_adapter.mlp_0.3.weight"] == (160, 32)
    for site in layout.sites:
        assert shapes[f"layers.{site.name}.visual_k.weight"] == (site.inner_dim, 160)
        assert shapes[f"layers.{site.name}.lora_k.down.weight"] == (8, 160)
    words = sdxl["concept"].vectors
    assert set(words) == {64, 96} and words[64].shape == (2, 64) and words[96].shape == (2, 96)
    assert sdxl["concept"].metadata["photoverse"]["visual"].shape == (5, 160)


def test_sdxl_off_settings_equal_the_unpatched_model(sdxl):
    from comfyui_likeness.attention.photoverse import apply_photoverse

    pos, neg = sdxl_cond(sdxl["clip"], "a photo of a person"), sdxl_cond(sdxl["clip"], "")
    plain = sample(sdxl["model"], pos, neg)
    off = apply_photoverse(sdxl["model"], sdxl["loaded"], sdxl["concept"], 0.0, 1.0, 0.0)
    assert torch.equal(sample(off, pos, neg), plain)
    on = apply_photoverse(sdxl["model"], sdxl["loaded"], sdxl["concept"])
    assert not torch.allclose(sample(on, pos, neg), plain, atol=1e-4)


def test_sdxl_blocks_equal_the_fused_attention_equation(sdxl):
    pos, neg = sdxl_cond(sdxl["clip"], "a photo of a person"), sdxl_cond(sdxl["clip"], "")
    assert check_sampled_blocks(sdxl["model"], sdxl["loaded"], sdxl["concept"], 0.8, 1.2, 0.9, pos, neg) >= 10


def test_each_sdxl_encoder_gets_its_own_words(sdxl):
    """Likeness Prompt with the concept: clip_l's rows hold the 64-wide words, clip_g's the 96-wide ones, each in
    token-embedding space (the host's raw-embedding entries), equal to encoding both encoders by hand."""
    from comfyui_likeness.concepts.prompt_injection import encode_likeness_prompt

    clip, concept = sdxl["clip"], sdxl["concept"]
    text = "a photo of holder at the beach"
    _, with_concept, _ = encode_likeness_prompt(clip, text, concept, "holder", "person", 1.0)
    tokens = clip.tokenize(text)
    ref = {}
    for key, width in (("l", 64), ("g", 96)):
        chunk = tokens[key][0]
        holder = getattr(clip.tokenizer, f"clip_{key}").tokenizer("holder")["input_ids"][1:-1]
        p = [t[0] for t in chunk].index(holder[0])
        entry = ({"type": "embedding", "data": concept.vectors[width]}, 1.0, 0)
        ref[key] = [chunk[:p] + [entry] + chunk[p + 1:len(chunk) - 1]]
    reference, pooled = clip.encode_from_tokens(ref, return_pooled=True)
    cond = with_concept[0][0]
    assert cond.shape == reference.shape and cond.shape[-1] == 160
    assert torch.allclose(cond, reference, atol=1e-6)
    plain = clip.encode_from_tokens(tokens)
    assert not torch.allclose(cond[..., :64], plain[..., :64]) and not torch.allclose(cond[..., 64:], plain[..., 64:])
    assert torch.allclose(with_concept[0][1]["pooled_output"], pooled, atol=1e-6)


@pytest.mark.parametrize("mode", ["average", "concat", "norm_average"])
def test_sdxl_combine_modes_per_encoder_width(sdxl, mode):
    from comfyui_likeness.concepts.combine import combine_photos
    from comfyui_likeness.concepts.photoverse_concept import encode_photoverse_concept

    photos = torch.cat([face_image(seed=s) for s in (6, 7)])
    both = encode_photoverse_concept(sdxl["loaded"], sdxl["cv"], photos, words=1, combine=mode)
    singles = [encode_photoverse_concept(sdxl["loaded"], sdxl["cv"], photos[i:i + 1], words=1) for i in range(2)]
    for width in (64, 96):
        per = torch.stack([s.vectors[width] for s in singles])
        assert torch.allclose(both.vectors[width], combine_photos(per, mode), atol=1e-5)
    visual = torch.stack([s.metadata["photoverse"]["visual"] for s in singles])
    assert torch.allclose(both.metadata["photoverse"]["visual"], combine_photos(visual, mode), atol=1e-5)


@pytest.fixture(scope="module")
def sd2_768(pack, tmp_path_factory):
    from comfyui_likeness.concepts.photoverse_concept import encode_photoverse_concept

    model = unet_model(1024, sd2=True, channels=64, v_prediction=True)
    cv = m.micro_clip_vision()
    loaded = loaded_adapter(tmp_path_factory.mktemp("pv_sd2v") / "sd2v.safetensors", model, cv, seed=6)
    return {"model": model, "loaded": loaded, "concept": encode_photoverse_concept(loaded, cv, face_image())}


def test_sd2_768_v_prediction_blocks_and_off_settings(sd2_768):
    from comfyui_likeness.attention.photoverse import apply_photoverse
    from comfyui_likeness.core.layout import attention_layout

    model, loaded, concept = sd2_768["model"], sd2_768["loaded"], sd2_768["concept"]
    layout = attention_layout(model)
    assert layout.model_type == "V_PREDICTION" and layout.context_dim == 1024 and layout.sites[0].dim_head == 64
    assert loaded.spec.text_widths == (1024,)
    pos, neg = random_cond(1024, 1), random_cond(1024, 2)
    plain = sample(model, pos, neg)
    assert torch.equal(sample(apply_photoverse(model, loaded, concept, 0.0, 1.0, 0.0), pos, neg), plain)
    assert not torch.allclose(sample(apply_photoverse(model, loaded, concept), pos, neg), plain, atol=1e-4)
    assert check_sampled_blocks(model, loaded, concept, 1.0, 1.0, 1.0, pos, neg) == len(layout.sites)
