"""PromptNet as a concept source: S* from the reference and the current noisy latent (docs/methods/promptnet.md, D.5, D.7).

At every model evaluation the Fusion Guider hands over x (the host's sigma-space latent) and sigma; PromptNet
sees x in VP scaling (x / sqrt(1 + sigma^2), the model's own input scaling c_in) and t = timestep(sigma), as
ProFusion's pipeline feeds its UNet.
"""
import torch

import comfy.model_management

from .concept import HIDDEN_SPACE, LikenessConcept


class PromptNetSource:
    def __init__(self, patcher, vision_tokens: torch.Tensor, reference_latent: torch.Tensor, meta: dict):
        self.patcher = patcher                      # ModelPatcher around the PromptNet module
        self.vision_tokens = vision_tokens          # (1, T, W) CLIP-vision last_hidden_state
        self.reference_latent = reference_latent    # (1, 4, h, w) raw VAE latent of the reference
        self.meta = meta
        self.calls = 0                              # evaluations served (tests observe S* following x_t)

    def models(self):
        return [self.patcher]

    def check_model(self, model_patcher):
        from ..weights.promptnet_file import check_fits

        check_fits(self.meta, context_dim=model_patcher.model.model_config.unet_config.get("context_dim"))

    def __deepcopy__(self, memo):
        return self

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, model_patcher) -> torch.Tensor:
        """S* for each row of x: (B, 1, prompt width)."""
        comfy.model_management.load_models_gpu([self.patcher])
        net = self.patcher.model
        device = self.patcher.load_device
        dtype = next(net.parameters()).dtype
        ms = model_patcher.get_model_object("model_sampling")
        sigma = sigma.reshape(-1).to(x.device)
        x_vp = ms.calculate_input(sigma, x)
        t = ms.timestep(sigma).float()
        reference = model_patcher.model.process_latent_in(self.reference_latent.to(x.device, torch.float32))
        b = x.shape[0]
        self.calls += 1
        with torch.no_grad():
            s_star = net(reference.expand(b, -1, -1, -1).to(device, dtype), x_vp.to(device, dtype), t.to(device),
                         self.vision_tokens.expand(b, -1, -1).to(device, dtype))
        return s_star.float()

    def static_concept(self, model_patcher, source_name: str) -> LikenessConcept:
        """The concept with S* computed once, at the lowest noise level with the reference as x_t: a stand-in for
        samplers that cannot recompute it (anything but the Fusion Guider)."""
        ms = model_patcher.get_model_object("model_sampling")
        sigma = ms.sigma_min.reshape(1).float()
        x = model_patcher.model.process_latent_in(self.reference_latent.float()) + 0.0 * sigma
        s_star = self(x, sigma, model_patcher)[0]
        return LikenessConcept(vectors={s_star.shape[-1]: s_star}, space=HIDDEN_SPACE, source=source_name,
                               metadata={"promptnet": self.meta}, dynamic=self)
