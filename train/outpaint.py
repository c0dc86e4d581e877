"""ProFusion's fine-tuning augmentation by outpainting (ProFusion App., "Data augmentation"; docs/training.md).

Each augmented view keeps the subject inside ProFusion's face box after a random resize and rotation; the area the
warp emptied is outpainted by an inpainting model with the paper's prompts at CFG 7.5, so the views get varied,
plausible backgrounds instead of a flat fill. This runs the host's own inpainting path: InpaintModelConditioning
(the masked image and the mask as the inpainting UNet's extra channels, plus a noise mask) and KSampler. The
visible pixels are put back afterwards, so only the emptied area changes.
"""
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("likeness.train")

# ProFusion App.: "a photo of a man/woman, ..." (the class word is the user's) and its negative prompt.
PROMPT = ("a photo of a {subject}, highly detailed, soft natural lighting, photo realism, professional portrait, "
          "ultra-detailed, 4k resolution, wallpaper, hd wallpaper")
NEGATIVE = ("magazine, frame, tiled, repeated, multiple people, multiple faces, group of people, split frame, "
            "multiple panel, split image, watermark, border, diptych, triptych")
CFG = 7.5
SAMPLER, SCHEDULER = "euler", "ddim_uniform"   # deterministic DDIM; the paper names no sampler


@dataclass
class Outpainter:
    model: object          # MODEL: an inpainting checkpoint's UNet (SD-2-inpainting for SD2), any model works
    clip: object           # its text encoder
    vae: object            # its VAE
    steps: int = 50
    prompt: str = PROMPT.format(subject="person")
    negative: str = NEGATIVE
    cfg: float = CFG

    def is_inpainting_model(self) -> bool:
        return "masked_image" in getattr(self.model.model, "concat_keys", ())

    def check(self, context_dim: int | None):
        own = self.model.model.model_config.unet_config.get("context_dim")
        if context_dim is not None and own != context_dim:
            raise ValueError(f"inpaint_model has cross-attention {own} but the model being fine-tuned has {context_dim}: "
                             "connect the inpainting checkpoint of the same family (SD-2-inpainting for SD2-base)")
        if not 1 <= int(self.steps) <= 1000:
            raise ValueError(f"outpaint_steps must be between 1 and 1000 (got {self.steps})")

    @torch.no_grad()
    def __call__(self, views: torch.Tensor, visible: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """views (N, S, S, 3) and visible (N, S, S, 1) in [0, 1] -> views with the invisible area outpainted."""
        import nodes

        kind = "an inpainting model" if self.is_inpainting_model() else "a model without inpainting channels (latent-mask inpainting)"
        log.info("Likeness ProFusion fine-tuning: outpainting %d views with %s, %d steps, CFG %.1f", len(views) - 1,
                 kind, self.steps, self.cfg)
        positive = nodes.CLIPTextEncode().encode(self.clip, self.prompt)[0]
        negative = nodes.CLIPTextEncode().encode(self.clip, self.negative)[0]
        out = []
        for i, (view, seen) in enumerate(zip(views, visible)):
            hole = 1.0 - seen[..., 0]
            if float(hole.max()) < 0.5:       # nothing emptied (the photo itself)
                out.append(view)
                continue
            pos, neg, latent = nodes.InpaintModelConditioning().encode(positive, negative, view[None], self.vae,
                                                                       hole[None], noise_mask=True)
            sampled = nodes.common_ksampler(self.model, int(seed) + i, int(self.steps), self.cfg, SAMPLER, SCHEDULER,
                                            pos, neg, latent)[0]["samples"]
            painted = self.vae.decode(sampled)[0, ..., :3].float().cpu()
            if painted.shape != view.shape:
                painted = torch.nn.functional.interpolate(painted.movedim(-1, 0)[None], size=view.shape[:2],
                                                          mode="bilinear")[0].movedim(0, -1)
            out.append((seen * view + (1.0 - seen) * painted).clamp(0, 1))
        return torch.stack(out)
