"""PhotoVerse trainer (Chen et al. 2023; docs/methods/photoverse.md, "Training") on the pack's PhotoVerse modules.

Trained: the text adapters (one per text encoder: SD1.x/SD2.x one, SDXL clip_l and clip_g), the image adapter,
the LoRA on every cross-attention's to_q/to_k/to_v and the visual K^S/V^S (encoders/photoverse.py); the UNet, text
encoders and CLIP vision stay frozen. The adapters are the paper's per-layer MLPs (options.mapper "mlp") or
ELITE's heads ("elite").
  words S* = text adapter(CLIP-vision layers of x_m), put into "a photo of S*" (token space, m = 5 words)
  visual tokens f = image adapter(same features)
  every attn2: O = gamma_T * Attn(Q, K^T, V^T) + sigma_V * Attn(Q, K^S f, V^S f) with the LoRA deltas on
  to_q/k/v (host weight wrappers, dW = alpha * B @ A, alpha a direct multiplier), and random fusion:
  one draw per sample shared by all layers, (2, 0) if u < r1, (0, 2) if u < r2, else (1, 1)
  the unconditional state: a fraction uncond_fraction (0.05) of the samples gets the empty prompt and the visual
  tokens of the all-zeros CLIP input, which is exactly what PhotoVerse Apply gives the unconditional (CFG) rows,
  so inference never shows the adapter an input it was not trained on
Loss: L = L_diffusion + lambda_face * L_face + lambda_rt * mean|S*| + lambda_rv * mean ||V^S_h||_2 with
lambda = 0.01 / 0.01 / 0.001; the V^S norm is taken per attention head h (the paper's attention is per head) and
averaged over blocks, heads, tokens and samples. L_face = 1 - cos(ArcFace(x), ArcFace(x')) on a quarter of the
batch with t below 500: x' is the one-step denoised estimate at the training t, decoded by the VAE with
gradients, and both images are aligned with the reference's landmarks (faces/arcface.py). lr 1e-4, batch 64,
60k steps (PhotoVerse §3.2). SDXL: the UNet's `y` is built from the pooled clip_g output of the prompt with the words in it
(train/diffusion.py size_conditioning_y).
"""
import logging
import math
import os

import torch

from ..attention.dispatcher import Contribution, add_contribution
from ..core.layout import attention_layout
from ..attention.photoverse import fused_attention
from ..concepts.concept import TOKEN_SPACE
from ..encoders.photoverse import LORA_TARGETS, R1, R2, PhotoVerseAdapter, PhotoVerseSpec, draw_fusion_scales
from ..concepts.photoverse_concept import _layer_features, clip_text_widths, clip_vision_signature, face_pixels
from .data import ImageDataset
from .diffusion import (add_noise, check_trainable_model, decode_differentiable, denoise, encode_images,
                        eps_from_denoised, eps_loss, fresh, sample_timesteps, sigmas_for, size_conditioning_y)
from .face_data import face_dataset
from .method import MethodTrainer
from .prompt import CaptionEncoder, TrainablePrompt

log = logging.getLogger("likeness.train")

TEMPLATE = "a photo of holder"   # PhotoVerse §3.1: "a photo of S*"
LAMBDA_FACE, LAMBDA_RT, LAMBDA_RV = 0.01, 0.01, 0.001
UNCOND_FRACTION = 0.05           # IP-Adapter's rate for dropping text and image together [IPA tutorial_train.py]


class FusionState:
    """What the attn2 contributions need this step: visual tokens and the per-sample fusion scales."""

    def __init__(self):
        self.visual = self.gamma = self.sigma = None

    def __deepcopy__(self, memo):
        return self


class TrainingFusion(Contribution):
    """The fused attention of one attn2 block with per-sample random-fusion scales (replaces the output)."""

    replaces = True

    def __init__(self, layer, state: FusionState):
        super().__init__(weight=1.0)
        self.layer, self.state = layer, state

    def compute(self, call):
        s = self.state
        # the projections run in the adapter's own precision (fp32 weights), the attention in the UNet's
        k, v = self.layer.visual_k(s.visual).to(call.q.dtype), self.layer.visual_v(s.visual).to(call.q.dtype)
        return fused_attention(call.q, call.k, call.v, k, v, call.heads, s.gamma, s.sigma, call.extra_options)


class LoraWrapper:
    """Host weight wrapper: W -> W + alpha * up @ down (differentiable in the LoRA pair)."""

    def __init__(self, lowrank, alpha: float):
        self.lowrank, self.alpha = lowrank, float(alpha)

    def __call__(self, weight):
        return weight + (self.alpha * self.lowrank.delta()).to(device=weight.device, dtype=weight.dtype)

    def __deepcopy__(self, memo):
        return self


def per_head_value_norm(layer, visual: torch.Tensor, heads: int) -> torch.Tensor:
    """mean over samples, tokens and heads of ||V^S_h||_2, V^S = visual_v(f) split into the block's heads."""
    v = layer.visual_v(visual)
    return v.reshape(*v.shape[:-1], heads, v.shape[-1] // heads).norm(dim=-1).mean()


def encode_words(prompt, words: dict):
    """(context, pooled or None) of the prompt with the words of every text encoder."""
    if hasattr(prompt, "encode_with_pooled"):
        return prompt.encode_with_pooled(words)
    if len(words) != 1:
        raise ValueError("training on a model with several text encoders needs the pack's SDXL prompt support "
                         "(TrainablePrompt.encode_with_pooled)")
    return prompt.encode(next(iter(words.values()))), None


class PhotoVerseStep(torch.nn.Module):
    def __init__(self, adapter: PhotoVerseAdapter, trainer):
        super().__init__()
        self.adapter = adapter
        self._trainer = [trainer]

    def forward(self, b: dict) -> dict:
        tr = self._trainer[0]
        words = self.adapter.words(b["features"])
        visual = self.adapter.visual_tokens(b["features"])
        tr.state.visual, tr.state.gamma, tr.state.sigma = visual, b["gamma"], b["sigma_v"]
        context, pooled = encode_words(tr.prompt, {w: v.float() for w, v in words.items()})
        drop = b.get("uncond")
        if drop is not None:   # the unconditional state: the empty prompt (its tokens are the zero image's)
            keep = (~drop).to(context.device)
            context = torch.where(keep[:, None, None], context, b["empty_context"].to(context))
            if pooled is not None:
                pooled = torch.where(keep[:, None], pooled, b["empty_pooled"].to(pooled))
        y = size_conditioning_y(tr.train_patcher, pooled, *b["size"]) if pooled is not None else None
        extra = {} if y is None else {"y": y}
        denoised = denoise(tr.train_patcher, b["x_t"], b["sigma"], context, **extra)
        l_diff = eps_loss(eps_from_denoised(b["x_t"], b["sigma"], denoised), b["noise"])
        l_rt = torch.stack([v.abs().mean() for v in words.values()]).mean()
        l_rv = torch.stack([per_head_value_norm(self.adapter.layers[name], visual, heads)
                            for name, heads in tr.heads.items()]).mean()
        loss = l_diff + tr.lambda_rt * l_rt + tr.lambda_rv * l_rv
        logs = {"diffusion": float(l_diff.detach()), "rt": float(l_rt.detach()), "rv": float(l_rv.detach())}
        rows = b.get("face_rows")
        if tr.arcface is not None and rows is not None and rows.numel() > 0 and tr.lambda_face > 0:
            generated = decode_differentiable(tr.base.vae, tr.train_patcher, denoised[rows])
            l_face = tr.arcface.identity_loss(b["face_reference"], generated.float(), b["face_kps"])
            loss = loss + tr.lambda_face * l_face
            logs["face"] = float(l_face.detach())
        return {"loss": loss, "logs": logs}


class PhotoVerseTrainer(MethodTrainer):
    """options: mapper ("mlp", the paper's adapters; "elite"), hidden (1024), lora_rank (8), alpha (1.0),
    r1 / r2 (1/3, 2/3), lambda_face / lambda_rt / lambda_rv, uncond_fraction (0.05), face_fraction (0.25),
    face_max_t (500), arcface (an insightface recognition .onnx or a converted .safetensors; without it L_face is
    off), template, and the face-crop options of train/face_data.face_dataset (face crop at the CLIP size, factor
    1.3, mask_source 'face_oval', the Face Crop node's default; the choices are in docs/methods/photoverse.md)."""

    name = "photoverse"
    file_name = "photoverse.safetensors"
    default_learning_rate = 1e-4

    def __init__(self, base, options, records, config, arcface=None):
        super().__init__(base, options)
        base.require("clip", "vae", "clip_vision", method="PhotoVerse training")
        check_trainable_model(base.model)
        self.records, self.config = records, config
        self.lambda_face = float(self.option("lambda_face", LAMBDA_FACE))
        self.lambda_rt = float(self.option("lambda_rt", LAMBDA_RT))
        self.lambda_rv = float(self.option("lambda_rv", LAMBDA_RV))
        self.r1, self.r2 = float(self.option("r1", R1)), float(self.option("r2", R2))
        self.uncond_fraction = float(self.option("uncond_fraction", UNCOND_FRACTION))
        if not 0.0 <= self.uncond_fraction < 1.0:
            raise ValueError(f"options.uncond_fraction must be in [0, 1) (got {self.uncond_fraction})")
        self.face_fraction = float(self.option("face_fraction", 0.25))
        self.face_max_t = int(self.option("face_max_t", 500))
        self.alpha = float(self.option("alpha", 1.0))
        self.arcface = arcface
        if self.arcface is None and self.option("arcface", ""):
            from ..faces.arcface import load_arcface
            self.arcface = load_arcface(self.option("arcface", ""))
        if self.arcface is None and self.lambda_face > 0:
            log.warning("Likeness PhotoVerse trainer: no ArcFace model (options.arcface), so L_face is off")

    def setup(self):
        self.freeze_base()
        layout = attention_layout(self.base.model)
        signature = clip_vision_signature(self.base.clip_vision)
        spec = PhotoVerseSpec.for_models(layout, signature, text_widths=clip_text_widths(self.base.clip),
                                         hidden=int(self.option("hidden", 1024)),
                                         lora_rank=int(self.option("lora_rank", 8)),
                                         mapper=str(self.option("mapper", "mlp")))
        self.adapter = PhotoVerseAdapter(spec, dtype=torch.float32, device="cpu")  # torch.nn layers, default init
        self.adapter.init_for_training(self.base.model, layout).requires_grad_(True)
        self.heads = {site.name: site.heads for site in layout.sites}
        self.state = FusionState()
        self.train_patcher = self.base.model.clone()
        for site in layout.sites:
            layer = self.adapter.layers[site.name]
            for t in LORA_TARGETS:
                self.train_patcher.add_weight_wrapper(f"diffusion_model.{site.path}.attn2.to_{t}.weight",
                                                      LoraWrapper(layer.lora(t), self.alpha))
            add_contribution(self.train_patcher, "attn2", site.key, TrainingFusion(layer, self.state))
        widths = spec.text_widths
        self.prompt = TrainablePrompt(self.base.clip, self.option("template", TEMPLATE), "holder",
                                      widths[0] if len(widths) == 1 else list(widths), spec.num_words, TOKEN_SPACE)
        self.captions = CaptionEncoder(self.base.clip)
        if self.arcface is not None:
            self.arcface = self.arcface.to(self.train_patcher.load_device)
        self.module = PhotoVerseStep(self.adapter, self)
        return self

    def dataset(self):
        c = self.config
        base = ImageDataset(self.records, c.resolution, c.crop, c.flip, "", c.seed)
        return face_dataset(base, self.options, self.base.clip_vision.image_size,
                            os.path.join(c.output_dir, "cache", "faces"))

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        images = fresh(batch["image"]).float()
        n = images.shape[0]
        device = self.train_patcher.load_device
        with torch.no_grad():
            pixels = face_pixels(self.base.clip_vision, fresh(batch["face"]).float(), fresh(batch["face_mask"]).float())
            drop = torch.rand(n, generator=generator) < self.uncond_fraction
            pixels[drop] = 0.0   # the all-zeros CLIP input, as PhotoVerse Encode's unconditional tokens
            features = _layer_features(self.base.clip_vision, pixels, self.adapter.spec.clip_layers)
            x0 = encode_images(self.base.vae, self.train_patcher, images)
            t = sample_timesteps(n, generator)
            kps = fresh(batch["image_kps"]).float()
            usable = torch.isfinite(kps).flatten(1).all(1) & ~drop
            n_face = min(int(usable.sum()), math.ceil(self.face_fraction * n)) if self.arcface is not None else 0
            rows = torch.nonzero(usable).reshape(-1)[:n_face]
            if n_face:
                t[rows] = sample_timesteps(n_face, generator, 0, min(self.face_max_t, 1000))
            sigma = sigmas_for(self.train_patcher, t)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = add_noise(self.train_patcher, x0.cpu(), sigma, noise)
            gamma, sigma_v = draw_fusion_scales(n, generator, self.r1, self.r2)
        out = {"x_t": x_t.to(device), "sigma": sigma.to(device), "noise": noise.to(device),
               "features": features.to(device), "gamma": gamma.to(device), "sigma_v": sigma_v.to(device),
               "size": (int(images.shape[1]), int(images.shape[2]))}
        if bool(drop.any()):
            empty, pooled = self.captions.with_pooled([""] * n)
            out.update({"uncond": drop.to(device), "empty_context": empty.to(device)})
            if pooled is not None:
                out["empty_pooled"] = pooled.to(device)
        if n_face:
            out.update({"face_rows": rows.to(device), "face_reference": images[rows].permute(0, 3, 1, 2).to(device),
                        "face_kps": kps[rows].to(device)})
        return out

    def export(self, directory: str, module=None) -> str:
        from ..weights.photoverse import save_photoverse

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, self.file_name)
        save_photoverse(path, (module or self.module).adapter, origin="trained", extra={"training": self.hyperparameters()})
        return path

    def hyperparameters(self) -> dict:
        return {"method": "PhotoVerse (docs/methods/photoverse.md)", "base_model": self.base.name, "alpha": self.alpha,
                "mapper": self.adapter.spec.text_mapper, "r1": self.r1, "r2": self.r2,
                "lambda_face": self.lambda_face if self.arcface is not None else 0.0, "lambda_rt": self.lambda_rt,
                "lambda_rv": self.lambda_rv, "lambda_rv_norm": "per head", "uncond_fraction": self.uncond_fraction,
                "face_fraction": self.face_fraction, "face_max_t": self.face_max_t}

    def sample_images(self, module=None, steps: int = 30):
        """PhotoVerse Encode -> Likeness Prompt + PhotoVerse Apply (current weights) -> KSampler."""
        import comfy.sample
        import nodes

        from ..attention.photoverse import apply_photoverse
        from ..concepts.prompt_injection import encode_likeness_prompt
        from ..concepts.photoverse_concept import encode_photoverse_concept
        from ..weights.photoverse import LoadedPhotoVerse

        item = self.dataset()[0]
        loaded = LoadedPhotoVerse((module or self.module).adapter, "training")
        concept = encode_photoverse_concept(loaded, self.base.clip_vision, item["face"][None], item["face_mask"][None])
        model = apply_photoverse(self.base.model, loaded, concept)
        _, positive, _ = encode_likeness_prompt(self.base.clip, "a photo of holder in a garden", concept, "holder",
                                                "person", 1.0)
        negative = nodes.CLIPTextEncode().encode(self.base.clip, "")[0]
        size = self.config.resolution // 8
        latent = torch.zeros(1, 4, size, size)
        samples = comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 0), steps, 5.0, "euler", "normal",
                                      positive, negative, latent, seed=0, disable_pbar=True)
        return self.base.vae.decode(samples)
