"""How PromptNet Concept encodes the reference: the pack's encoding (centre crop, the VAE's mean latent) and
ProFusion's official one (resize without a crop, a latent sampled from the VAE posterior)."""
import logging

import pytest
import torch

import micro as m
from fixtures_promptnet import micro_promptnet


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.concepts import promptnet_reference
    from comfyui_likeness.nodes import promptnet
    return {"ref": promptnet_reference, "nodes": promptnet}


@pytest.fixture(scope="module")
def models():
    return {"vae": m.micro_kl_vae(), "taesd": m.micro_vae(), "cv": m.micro_clip_vision()}


def photo(h=72, w=96, seed=0):
    return torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(seed))


def posterior(vae, pixels):
    """Mean and std of the VAE's latent distribution, from its encoder and quant_conv directly."""
    fsm = vae.first_stage_model
    with torch.no_grad():
        moments = fsm.quant_conv(fsm.encoder(pixels.movedim(-1, 1) * 2.0 - 1.0))
    mean, logvar = moments.chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def test_official_encoding_samples_the_posterior_and_does_not_crop(lib, models):
    vae, cv = models["vae"], models["cv"]
    image = photo()
    tokens_p, latent_p = lib["ref"].encode_reference(image, cv, vae, 8, "pack")
    tokens_o, latent_o = lib["ref"].encode_reference(image, cv, vae, 8, "official")
    squashed = lib["ref"].reference_pixels(image, 64, crop=False)
    mean, std = posterior(vae, squashed)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(latent_o, mean + std * noise, atol=1e-5)                 # a posterior sample
    assert float(std.min()) > 0 and not torch.allclose(latent_o, mean, atol=1e-3)
    cropped_mean, _ = posterior(vae, lib["ref"].reference_pixels(image, 64, crop=True))
    assert torch.allclose(latent_p, cropped_mean, atol=1e-5)                        # the pack: mean of the crop
    assert torch.equal(latent_o, lib["ref"].encode_reference(image, cv, vae, 8, "official")[1])   # fixed seed
    assert torch.allclose(tokens_o, cv.encode_image(squashed, crop=False).last_hidden_state, atol=1e-6)
    assert torch.allclose(tokens_p, cv.encode_image(image, crop=True).last_hidden_state, atol=1e-6)
    assert not torch.allclose(tokens_o, tokens_p, atol=1e-4)                        # a wide photo: crop matters
    # the VAE is as it was: VAE Encode still gives the mean
    assert torch.allclose(vae.encode(squashed), mean, atol=1e-5)
    with pytest.raises(ValueError, match="reference_encoding"):
        lib["ref"].encode_reference(image, cv, vae, 8, "diffusers")


def test_square_photo_differs_only_by_the_sampled_latent(lib, models):
    image = photo(64, 64, seed=1)
    tokens_p, _ = lib["ref"].encode_reference(image, models["cv"], models["vae"], 8, "pack")
    tokens_o, _ = lib["ref"].encode_reference(image, models["cv"], models["vae"], 8, "official")
    assert torch.allclose(tokens_p, tokens_o, atol=1e-6)


def test_a_vae_without_a_distribution_falls_back_with_a_warning(lib, models, caplog):
    image = photo()
    with caplog.at_level(logging.WARNING, logger="likeness"):
        _, latent = lib["ref"].encode_reference(image, models["cv"], models["taesd"], 8, "official")
    assert "no latent distribution" in caplog.text
    assert torch.allclose(latent, models["taesd"].encode(lib["ref"].reference_pixels(image, 64, crop=False)), atol=1e-6)


def test_promptnet_concept_node_takes_the_encoding(lib, models):
    net = micro_promptnet(vision_width=32)
    meta = {"unet_config": net.unet_config, "vision_width": 32, "latent_size": 8}
    promptnet = lib["nodes"].PromptNetModel(net, meta, "micro")
    model, image = m.micro_model(), photo()
    concept = lib["nodes"].LikenessPromptNetConcept.execute
    pack = concept(promptnet, models["cv"], models["vae"], model, image).result[0]
    official = concept(promptnet, models["cv"], models["vae"], model, image, reference_encoding="official").result[0]
    (a,), (b,) = pack.vectors.values(), official.vectors.values()
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-6)
    assert official.dynamic.reference_latent.shape == (1, 4, 8, 8)
