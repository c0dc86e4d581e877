"""The object embedding o = f_o(x * m) (docs/methods/taming-encoder.md), the projection against an independent computation, and
the training-time pieces (C.3: cross-reference regularisation, embedding dropping; gradients reach every
trainable module through the host's own UNet forward)."""
import pytest
import torch

import micro as m
from fixtures_taming import (manual_projection, micro_cv, random_adapter, random_cond, subject_photo,  # noqa: F401
                             taming, vision_of)

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def clip_tokens_by_hand(cv, pixels):
    """Penultimate hidden states of the tower on pixels (B, S, S, 3) already at its input size, with the CLIP
    normalisation written out (8-bit quantisation, mean/std) instead of the host's preprocessing."""
    x = (pixels * 255.0).round().clamp(0, 255) / 255.0
    x = ((x - CLIP_MEAN) / CLIP_STD).movedim(-1, 1)
    return cv.model(pixel_values=x, intermediate_output=-2)[1].float()


def test_background_is_replaced_and_the_subject_kept(taming):
    img, mask = subject_photo(h=64, w=64)
    for background, fill in (("black", 0.0), ("white", 1.0), ("gray", 0.5)):
        pixels, windows = taming["obj"].prepare_subject(img, mask, size=64, background=background, crop="pad to square")
        assert windows == [(0, 0, 64)]
        on = mask[0] > 0.5
        assert torch.equal(pixels[0][on], img[0][on])
        assert torch.all(pixels[0][~on] == fill)


def test_subject_box_crop_is_a_square_around_the_mask(taming):
    img, mask = subject_photo(h=60, w=80)
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    top, left, bottom, right = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
    margin = 0.25
    side = round(max(bottom - top, right - left) * 1.5)
    pixels, windows = taming["obj"].prepare_subject(img, mask, size=32, crop="subject box", margin=margin)
    t, lft, s = windows[0]
    assert s == side
    assert abs((t + s / 2) - (top + bottom) / 2) <= 0.5 and abs((lft + s / 2) - (left + right) / 2) <= 0.5
    # independent: composite, cut with black outside the image, resize like the host's CLIP preprocessing
    comp = img[0] * mask[0][..., None]
    canvas = torch.zeros(s, s, 3)
    for y in range(s):
        for x in range(s):
            yy, xx = t + y, lft + x
            if 0 <= yy < 60 and 0 <= xx < 80:
                canvas[y, x] = comp[yy, xx]
    ref = torch.nn.functional.interpolate(canvas.movedim(-1, 0)[None], size=(32, 32), mode="bicubic",
                                          antialias=True)[0].movedim(0, -1).clamp(0, 1)
    assert torch.allclose(pixels[0], ref, atol=1e-6)


def test_features_are_the_towers_penultimate_tokens_of_the_masked_subject(taming, micro_cv):  # noqa: F811
    img, mask = subject_photo()
    emb = taming["obj"].encode_object(micro_cv, img, mask, background="black", crop="subject box", margin=0.1)
    pixels, _ = taming["obj"].prepare_subject(img, mask, size=224, background="black", crop="subject box", margin=0.1)
    assert emb.features.shape == (1, 257, 32) and emb.features.dtype == torch.float32
    assert emb.vision == taming["enc"].VisionSpec(32, 257, 24, 224)
    assert torch.allclose(emb.features, clip_tokens_by_hand(micro_cv, pixels), atol=1e-5)
    assert torch.equal(emb.subject, pixels)
    assert emb.info["masked"] and emb.info["background"] == "black"


def test_removing_the_background_makes_the_embedding_ignore_it(taming, micro_cv):  # noqa: F811
    img, mask = subject_photo(seed=3)
    other_bg, _ = subject_photo(seed=4)  # same subject, different background noise
    other = img * mask[..., None] + other_bg * (1 - mask[..., None])
    other[:, :10] = torch.rand(1, 10, 80, 3, generator=torch.Generator().manual_seed(5))  # and another top strip
    assert float(mask[:, :10].max()) == 0.0
    enc = taming["obj"].encode_object
    masked_a, masked_b = enc(micro_cv, img, mask).features, enc(micro_cv, other, mask).features
    whole_a, whole_b = enc(micro_cv, img).features, enc(micro_cv, other).features
    assert torch.equal(masked_a, masked_b)
    assert not torch.allclose(whole_a, whole_b, atol=1e-3)


def test_rgba_grey_resized_mask_and_batches(taming, micro_cv):  # noqa: F811
    img, mask = subject_photo(h=48, w=48)
    enc = taming["obj"].encode_object
    rgb = enc(micro_cv, img, mask).features
    rgba = enc(micro_cv, torch.cat([img, torch.ones(1, 48, 48, 1)], -1), mask).features
    assert torch.equal(rgb, rgba)
    grey = enc(micro_cv, img.mean(-1, keepdim=True), mask)
    assert grey.features.shape == rgb.shape
    big_mask = torch.nn.functional.interpolate(mask[:, None], size=(96, 96), mode="nearest")[:, 0]
    assert enc(micro_cv, img, big_mask).features.shape == rgb.shape  # a mask of another size is resized
    batch = enc(micro_cv, torch.cat([img, img.flip(2)]), mask)  # one mask for two images
    assert batch.features.shape[0] == 2 and torch.allclose(batch.features[:1], rgb, atol=1e-5)


@pytest.mark.parametrize("case, message", [
    ("empty mask", "mask 0 is empty"),
    ("mask batch", "3 masks for 2 images"),
    ("two channels", "2 channels"),
    ("tiny", "only 8x8 pixels"),
    ("not an image", "must be an IMAGE batch"),
    ("mask rank", "must be a MASK"),
    ("background", "background must be one of"),
    ("crop", "crop must be one of"),
])
def test_bad_subject_input_is_refused_in_plain_words(taming, case, message):
    img, mask = subject_photo(h=32, w=32)
    two = torch.cat([img, img])
    args = {"empty mask": (img, torch.zeros(1, 32, 32)), "mask batch": (two, torch.ones(3, 32, 32)),
            "two channels": (img[..., :2], None), "tiny": (img[:, :8, :8], None),
            "not an image": (img[0], None), "mask rank": (img, torch.ones(1, 1, 32, 32))}
    kwargs = {"background": {"background": "blue"}, "crop": {"crop": "tight"}}
    a = args.get(case, (img, mask))
    with pytest.raises(ValueError, match=message):
        taming["obj"].prepare_subject(*a, size=32, **kwargs.get(case, {}))


def test_clip_vision_is_required(taming):
    img, mask = subject_photo()
    with pytest.raises(ValueError, match="clip_vision must be a CLIP_VISION"):
        taming["obj"].encode_object(object(), img, mask)


@pytest.mark.parametrize("queries, depth", [(4, 2), (0, 0)], ids=["resampler", "every_token"])
def test_projection_equals_the_independent_computation(taming, micro_cv, queries, depth):  # noqa: F811
    model = m.micro_model()
    adapter = random_adapter(taming, model, vision_of(taming, micro_cv), queries=queries, depth=depth, seed=5)
    spec = adapter.module.spec
    feats = torch.randn(2, 257, 32, generator=torch.Generator().manual_seed(0))
    tokens = adapter.module.project(feats)
    assert tokens.shape == (2, queries or 257, 64)
    expected = manual_projection(adapter.module.state_dict(), spec, feats)
    assert torch.allclose(tokens.double(), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"\(batch, tokens, 32\)"):
        adapter.module.project(torch.randn(1, 257, 31))


def test_sd15_sizes_follow_the_model_and_the_clip_vision(taming):
    """Sized from the model's attn2 sites and the connected tower: SD1.5's 16 sites with ViT-L/14 or ViT-H/14."""
    layout_mod, enc = taming["layout"], taming["enc"]
    widths = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320]
    names = ([("input", n, 0) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
             + [("output", n, 0) for n in range(3, 12)])
    sites = tuple(layout_mod.TransformerSite(n, "", w, w, 8, w // 8, 768, 1) for n, w in zip(names, widths))
    layout = layout_mod.AttentionLayout(sites, "SD15", "EPS", 320, 768, 4)
    for vision, name in ((enc.VisionSpec(1024, 257, 24), "ViT-L/14"), (enc.VisionSpec(1280, 257, 32), "ViT-H/14")):
        spec = enc.TamingSpec.for_layout(layout, vision)
        shapes = spec.expected_shapes()
        assert spec.vision.name == name
        kv = sum(2 * 768 * w for w in widths)
        assert sum(shapes[k][0] * shapes[k][1] for k in shapes if k.endswith(("to_k.weight", "to_v.weight"))
                   and k.startswith("layers.")) == kv == 19_169_280  # IP-Adapter's 19.17 M for SD1.5
        assert shapes["projection.proj_in.weight"] == (768, vision.hidden_size)
        assert shapes["null_tokens"] == (1, 16, 768)
        assert len([k for k in shapes if k.endswith(".gate")]) == 16


# --- training ---------------------------------------------------------------------------------------------------

def test_cross_reference_choice_follows_section_c3(taming):
    tr = taming["train"]
    n = 20000
    g = torch.Generator().manual_seed(0)
    is_domain = torch.rand(n, generator=g) < 0.3  # dataset mixing ratio r = 0.3
    has_other = torch.rand(n, generator=g) < 0.8
    choice = tr.cross_reference_choice(is_domain, has_other, omega=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.all(choice[~is_domain] == tr.NULL)  # general-domain samples always get phi
    assert torch.all(choice[is_domain & ~has_other] == tr.OWN)  # no other image: their own
    cross_rate = (choice[is_domain & has_other] == tr.CROSS).float().mean()
    assert abs(float(cross_rate) - 0.5) < 0.02
    rate_02 = (tr.cross_reference_choice(torch.ones(n, dtype=torch.bool), True, omega=0.2,
                                         generator=torch.Generator().manual_seed(2)) == tr.CROSS).float().mean()
    assert abs(float(rate_02) - 0.2) < 0.02
    assert torch.all(tr.cross_reference_choice([True, True], [True, True], omega=0.0) == tr.OWN)
    with pytest.raises(ValueError, match="omega"):
        tr.cross_reference_choice([True], [True], omega=1.5)
    with pytest.raises(ValueError, match="one flag per sample"):
        tr.cross_reference_choice([True, False], [True, True, True])


@pytest.mark.parametrize("null", ["fixed", "learned"])
def test_training_tokens_pick_rows_and_carry_gradients(taming, micro_cv, null):  # noqa: F811
    """Eq. 4: a general-domain row gets phi. Fixed (the default): phi is all-zero CLIP tokens, so the row holds the
    projection of zeros and its gradient reaches the projection; learned: the free null tokens get it."""
    tr = taming["train"]
    model = m.micro_model()
    adapter = random_adapter(taming, model, vision_of(taming, micro_cv), queries=3, depth=1, seed=6, null=null)
    module = adapter.module
    module.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    own, other = torch.randn(3, 257, 32, generator=g), torch.randn(3, 257, 32, generator=g)
    choice = torch.tensor([tr.OWN, tr.CROSS, tr.NULL])
    tokens = tr.training_object_tokens(module, choice, own, other)
    state = {k: v.detach() for k, v in module.state_dict().items()}
    with torch.no_grad():
        assert torch.allclose(tokens[0], module.project(own[:1])[0], atol=1e-5)
        assert torch.allclose(tokens[1], module.project(other[1:2])[0], atol=1e-5)
        if null == "fixed":
            zeros = manual_projection(state, module.spec, torch.zeros(1, 257, 32))
            assert torch.allclose(tokens[2].double(), zeros[0], atol=1e-5)
            assert "null_tokens" not in dict(module.named_parameters())     # nothing of phi is trained
        else:
            assert torch.equal(tokens[2], module.null_tokens[0])
    only_null = tr.training_object_tokens(module, torch.tensor([tr.NULL]), None, None)
    only_null.square().sum().backward()
    if null == "fixed":
        assert module.projection.latents.grad.abs().sum() > 0   # phi enters where o does: through the projection
    else:
        assert module.null_tokens.grad.abs().sum() > 0 and module.projection.latents.grad is None
    module.zero_grad(set_to_none=True)
    tokens.square().sum().backward()
    assert module.projection.proj_in.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cross-reference embedding but no such CLIP features"):
        tr.training_object_tokens(module, choice, own, None)
    module.requires_grad_(False)


@pytest.mark.parametrize("null", ["fixed", "learned"])
def test_the_same_modules_train_through_the_hosts_unet(taming, micro_cv, null):  # noqa: F811
    """Gradients of an eps loss through BaseModel.apply_model reach K/V, gates, projection and (learned) phi."""
    tr, att = taming["train"], taming["att"]
    model = m.micro_model()
    layout = taming["layout"].attention_layout(model)
    spec = taming["enc"].TamingSpec.for_layout(layout, vision_of(taming, micro_cv), queries=3, depth=1, null=null)
    module = taming["enc"].TamingEncoder(spec, dtype=torch.float32, device="cpu").init_from_model(model, layout)
    patched, source = att.attach_for_training(model, module)
    model.model.requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 257, 32, generator=g)
    x, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([1.5, 1.5])
    cond = random_cond(64, 5)[0][0].repeat(2, 1, 1)

    def loss():
        choice = tr.cross_reference_choice([True, False], [False, False])
        source.set(tr.training_object_tokens(module, choice, feats), module.null_embedding(1))
        to = {**patched.model_options["transformer_options"]}
        den = patched.model.apply_model(x + noise * 1.5, sigma, c_crossattn=cond, transformer_options=to)
        return (den - x).square().mean()

    with torch.inference_mode(False):
        module.zero_grad(set_to_none=True)
        loss().backward()
        gates = [layer.gate.grad for layer in module.layers.values()]
        assert all(gr is not None and gr.abs().sum() > 0 for gr in gates)  # gates at 0 still learn
        assert all(layer.to_k.weight.grad is None or layer.to_k.weight.grad.abs().sum() == 0
                   for layer in module.layers.values())  # tanh(0) = 0 blocks K/V at the very start
        with torch.no_grad():
            for layer in module.layers.values():
                layer.gate.fill_(0.5)
        module.zero_grad(set_to_none=True)
        loss().backward()
        assert all(layer.to_k.weight.grad.abs().sum() > 0 and layer.to_v.weight.grad.abs().sum() > 0
                   for layer in module.layers.values())
        assert module.projection.proj_in.weight.grad.abs().sum() > 0
        if null == "learned":
            assert module.null_tokens.grad.abs().sum() > 0
        else:
            assert not module.null_tokens.requires_grad    # a buffer: the projection of the fixed phi
    assert not any(p.grad is not None for p in model.model.diffusion_model.parameters())
