"""PromptNet as a concept source: S* from the reference photo(s) and the current noisy latent
(docs/methods/promptnet.md).

At every model evaluation the Fusion Guider hands over x (the host's sigma-space latent), sigma and the size
conditioning of the condition being evaluated. PromptNet sees x in VP scaling (x / sqrt(1 + sigma^2), the
model's own input scaling c_in) and t = timestep(sigma), as ProFusion's pipeline feeds its UNet. When x has to
be resized to PromptNet's latent size, the resize shrinks the noise by a known gain k, so PromptNet is given
the noise level it really sees, k * sigma (promptnet_inputs). SDXL-style bodies also get the UNet's vector
conditioning y, built from the size conditioning with a zero text vector (promptnet_y).

Several reference photos (ProFusion's `extra_ref_image_*`): one S* per photo, all in one PromptNet batch. combine
"mixture" hands every photo's S* to the guider, which mixes the guided predictions with the per-photo weights
(samplers/fusion_guider.py); "average" hands over the weighted mean of the S* vectors, one condition.
"""
import torch
import torch.nn.functional as F

import comfy.model_management

from ..encoders.promptnet import fit_latent
from .concept import HIDDEN_SPACE, LikenessConcept

MIXTURE, AVERAGE = "mixture", "average"
COMBINE_MODES = (MIXTURE, AVERAGE)


def promptnet_inputs(model_patcher, x: torch.Tensor, sigma: torch.Tensor, latent_size: int):
    """(x in VP scaling at PromptNet's latent size, float timestep) for a sigma-space latent x (B, C, h, w)."""
    ms = model_patcher.get_model_object("model_sampling")
    sigma = sigma.reshape(-1).to(x.device).float()
    x_fit, gain = fit_latent(x, latent_size)
    seen = sigma * gain
    return ms.calculate_input(seen, x_fit), ms.timestep(seen).float()


def promptnet_y(model_patcher, adm_channels, batch: int, size: dict, device=None):
    """PromptNet's `y` for an SDXL-style body: the model's own size embedding (encode_adm) of `size` (width,
    height, crop_w, crop_h, target_width, target_height) with a zero text vector in front; None when the body
    has no vector conditioning. The zero text vector keeps S* independent of the prompt it is written into."""
    if adm_channels is None:
        return None
    flat = model_patcher.model.encode_adm(pooled_output=torch.zeros(batch, 0), device=device or "cpu", **size)
    if flat is None or flat.shape[-1] > adm_channels:
        raise ValueError(f"the PromptNet needs {adm_channels}-wide vector conditioning, which this model does not "
                         "build: use it with the model family it was made for")
    return F.pad(flat.float(), (adm_channels - flat.shape[-1], 0))


def parse_weights(text: str, references: int) -> list[float]:
    """The node's `weights` text: numbers separated by commas or spaces, one per photo; one number (or nothing,
    meaning 1) applies to every photo."""
    parts = [p for p in str(text).replace(",", " ").split() if p]
    try:
        values = [float(p) for p in parts] or [1.0]
    except ValueError:
        raise ValueError(f"weights must be numbers separated by commas, one per photo (got {text!r})") from None
    return check_weights(values * references if len(values) == 1 else values, references)


def check_weights(weights, references: int) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != references:
        raise ValueError(f"{len(weights)} weight(s) for {references} reference photo(s): give one weight per photo")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"the reference weights must be at least 0 and not all 0 (got {weights})")
    return weights


class PromptNetSource:
    def __init__(self, patcher, vision_tokens: torch.Tensor, reference_latent: torch.Tensor, meta: dict,
                 weights=None, combine: str = MIXTURE):
        if vision_tokens.shape[0] != reference_latent.shape[0]:
            raise ValueError("one set of CLIP-vision tokens per reference latent is needed")
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {', '.join(COMBINE_MODES)} (got {combine!r})")
        self.patcher = patcher                      # ModelPatcher around the PromptNet module
        self.vision_tokens = vision_tokens          # (K, T, W) CLIP-vision last_hidden_state, one row per photo
        self.reference_latent = reference_latent    # (K, C, h, w) raw VAE latents of the photos
        self.meta = meta
        self.references = int(reference_latent.shape[0])
        self.weights = check_weights([1.0] * self.references if weights is None else weights, self.references)
        self.combine = combine
        self.calls = 0                              # evaluations served (tests observe S* following x_t)

    def models(self):
        return [self.patcher]

    def check_model(self, model_patcher):
        from ..weights.promptnet_file import check_fits

        check_fits(self.meta, context_dim=model_patcher.model.model_config.unet_config.get("context_dim"))

    def __deepcopy__(self, memo):
        return self

    def s_star(self, x: torch.Tensor, sigma: torch.Tensor, model_patcher, size: dict | None = None) -> torch.Tensor:
        """S* of every photo for every row of x: (K, B, 1, prompt width), all K x B rows in one PromptNet call."""
        comfy.model_management.load_models_gpu([self.patcher])
        net = self.patcher.model
        device = self.patcher.load_device
        dtype = next(net.parameters()).dtype
        k, b = self.references, x.shape[0]
        x_vp, t = promptnet_inputs(model_patcher, x, sigma, net.latent_size)
        reference = model_patcher.model.process_latent_in(self.reference_latent.to(x.device, torch.float32))
        y = promptnet_y(model_patcher, net.adm_channels, k * b, size or self.default_size(), device)
        extra = {} if y is None else {"y": y.to(device, dtype)}
        self.calls += 1
        with torch.no_grad():
            s = net(reference.repeat_interleave(b, 0).to(device, dtype), x_vp.repeat(k, 1, 1, 1).to(device, dtype),
                    t.to(device).repeat(k), self.vision_tokens.repeat_interleave(b, 0).to(device, dtype), **extra)
        return s.float().reshape(k, b, *s.shape[1:])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_patcher, size: dict | None = None) -> list:
        """[(S* by text-encoder width {width: (B, 1, width)}, weight)]: one entry per photo (mixture) or one
        weighted mean carrying the weights' sum (average), so the guider's refinement scale is the same in both."""
        s = self.s_star(x, sigma, model_patcher, size)
        split = self.patcher.model.split
        if self.combine == AVERAGE or self.references == 1:
            w = torch.tensor(self.weights, dtype=s.dtype, device=s.device).reshape(-1, 1, 1, 1)
            return [(split((w * s).sum(0) / w.sum()), float(sum(self.weights)))]
        return [(split(s[i]), self.weights[i]) for i in range(self.references)]

    def default_size(self) -> dict:
        side = 8 * int(self.patcher.model.latent_size)
        return {"width": side, "height": side, "crop_w": 0, "crop_h": 0, "target_width": side, "target_height": side}

    def static_concept(self, model_patcher, source_name: str) -> LikenessConcept:
        """The concept with S* computed once, at the lowest noise level with each photo as x_t, and averaged
        with the weights: a stand-in for samplers that cannot recompute it (anything but the Fusion Guider)."""
        ms = model_patcher.get_model_object("model_sampling")
        sigma = ms.sigma_min.reshape(1).float()
        references = model_patcher.model.process_latent_in(self.reference_latent.float())
        # row i of x is photo i; S* of photo i at its own latent is the diagonal
        s = self.s_star(references, sigma.expand(self.references), model_patcher)
        s_diag = torch.stack([s[i, i] for i in range(self.references)])
        w = torch.tensor(self.weights).reshape(-1, 1, 1)
        s_star = (w * s_diag).sum(0) / w.sum()
        return LikenessConcept(vectors=self.patcher.model.split(s_star), space=HIDDEN_SPACE, source=source_name,
                               metadata={"promptnet": self.meta, "references": self.references,
                                         "weights": self.weights, "combine": self.combine}, dynamic=self)
