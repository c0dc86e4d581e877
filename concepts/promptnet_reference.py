"""How PromptNet sees the reference photo: its CLIP-vision tokens and its VAE latent (docs/methods/promptnet.md).

Two encodings:
  pack      the host's usual preprocessing: CLIP vision on a centre crop, the photo cut to a centred square at
            PromptNet's size, and the VAE's deterministic latent (the posterior mean, what VAE Encode gives);
  official  ProFusion's pipeline: the photo resized to the square without a crop (for CLIP too), and the latent
            sampled from the VAE posterior (diffusers' latent_dist.sample()), drawn with a fixed seed so the same
            photo gives the same S*.
For a square photo the two differ only by the sampled latent.
"""
import contextlib
import logging

import torch

import comfy.utils

log = logging.getLogger("likeness")

ENCODINGS = ("pack", "official")


def reference_pixels(image: torch.Tensor, side: int, crop: bool) -> torch.Tensor:
    """IMAGE (B, H, W, C) -> (B, side, side, 3): a centred square crop, or the whole photo resized (no crop)."""
    return comfy.utils.common_upscale(image[..., :3].movedim(-1, 1), side, side, "bicubic",
                                      "center" if crop else "disabled").movedim(1, -1)


class _SeededPosteriorSample(torch.nn.Module):
    """A stand-in for the VAE's DiagonalGaussianRegularizer that samples mean + std * n with its own generator."""

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(int(seed))

    def forward(self, z):
        mean, logvar = torch.chunk(z, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        noise = torch.randn(mean.shape, generator=self.generator).to(mean.device, mean.dtype)
        return mean + std * noise, None


@contextlib.contextmanager
def _sampling(vae, seed: int):
    """The VAE encodes a posterior sample for the duration (the host's VAE keeps its mode); put back afterwards."""
    import comfy.ldm.models.autoencoder as ae

    model = getattr(vae, "first_stage_model", None)
    regularizer = getattr(model, "regularization", None)
    if not isinstance(regularizer, ae.DiagonalGaussianRegularizer):
        log.warning("Likeness PromptNet: this VAE has no latent distribution to sample (e.g. TAESD); the official "
                    "reference encoding uses its deterministic latent")
        yield
        return
    model.regularization = _SeededPosteriorSample(seed)
    try:
        yield
    finally:
        model.regularization = regularizer


def encode_reference(image: torch.Tensor, clip_vision, vae, latent_size: int, encoding: str = "pack",
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP-vision last_hidden_state (B, T, W), raw VAE latent (B, 4, latent_size, latent_size)) of the photo."""
    if encoding not in ENCODINGS:
        raise ValueError(f"reference_encoding must be one of {', '.join(ENCODINGS)} (got {encoding!r})")
    official = encoding == "official"
    side = 8 * int(latent_size)
    pixels = reference_pixels(image, side, crop=not official)
    tokens = clip_vision.encode_image(pixels if official else image[..., :3], crop=not official).last_hidden_state
    with _sampling(vae, seed) if official else contextlib.nullcontext():
        latent = vae.encode(pixels)
    return tokens.float().cpu(), latent.float().cpu()
