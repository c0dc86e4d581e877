"""PhotoVerse's equations (docs/methods/photoverse.md) against independent computations: the paper's adapter and ELITE's
mapper, the CLIP layers they read, the fused cross-attention (dispatcher level and whole blocks of a sampled model),
the LoRA weight patches, the random-fusion draw, the adapter sizes for SD1.5 and SD2, and the identity at gamma 1,
sigma 0, alpha 0."""
import math

import pytest
import torch

import micro as m
from fixtures_photoverse import (check_sampled_blocks, face_image, head_by_hand, loaded_adapter, manual_attention,
                                 random_cond, sample, unet_model)

VIT_L = {"width": 1024, "layers": 24, "image_size": 224, "patch": 14}
VIT_H = {"width": 1280, "layers": 32, "image_size": 224, "patch": 14}


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.attention import dispatcher, photoverse as pv_attn
    from comfyui_likeness.core import layout
    from comfyui_likeness.encoders import elite_mapper, photoverse as pv, photoverse_mlp
    from comfyui_likeness.concepts import photoverse_concept as pvc
    from comfyui_likeness.weights import photoverse as pv_file
    return {"d": dispatcher, "layout": layout, "attn": pv_attn, "mapper": elite_mapper, "pv": pv, "pvc": pvc,
            "file": pv_file, "mlp": photoverse_mlp}


@pytest.fixture(scope="module")
def setup(lib, tmp_path_factory):
    model = m.micro_model()
    cv = m.micro_clip_vision()
    loaded = loaded_adapter(tmp_path_factory.mktemp("pv") / "adapter.safetensors", model, cv, seed=3)
    concept = lib["pvc"].encode_photoverse_concept(loaded, cv, face_image(), words=1)
    return {"model": model, "cv": cv, "loaded": loaded, "concept": concept}


def mlp_by_hand(seq, x):
    """Linear -> LN -> LeakyReLU -> Linear -> LN -> LeakyReLU (the paper's adapter) from the raw parameters."""
    x = x.double()
    for i in (0, 3):
        x = x @ seq[i].weight.double().T + seq[i].bias.double()
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], seq[i + 1].weight.double(), seq[i + 1].bias.double(), 1e-5)
        x = torch.where(x > 0, x, 0.01 * x)
    return x


def test_paper_adapter_is_a_two_layer_mlp_per_layer_averaged_over_tokens(lib):
    torch.manual_seed(0)
    mapper = lib["mlp"].LayerMLPMapper(3, 12, 7, hidden=16)
    for p in mapper.parameters():   # LayerNorm affine away from identity, so the test sees it
        torch.nn.init.normal_(p, std=0.5)
    feats = torch.randn(2, 3, 9, 12)
    out = mapper(feats)
    assert out.shape == (2, 3, 7)
    for i in range(3):
        seq = getattr(mapper, f"mlp_{i}")
        assert [type(mod).__name__ for mod in seq] == ["Linear", "LayerNorm", "LeakyReLU"] * 2
        assert tuple(seq[0].weight.shape) == (16, 12) and tuple(seq[3].weight.shape) == (7, 16)
        assert torch.allclose(out[:, i].double(), mlp_by_hand(seq, feats[:, i]).mean(1), atol=1e-5)
    shapes = {k: tuple(v.shape) for k, v in mapper.state_dict().items()}
    assert shapes == {k: tuple(v) for k, v in lib["mlp"].LayerMLPMapper.shapes(3, 12, 7, 16).items()}


def test_elite_local_mapper_gives_one_token_per_patch_averaged_over_layers(lib):
    torch.manual_seed(1)
    mapper = lib["mapper"].EliteLocalMapper(3, 12, 7, hidden=16)
    feats = torch.randn(2, 3, 9, 12)
    out = mapper(feats)
    assert out.shape == (2, 8, 7)
    expected = sum(head_by_hand(getattr(mapper, f"mapping_{i}"), feats[:, i, :1])
                   + head_by_hand(getattr(mapper, f"mapping_patch_{i}"), feats[:, i, 1:]) for i in range(3)) / 3
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_mapper_is_cls_head_plus_mean_of_patch_heads(lib):
    torch.manual_seed(0)
    mapper = lib["mapper"].EliteMapper(3, 12, 7, hidden=16)
    feats = torch.randn(2, 3, 9, 12)
    out = mapper(feats)
    assert out.shape == (2, 3, 7)
    for i in range(3):
        cls = head_by_hand(getattr(mapper, f"mapping_{i}"), feats[:, i, 0])
        patches = head_by_hand(getattr(mapper, f"mapping_patch_{i}"), feats[:, i, 1:]).mean(1)
        assert torch.allclose(out[:, i].double(), cls + patches, atol=1e-5)


def test_clip_layers_are_last_4_8_12_16_in_that_order(lib, setup):
    cv = setup["cv"]
    spec = setup["loaded"].spec
    assert spec.clip_layers == (24, 4, 8, 12, 16)
    pix = lib["pvc"].face_pixels(cv, face_image())
    got = lib["pvc"]._layer_features(cv, pix, spec.clip_layers)
    last, _, _, _ = cv.model(pixel_values=pix)
    expected = [last] + [cv.model(pixel_values=pix, intermediate_output=i - 1)[1] for i in (4, 8, 12, 16)]
    assert got.shape == (1, 5, 257, 32)
    for j, e in enumerate(expected):
        assert torch.allclose(got[:, j], e.float(), atol=1e-5), f"word {j}"
    assert not torch.allclose(got[:, 1], got[:, 2])


def test_concept_holds_words_and_visual_tokens_from_the_adapters(lib, setup):
    cv, loaded = setup["cv"], setup["loaded"]
    image = face_image()
    feats = lib["pvc"]._layer_features(cv, lib["pvc"].face_pixels(cv, image), loaded.spec.clip_layers)
    zero = lib["pvc"]._layer_features(cv, torch.zeros(1, 3, 224, 224), loaded.spec.clip_layers)
    c3 = lib["pvc"].encode_photoverse_concept(loaded, cv, image, words=3, visual_tokens="all")
    c1 = lib["pvc"].encode_photoverse_concept(loaded, cv, image, words=1, visual_tokens="first")
    with torch.no_grad():
        words = loaded.module.words(feats)[64][0]
        visual = loaded.module.visual_tokens(feats)[0]
        uncond = loaded.module.visual_tokens(zero)[0]
    assert loaded.spec.text_mapper == loaded.spec.image_mapper == "mlp"   # the paper's adapters by default
    assert c3.space == "token" and set(c3.vectors) == {64}
    assert torch.allclose(c3.vectors[64], words[:3], atol=1e-5)
    assert torch.allclose(c1.vectors[64], words[:1], atol=1e-5)
    data3, data1 = c3.metadata["photoverse"], c1.metadata["photoverse"]
    assert torch.allclose(data3["visual"], visual, atol=1e-5) and data3["visual"].shape == (5, 64)
    assert torch.allclose(data3["visual_uncond"], uncond, atol=1e-5)
    assert data1["visual"].shape == (1, 64) and torch.allclose(data1["visual"], visual[:1], atol=1e-5)
    assert data3["adapter"] == loaded.digest
    assert not torch.allclose(data3["visual"], data3["visual_uncond"])


def test_mask_zeroes_the_non_face_pixels(lib, setup):
    cv, loaded = setup["cv"], setup["loaded"]
    image = face_image(64, 64)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 20:44] = 1.0
    with_mask = lib["pvc"].encode_photoverse_concept(loaded, cv, image, mask=mask)
    pre_masked = lib["pvc"].encode_photoverse_concept(loaded, cv, image * mask[..., None])
    plain = lib["pvc"].encode_photoverse_concept(loaded, cv, image)
    assert torch.allclose(with_mask.vectors[64], pre_masked.vectors[64], atol=1e-6)
    assert not torch.allclose(with_mask.vectors[64], plain.vectors[64], atol=1e-4)


@pytest.mark.parametrize("sd2", [False, True], ids=["sd15", "sd2"])
def test_adapters_are_sized_from_the_connected_models(lib, sd2):
    context = 1024 if sd2 else 768
    cv = VIT_H if sd2 else VIT_L
    model = unet_model(context, sd2=sd2, channels=64)
    layout = lib["layout"].attention_layout(model)
    spec = lib["pv"].PhotoVerseSpec.for_models(layout, cv)
    adapter = lib["pv"].PhotoVerseAdapter(spec, device="meta")
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert shapes == {k: tuple(v) for k, v in spec.expected_shapes().items()}
    assert spec.text_widths == (context,) and spec.context_dim == context
    assert spec.clip_layers == ((32 if sd2 else 24), 4, 8, 12, 16)
    assert shapes[f"text_adapters.{context}.mlp_0.0.weight"] == (1024, cv["width"])
    assert shapes[f"text_adapters.{context}.mlp_4.3.weight"] == (context, 1024)
    assert shapes[f"text_adapters.{context}.mlp_4.4.weight"] == (context,)
    assert shapes["image_adapter.mlp_2.3.weight"] == (context, 1024)
    elite = lib["pv"].PhotoVerseSpec.for_models(layout, cv, mapper="elite").expected_shapes()
    assert elite[f"text_adapters.{context}.mapping_patch_4.6.weight"] == (context, 1024)
    dm = model.model.diffusion_model
    blocks = [n for n, mod in dm.named_modules() if hasattr(mod, "attn2") and hasattr(mod, "attn1")]
    assert set(adapter.layers) == {s.name for s in layout.sites} and len(layout.sites) == len(blocks) == 7
    for site in layout.sites:
        attn2 = dm.get_submodule(site.path).attn2
        inner = attn2.to_q.out_features
        name = site.name
        assert shapes[f"layers.{name}.lora_q.down.weight"] == (8, attn2.to_q.in_features)
        assert shapes[f"layers.{name}.lora_q.up.weight"] == (inner, 8)
        assert shapes[f"layers.{name}.lora_k.down.weight"] == (8, context)
        assert shapes[f"layers.{name}.visual_k.weight"] == tuple(attn2.to_k.weight.shape)
        assert shapes[f"layers.{name}.visual_v.weight"] == tuple(attn2.to_v.weight.shape)
    if sd2:
        assert layout.sites[0].dim_head == 64


def test_sd15_visual_projections_have_ip_adapters_parameter_count(lib):
    """The full SD1.5 UNet (built on the meta device): K^S/V^S have IP-Adapter's 19.17 M parameters (docs/methods/faces.md)."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    cfg = comfy.supported_models.SD15({**m.unet_config(768, 320), "num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4],
                                       "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                                       "transformer_depth_output": [1] * 9 + [0] * 3})
    cfg.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.BaseModel(cfg, device="meta")
    layout = lib["layout"].attention_layout(comfy.model_patcher.ModelPatcher(base, "cpu", "cpu"))
    spec = lib["pv"].PhotoVerseSpec.for_models(layout, VIT_L)
    kv = sum(math.prod(s) for k, s in spec.expected_shapes().items() if ".visual_" in k)
    assert len(layout.sites) == 16
    assert round(kv / 1e6, 2) == 19.17
    assert spec.num_words == 5


def test_random_fusion_bands(lib):
    u = torch.tensor([0.0, 0.2, 1 / 3 - 1e-6, 1 / 3, 0.5, 2 / 3 - 1e-6, 2 / 3, 0.9, 0.999999])
    gamma, sigma = lib["pv"].fusion_scales(u)
    assert gamma.tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1]
    assert sigma.tolist() == [0, 0, 0, 2, 2, 2, 1, 1, 1]


def test_random_fusion_draws_each_mode_a_third_of_the_time(lib):
    g = torch.Generator().manual_seed(0)
    gamma, sigma = lib["pv"].draw_fusion_scales(60000, generator=g)
    assert gamma.shape == sigma.shape == (60000,)
    pairs = torch.stack([gamma, sigma], 1)
    modes = {(2.0, 0.0), (0.0, 2.0), (1.0, 1.0)}
    assert {tuple(p) for p in pairs.unique(dim=0).tolist()} == modes
    for mode in modes:
        share = (pairs == torch.tensor(mode)).all(1).float().mean().item()
        assert abs(share - 1 / 3) < 0.01, (mode, share)


def _call(q, k, v, heads, cond_or_uncond, sigma=5.0):
    eo = {"n_heads": heads, "dim_head": q.shape[-1] // heads, "cond_or_uncond": cond_or_uncond,
          "sigmas": torch.tensor([sigma]), "attn_precision": None, "block": ("input", 1), "block_index": 0,
          "activations_shape": [q.shape[0], q.shape[-1], 4, 4]}
    return eo


@pytest.mark.parametrize("gamma,sigma,masked", [(1.0, 1.0, False), (1.4, 0.6, False), (0.0, 2.0, True)])
def test_fused_attention_equals_independent_computation(lib, setup, gamma, sigma, masked):
    loaded, concept = setup["loaded"], setup["concept"]
    data = concept.metadata["photoverse"]
    layer = loaded.module.layers["input_1_0"]
    heads, inner = 2, layer.visual_k.weight.shape[0]
    g = torch.Generator().manual_seed(1)
    q = torch.randn(4, 16, inner, generator=g)
    k, v = torch.randn(4, 77, inner, generator=g), torch.randn(4, 77, inner, generator=g)
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0
    contrib = lib["attn"].PhotoVerseContribution(layer, data["visual"], data["visual_uncond"], gamma, sigma,
                                                 mask=mask if masked else None)
    dispatcher = lib["d"].AttentionDispatcher("attn2", ("input", 1, 0), (contrib,))
    out = dispatcher(q, k, v, _call(q, k, v, heads, [1, 0]))  # rows 0-1 uncond, rows 2-3 cond (CFGGuider order)

    wk, wv = layer.visual_k.weight.double(), layer.visual_v.weight.double()
    text = manual_attention(q, k, v, heads)
    expected = []
    for row in range(4):
        f = (data["visual_uncond"] if row < 2 else data["visual"]).double()
        vis = manual_attention(q[row:row + 1], (f @ wk.T)[None].float(), (f @ wv.T)[None].float(), heads)
        expected.append(gamma * text[row:row + 1] + sigma * vis)
    expected = torch.cat(expected)
    if masked:  # 4x4 token grid, left half inside the mask: outside it the block keeps the plain text attention
        inside = torch.tensor([1.0, 1.0, 0.0, 0.0]).repeat(4)[None, :, None].double()
        expected = inside * expected + (1 - inside) * text
    assert torch.allclose(out.double(), expected, atol=1e-5)
    # The library's per-sample form (the trainer's) agrees with the dispatcher for scalar scales.
    if not masked:
        f_rows = torch.stack([data["visual_uncond"]] * 2 + [data["visual"]] * 2)
        lib_out = lib["attn"].fused_attention(q, k, v, layer.visual_k(f_rows), layer.visual_v(f_rows), heads,
                                              torch.tensor([gamma, gamma]), torch.tensor([sigma, sigma]))
        assert torch.allclose(lib_out.double(), expected, atol=1e-5)


def test_per_sample_scales_follow_the_batch(lib):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(4, 5, 8, generator=g)
    kt, vt, ks, vs = (torch.randn(4, n, 8, generator=g) for n in (7, 7, 3, 3))
    gamma, sigma = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])  # batch of 2 samples, cond + uncond chunks
    out = lib["attn"].fused_attention(q, kt, vt, ks, vs, 2, gamma, sigma)
    text, vis = manual_attention(q, kt, vt, 2), manual_attention(q, ks, vs, 2)
    expected = torch.cat([2 * text[0:1], 2 * vis[1:2], 2 * text[2:3], 2 * vis[3:4]])
    assert torch.allclose(out.double(), expected, atol=1e-5)


def test_sampled_blocks_equal_the_equations_with_lora(lib, setup):
    """Every cross-attention block of a sampled micro model: to_out(gamma*Attn(Q,K^T,V^T) + sigma*Attn(Q,K^S,V^S))
    with Q, K^T, V^T from (W + alpha*B@A), recomputed here from the raw weights."""
    checked = check_sampled_blocks(setup["model"], setup["loaded"], setup["concept"], 0.7, 1.3, 0.8,
                                   random_cond(64, 1), random_cond(64, 2))
    assert checked == len(lib["layout"].attention_layout(setup["model"]).sites)


def test_gamma_1_sigma_0_alpha_0_is_the_unpatched_model(lib, setup):
    model, loaded, concept = setup["model"], setup["loaded"], setup["concept"]
    pos, neg = random_cond(64, 3), random_cond(64, 4)
    plain = sample(model, pos, neg)
    off = lib["attn"].apply_photoverse(model, loaded, concept, lora_strength=0.0, text_scale=1.0, visual_scale=0.0)
    assert torch.equal(sample(off, pos, neg), plain)
    lora_only = lib["attn"].apply_photoverse(model, loaded, concept, lora_strength=1.0, text_scale=1.0, visual_scale=0.0)
    visual_only = lib["attn"].apply_photoverse(model, loaded, concept, lora_strength=0.0, text_scale=1.0, visual_scale=1.0)
    assert not torch.allclose(sample(lora_only, pos, neg), plain, atol=1e-4)
    assert not torch.allclose(sample(visual_only, pos, neg), plain, atol=1e-4)
    assert torch.equal(sample(model, pos, neg), plain), "the input model was changed"


def test_window_outside_the_sampling_range_is_bit_identical(lib, setup):
    model, loaded, concept = setup["model"], setup["loaded"], setup["concept"]
    pos, neg = random_cond(64, 5), random_cond(64, 6)
    plain = sample(model, pos, neg, steps=3)
    # a window of one sigma (at 37 %) that no step of the 3-step schedule hits (its middle step is exactly 50 %)
    late = lib["attn"].apply_photoverse(model, loaded, concept, 0.0, 1.0, 1.0, start_percent=0.37, end_percent=0.37)
    early = lib["attn"].apply_photoverse(model, loaded, concept, 0.0, 1.0, 1.0, start_percent=0.0, end_percent=0.5)
    assert torch.equal(sample(late, pos, neg, steps=3), plain)
    assert not torch.equal(sample(early, pos, neg, steps=3), plain)


def test_apply_registers_one_contribution_per_block_and_leaves_the_input_alone(lib, setup):
    model, loaded, concept = setup["model"], setup["loaded"], setup["concept"]
    before_opts = repr(model.model_options)
    patched = lib["attn"].apply_photoverse(model, loaded, concept)
    disp = lib["d"].dispatchers(patched, "attn2")
    layout = lib["layout"].attention_layout(model)
    assert sorted(k for _, k in disp) == sorted(layout.keys)
    assert all(len(d.contributions) == 1 for d in disp.values())
    assert len(patched.patches) == 3 * len(layout.sites)
    assert model.patches == {} and repr(model.model_options) == before_opts
    # the adapter's ModelPatcher is handed to the host's memory manager through every dispatcher
    assert all(any(p is loaded.patcher for p in d.models()) for d in disp.values())


@pytest.mark.parametrize("words", [1, 3])
def test_injected_words_change_only_positions_from_the_placeholder_on(lib, setup, words):
    """Likeness Prompt puts S1..Sm at the placeholder in token-embedding space (the host's raw-embedding path, before
    position embeddings); later tokens shift by m - 1; everything before the placeholder is untouched."""
    import nodes
    from comfyui_likeness.concepts.prompt_injection import encode_likeness_prompt

    clip = m.micro_clip()
    concept = lib["pvc"].encode_photoverse_concept(setup["loaded"], setup["cv"], face_image(), words=words)
    text = "a photo of holder on the beach"
    _, with_concept, _ = encode_likeness_prompt(clip, text, concept, "holder", "person", 1.0)
    plain = nodes.CLIPTextEncode().encode(clip, text)[0]

    tokens = clip.tokenize(text)
    chunk = tokens["l"][0]
    holder = clip.tokenizer.clip_l.tokenizer("holder")["input_ids"][1:-1]
    assert len(holder) == 1
    p = [t[0] for t in chunk].index(holder[0])
    # the reference: the host's own raw-embedding entry at the placeholder, trailing padding dropped to keep 77
    ref_chunk = chunk[:p] + [({"type": "embedding", "data": concept.vectors[64]}, 1.0, 0)] + chunk[p + 1:len(chunk) - (words - 1)]
    reference = clip.encode_from_tokens({"l": [ref_chunk]}, return_pooled=False)

    a, b = with_concept[0][0][0], plain[0][0][0]
    assert a.shape == b.shape == (77, 64)
    assert torch.equal(a, reference[0])
    assert torch.equal(a[:p], b[:p])
    assert (a[p:p + words] - b[p:p + words]).abs().amax(-1).min() > 1e-4


def test_training_modules_and_the_file_give_the_same_numbers(lib, setup, tmp_path):
    """The plain torch.nn adapter (what the trainer optimises) saved and loaded as the manual-cast inference module."""
    from comfyui_likeness.weights.photoverse import LoadedPhotoVerse, load_photoverse, new_adapter_for, save_photoverse

    sig = lib["pvc"].clip_vision_signature(setup["cv"])
    trained = new_adapter_for(setup["model"], sig, hidden=16).init_random(7)
    assert isinstance(trained.text_adapters["64"].mlp_0[0], torch.nn.Linear)
    path = save_photoverse(str(tmp_path / "fp32.safetensors"), trained, dtype=torch.float32)
    loaded = load_photoverse(path)
    feats = torch.randn(2, 5, 257, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module.words(feats)[64], trained.words(feats)[64], atol=1e-6)
        assert torch.allclose(loaded.module.visual_tokens(feats), trained.visual_tokens(feats), atol=1e-6)
    assert loaded.digest == LoadedPhotoVerse(trained, "x").digest
    assert loaded.digest != setup["loaded"].digest


def test_training_starts_from_the_models_projections_and_zero_lora(lib, setup):
    sig = lib["pvc"].clip_vision_signature(setup["cv"])
    from comfyui_likeness.weights.photoverse import new_adapter_for

    model = setup["model"]
    layout = lib["layout"].attention_layout(model)
    adapter = new_adapter_for(model, sig, hidden=16).init_for_training(model, layout)
    sd = model.model.diffusion_model.state_dict()
    for site in layout.sites:
        layer = adapter.layers[site.name]
        assert torch.equal(layer.visual_k.weight, sd[f"{site.path}.attn2.to_k.weight"])
        assert torch.equal(layer.visual_v.weight, sd[f"{site.path}.attn2.to_v.weight"])
        for t in ("q", "k", "v"):
            assert layer.lora(t).delta().abs().max() == 0
            assert layer.lora(t).down.weight.abs().max() > 0
