"""ProFusion trainers (Zhou et al. 2023; docs/methods/promptnet.md) on the pack's PromptNet (encoders/promptnet.py).

Pre-training: PromptNet learns S* = PromptNet(x̄0, x_t, t, CLIP-vision tokens of x̄0) through the frozen
UNet and text encoder: eps-MSE with t ~ U{0..999}, the reference equal to the target image, "a photo of S*" as
the prompt (S* overwrites the whole input embedding of its slot: hidden space, concepts/prompt_injection.py),
AdamW lr 2e-5 (0.9/0.999, wd 1e-2, eps 1e-8), gradient clipping 1.0, no regularisation of S*.
SDXL: S* has one part per text encoder (clip_l 768 + clip_g 1280), the UNet gets the `y` of the pooled output of
"a photo of S*" and the image size, PromptNet the `y` of the image size with a zero text vector
(concepts/promptnet_source.py promptnet_y), exactly as the Fusion Guider gives them at sampling time.

Test-time fine-tuning: PromptNet plus every to_q/to_k/to_v of the UNet's attention (attn1 and attn2; not
to_out) on one subject: AdamW lr 2e-5, eps-MSE, "a photo of S*", reference and target drawn independently
from a small set of augmented views of the photo. The learned weight changes are trainable deltas applied as
the host's weight wrappers during training and handed out as ModelPatcher.add_patches "diff" patches, so the
base model is never modified.
"""
import copy
import logging
import math
import os

import torch
import torch.nn.functional as F

from ..concepts.concept import HIDDEN_SPACE
from ..concepts.prompt_injection import encoder_widths
from ..concepts.promptnet_source import promptnet_inputs, promptnet_y
from ..encoders.promptnet import PromptNet
from .data import ImageDataset
from .diffusion import (add_noise, check_trainable_model, denoise, encode_images, eps_from_denoised, eps_loss,
                        fresh, gradients_on, sample_timesteps, sigmas_for, size_conditioning_y)
from .init_weights import torch_reset
from .method import MethodTrainer
from .prompt import TrainablePrompt

log = logging.getLogger("likeness.train")

TEMPLATE = "a photo of holder"     # ProFusion's "a photo of " + S*
SAMPLE_PROMPT = "a holder in a garden, detailed photo"
QKV = ("to_q", "to_k", "to_v")


def vision_width(clip_vision) -> int:
    emb = clip_vision.model.vision_model.embeddings
    return int(emb.patch_embedding.out_channels)


def vision_tokens(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """CLIP-vision last_hidden_state (before the post-LayerNorm), as PromptNet Concept computes it."""
    with torch.no_grad():
        return clip_vision.encode_image(images[..., :3].float(), crop=True).last_hidden_state.float()


def new_promptnet(model_patcher, clip_vision, prompt_width, latent_size: int, region_channels: int = 128,
                  init_from_unet: bool = True) -> PromptNet:
    """A PromptNet for the base model: torch's default init for every layer, then the UNet's encoder half
    copied in (ProFusion initialises from the base UNet). prompt_width: one width, or one per text encoder."""
    config = model_patcher.model.model_config.unet_config
    net = PromptNet(config, vision_width(clip_vision), prompt_width, latent_size, region_channels)
    torch_reset(net)
    if init_from_unet:
        copied = net.init_from_unet(model_patcher.model.diffusion_model)
        log.info("Likeness trainer: PromptNet body initialised from the UNet (%d tensors)", copied)
    return net


class PromptNetStep(torch.nn.Module):
    """forward(prepared) -> eps-MSE of the UNet conditioned on "a photo of S*", S* from PromptNet."""

    def __init__(self, promptnet: PromptNet, trainer, deltas: torch.nn.ParameterDict | None = None):
        super().__init__()
        self.promptnet = promptnet
        self.deltas = deltas
        self._trainer = [trainer]   # a plain reference: the frozen models are not submodules

    def forward(self, b: dict) -> dict:
        tr = self._trainer[0]
        net = self.promptnet
        x_t = b["x_t"]
        height, width = int(b.get("height", 8 * x_t.shape[-2])), int(b.get("width", 8 * x_t.shape[-1]))
        x_vp, t = promptnet_inputs(tr.train_patcher, x_t, b["sigma"], net.latent_size)
        size = {"width": width, "height": height, "crop_w": 0, "crop_h": 0, "target_width": width, "target_height": height}
        y_net = promptnet_y(tr.train_patcher, net.adm_channels, x_t.shape[0], size, x_t.device)
        s_star = net(b["reference"], x_vp, t, b["tokens"], **({} if y_net is None else {"y": y_net}))
        context, pooled = tr.prompt.encode_with_pooled(net.split(s_star.float()))
        y = size_conditioning_y(tr.train_patcher, pooled, height, width)
        denoised = denoise(tr.train_patcher, x_t, b["sigma"], context, **({} if y is None else {"y": y}))
        loss = eps_loss(eps_from_denoised(b["x_t"], b["sigma"], denoised), b["noise"])
        logs = {"diffusion": float(loss.detach()), "s_star_norm": float(s_star.detach().norm(dim=-1).mean())}
        if tr.l2_reg > 0:
            loss = loss + tr.l2_reg * s_star.float().pow(2).mean()
        return {"loss": loss, "logs": logs}


class PromptNetPretrainer(MethodTrainer):
    """options: template, latent_size (default resolution / 8), region_channels (128), init_from_unet (True),
    promptnet (a PromptNet file to continue from), l2_reg (0: ProFusion trains without regularisation)."""

    name = "promptnet"
    file_name = "promptnet.safetensors"
    default_learning_rate = 2e-5

    def __init__(self, base, options=None, data_records=None, resolution: int = 512, crop: str = "random",
                 flip: bool = False, seed: int = 0):
        super().__init__(base, options)
        base.require("clip", "vae", "clip_vision", method="ProFusion pre-training")
        check_trainable_model(base.model)
        self.records, self.resolution, self.crop, self.flip, self.seed = data_records, int(resolution), crop, flip, seed
        self.l2_reg = float(self.option("l2_reg", 0.0))
        self.net = None

    def build_promptnet(self) -> PromptNet:
        source = self.option("promptnet", "")
        if source:
            from ..weights.promptnet_file import check_fits, load_promptnet

            net, meta = load_promptnet(source)
            check_fits(meta, context_dim=self.base.model.model.model_config.unet_config.get("context_dim"),
                       vision_width=vision_width(self.base.clip_vision), name=f"PromptNet '{os.path.basename(source)}'")
            return net.requires_grad_(True)
        latent = int(self.option("latent_size", self.resolution // 8))
        return new_promptnet(self.base.model, self.base.clip_vision, self.text_width(), latent,
                             int(self.option("region_channels", 128)), bool(self.option("init_from_unet", True)))

    def text_width(self) -> list[int]:
        """One S* part per text encoder of the CLIP (SDXL: [768, 1280])."""
        return encoder_widths(self.base.clip)

    def setup(self):
        self.freeze_base()
        self.net = self.build_promptnet().float().train()
        if self.net.latent_size * 8 != self.resolution:
            log.warning("Likeness trainer: PromptNet latent size %d means %dpx images; the data is %dpx",
                        self.net.latent_size, self.net.latent_size * 8, self.resolution)
        self.prompt = TrainablePrompt(self.base.clip, self.option("template", TEMPLATE), "holder",
                                      self.net.prompt_widths, 1, HIDDEN_SPACE)
        self.train_patcher = self.base.model.clone()
        self.module = PromptNetStep(self.net, self)
        return self

    def dataset(self):
        return ImageDataset(self.records, self.resolution, self.crop, self.flip, seed=self.seed)

    def device(self):
        return self.train_patcher.load_device

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        images = fresh(batch["image"]).float()
        separate = "reference_image" in batch   # pre-training: the reference is the target
        reference_images = fresh(batch["reference_image"]).float() if separate else images
        device = self.device()
        with torch.no_grad():
            x0 = encode_images(self.base.vae, self.train_patcher, images)
            reference = encode_images(self.base.vae, self.train_patcher, reference_images) if separate else x0
            tokens = vision_tokens(self.base.clip_vision, reference_images)
            t = sample_timesteps(x0.shape[0], generator)
            sigma = sigmas_for(self.train_patcher, t)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = add_noise(self.train_patcher, x0.cpu(), sigma, noise)
        return {"x_t": x_t.to(device), "sigma": sigma.to(device), "noise": noise.to(device),
                "reference": reference.to(device), "tokens": tokens.to(device), "t": t,
                "height": int(images.shape[1]), "width": int(images.shape[2])}

    def export(self, directory: str, module=None) -> str:
        from ..weights.promptnet_file import save_promptnet

        net = (module or self.module).promptnet
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, self.file_name)
        save_promptnet(path, net, extra={"origin": "trained", "training": self.hyperparameters()})
        return path

    def hyperparameters(self) -> dict:
        return {"method": "ProFusion PromptNet pre-training (docs/methods/promptnet.md)", "base_model": self.base.name,
                "template": self.option("template", TEMPLATE), "l2_reg": self.l2_reg,
                "resolution": self.resolution}

    def sample_reference(self):
        item = self.dataset()[0]
        return item["image"][None]

    def sample_images(self, module=None, steps: int = 30):
        return sample_profusion(self.base, (module or self.module).promptnet, self.sample_reference(), steps,
                                self.base.model)


def sample_profusion(base, net, reference_image, steps, model, prompt: str = SAMPLE_PROMPT, seed: int = 0):
    """ProFusion as the nodes run it: PromptNet Concept -> Likeness Prompt -> KSampler (Fusion)."""
    import comfy.model_management
    import comfy.model_patcher
    import nodes

    from ..concepts.prompt_injection import encode_likeness_prompt
    from ..concepts.promptnet_reference import encode_reference
    from ..concepts.promptnet_source import PromptNetSource
    from ..samplers.ksampler_fusion import ksampler_fusion

    patcher = comfy.model_patcher.ModelPatcher(net, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    meta = {"unet_config": net.unet_config, "vision_width": net.vision_width, "latent_size": net.latent_size}
    with torch.no_grad():
        tokens, latent = encode_reference(reference_image.float(), base.clip_vision, base.vae, net.latent_size)
    source = PromptNetSource(patcher, tokens, latent, meta)
    concept = source.static_concept(model, "promptnet:training")
    fused, concept_cond, context = encode_likeness_prompt(base.clip, prompt, concept, "holder", "person", 0.7)
    negative = nodes.CLIPTextEncode().encode(base.clip, "")[0]
    channels = int(net.unet_config.get("in_channels", 4))
    latent = {"samples": torch.zeros(1, channels, net.latent_size, net.latent_size)}
    out = ksampler_fusion(model, seed, steps, "euler", "ddim_uniform", negative, fused, concept_cond, context, latent,
                          1.0, 7.0, 7.0, 5.0, 1, 1.0, True, 0.0, 1.0)
    return base.vae.decode(out["samples"])


# --- test-time fine-tuning ------------------------------------------------------------------------------------

class DeltaWrapper:
    """A host weight wrapper (ModelPatcher.add_weight_wrapper): W -> W + dW, differentiable in dW."""

    def __init__(self, delta: torch.nn.Parameter):
        self.delta = delta

    def __call__(self, weight):
        return weight + self.delta.to(device=weight.device, dtype=weight.dtype)

    def __deepcopy__(self, memo):
        return self


def attention_qkv_keys(model_patcher) -> list[str]:
    """Host weight keys of every to_q/to_k/to_v in the UNet's attention layers (attn1 and attn2)."""
    keys = []
    for name, module in model_patcher.model.diffusion_model.named_modules():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] in QKV and parts[-2] in ("attn1", "attn2") and hasattr(module, "weight"):
            keys.append(f"diffusion_model.{name}.weight")
    if not keys:
        raise ValueError("the model has no attention to_q/to_k/to_v layers to fine-tune")
    return keys


def _slot(key: str) -> str:
    return key.replace(".", "__")


def augment_views(image: torch.Tensor, count: int, size: int, seed: int = 0,
                  box_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """ProFusion's mini-dataset from one photo before filling (docs/training.md): the photo itself plus `count`
    views, each a square crop resized to size, randomly mirrored, multiplied by the fixed face-box mask (rows
    30-460, columns 100-400 of 512), then a RandomAffine (rotation +-10 degrees, translation 20 %, scale 0.6-1.0).
    image (H, W, 3) -> (views (count + 1, size, size, 3) with the emptied area black, visible (count + 1, size, size, 1))."""
    from .data import square_resize

    g = torch.Generator().manual_seed(int(seed))
    base, _ = square_resize(image.float(), size)
    views, visible = [base], [torch.ones(size, size, 1)]
    mask = torch.zeros(size, size)
    if box_mask:
        r0, r1, c0, c1 = (round(v * size / 512) for v in (30, 460, 100, 400))
        mask[r0:r1, c0:c1] = 1.0
    else:
        mask.fill_(1.0)
    for _ in range(int(count)):
        x = base.flip(1) if torch.rand(1, generator=g) < 0.5 else base
        x = x * mask[..., None]
        angle = math.radians(float(torch.empty(1).uniform_(-10, 10, generator=g)))
        scale = float(torch.empty(1).uniform_(0.6, 1.0, generator=g))
        tx, ty = (float(torch.empty(1).uniform_(-0.2, 0.2, generator=g)) * 2 for _ in range(2))
        # affine_grid maps output to input coordinates: the inverse of rotate-scale-translate
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, sin, -(cos * tx + sin * ty)], [-sin, cos, -(-sin * tx + cos * ty)]])[None]
        chw = torch.cat([x, mask[..., None]], -1).permute(2, 0, 1)[None]
        grid = F.affine_grid(theta, list(chw.shape), align_corners=False)
        warped = F.grid_sample(chw, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        views.append(warped[:3].permute(1, 2, 0).clamp(0, 1))
        visible.append(warped[3:].permute(1, 2, 0).clamp(0, 1))
    return torch.stack(views), torch.stack(visible)


def fill_views(views: torch.Tensor, visible: torch.Tensor, fill: str = "mean") -> torch.Tensor:
    """The emptied area filled with the mean colour of each view's visible pixels ('mean') or left black."""
    if fill not in ("mean", "black"):
        raise ValueError(f"fill must be 'mean' or 'black' (got {fill!r})")
    if fill == "black":
        return views
    colour = (views * visible).sum((1, 2), keepdim=True) / visible.sum((1, 2), keepdim=True).clamp_min(1.0)
    return (views + (1.0 - visible) * colour).clamp(0, 1)


def make_views(image: torch.Tensor, count: int, size: int, seed: int = 0, box_mask: bool = True,
               fill: str = "mean", outpainter=None) -> torch.Tensor:
    """augment_views, then the emptied area outpainted (outpainter: train/outpaint.py, as ProFusion does) or,
    without one, filled (fill_views). image (H, W, 3) -> (count + 1, size, size, 3)."""
    views, visible = augment_views(image, count, size, seed, box_mask)
    if outpainter is not None:
        return outpainter(views, visible, seed)
    if count:
        log.info("Likeness ProFusion fine-tuning: no inpainting model given, so the area the augmentation emptied is "
                 "filled (%s) instead of outpainted (ProFusion outpaints it with SD-2-inpainting)",
                 "with the mean colour" if fill == "mean" else "black")
    return fill_views(views, visible, fill)


class ViewsDataset(torch.utils.data.Dataset):
    def __init__(self, views: torch.Tensor):
        self.views = views

    def __len__(self):
        return self.views.shape[0]

    def __getitem__(self, index):
        return {"image": self.views[index], "index": index}


class PromptNetFineTuner(PromptNetPretrainer):
    """Test-time fine-tuning of a PromptNet and the UNet's attention q/k/v on one subject (docs/methods/promptnet.md).

    promptnet: a loaded PromptNet module (copied, never changed) and its metadata; views: (N, S, S, 3) images of
    the subject (make_views). options: template, train_unet_qkv (True)."""

    name = "promptnet_finetune"
    file_name = "promptnet_finetuned.safetensors"
    lora_file_name = "promptnet_finetuned_lora.safetensors"
    default_learning_rate = 2e-5

    def __init__(self, base, promptnet: PromptNet, meta: dict, views: torch.Tensor, options=None, seed: int = 0):
        super().__init__(base, options, None, 8 * promptnet.latent_size, "center", False, seed)
        self.source_net, self.meta, self.views = promptnet, dict(meta or {}), fresh(views).float().cpu()
        if self.views.ndim != 4 or self.views.shape[-1] < 3:
            raise ValueError(f"views must be images (N, H, W, 3); got {tuple(self.views.shape)}")

    def build_promptnet(self) -> PromptNet:
        net = copy.deepcopy(self.source_net)
        return net.requires_grad_(True)

    def setup(self):
        super().setup()
        self.deltas = torch.nn.ParameterDict()
        if bool(self.option("train_unet_qkv", True)):
            sd = self.base.model.model.state_dict()
            for key in attention_qkv_keys(self.base.model):
                delta = torch.nn.Parameter(torch.zeros(sd[key].shape, dtype=torch.float32, device=sd[key].device))
                self.deltas[_slot(key)] = delta
                self.train_patcher.add_weight_wrapper(key, DeltaWrapper(delta))
        self.module = PromptNetStep(self.net, self, self.deltas)
        return self

    def dataset(self):
        return ViewsDataset(self.views)

    def encoded_views(self):
        """VAE latents and CLIP-vision tokens of every view, computed once (the views never change)."""
        if getattr(self, "_encoded", None) is None:
            with torch.no_grad():
                latents, tokens = [], []
                for chunk in self.views.split(8):
                    latents.append(encode_images(self.base.vae, self.train_patcher, chunk).cpu())
                    tokens.append(vision_tokens(self.base.clip_vision, chunk).cpu())
            self._encoded = (torch.cat(latents), torch.cat(tokens))
        return self._encoded

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        # ProFusion draws the reference and the target independently from the mini-dataset.
        latents, tokens = self.encoded_views()
        targets = torch.as_tensor(batch["index"]).long().cpu()
        picks = torch.randint(0, self.views.shape[0], (targets.shape[0],), generator=generator)
        device = self.device()
        with torch.no_grad():
            x0 = latents[targets]
            t = sample_timesteps(x0.shape[0], generator)
            sigma = sigmas_for(self.train_patcher, t)
            noise = torch.randn(x0.shape, generator=generator)
            x_t = add_noise(self.train_patcher, x0, sigma, noise)
        return {"x_t": x_t.to(device), "sigma": sigma.to(device), "noise": noise.to(device),
                "reference": latents[picks].to(device), "tokens": tokens[picks].to(device), "t": t}

    def weight_deltas(self, module=None) -> dict:
        """{host weight key: dW}: the learned changes of the UNet's attention q/k/v."""
        deltas = (module or self.module).deltas
        return {k.replace("__", "."): v.detach().float().cpu().clone() for k, v in deltas.items()}

    def weight_patches(self, module=None) -> dict:
        """{host weight key: (dW,)}: the learned changes as add_patches 'diff' patches."""
        return {k: (v,) for k, v in self.weight_deltas(module).items()}

    def patched_model(self, module=None, patches=None):
        m = self.base.model.clone()
        patches = self.weight_patches(module) if patches is None else patches
        if patches:
            added = m.add_patches(patches, strength_patch=1.0)
            if len(added) != len(patches):
                raise RuntimeError(f"only {len(added)} of {len(patches)} fine-tuned weights found a place in the model")
        return m

    def tuned_promptnet(self, module=None) -> PromptNet:
        net = copy.deepcopy((module or self.module).promptnet).float()
        return net.eval().requires_grad_(False)

    def export(self, directory: str, module=None) -> str:
        """The tuned PromptNet (PromptNet Loader) and, when the UNet attention was tuned, its changes as a LoRA file
        beside it (<name>_lora.safetensors, for LoraLoaderModelOnly; options.lora_rank 0 = exact)."""
        from ..weights.lora_file import lora_state_dict, save_lora
        from ..weights.promptnet_file import save_promptnet

        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, self.file_name)
        save_promptnet(path, self.tuned_promptnet(module), extra={"origin": "fine-tuned",
                                                                  "training": self.hyperparameters()})
        deltas = self.weight_deltas(module)
        if deltas:
            save_lora(os.path.join(directory, self.lora_file_name),
                      lora_state_dict(deltas, int(self.option("lora_rank", 0))),
                      {"method": "ProFusion test-time fine-tuning", "applies_to": "UNet attention to_q/to_k/to_v",
                       "base_model": self.base.name, "promptnet": self.file_name})
        return path

    def hyperparameters(self) -> dict:
        return {"method": "ProFusion test-time fine-tuning (docs/methods/promptnet.md)", "views": int(self.views.shape[0]),
                "template": self.option("template", TEMPLATE), "train_unet_qkv": bool(self.option("train_unet_qkv", True))}

    def sample_reference(self):
        return self.views[:1]

    def sample_images(self, module=None, steps: int = 30):
        module = module or self.module
        return sample_profusion(self.base, module.promptnet, self.sample_reference(), steps, self.patched_model(module))


def finetune_promptnet(model, clip, vae, clip_vision, promptnet, meta: dict, image: torch.Tensor, steps: int = 100,
                       batch_size: int = 4, learning_rate: float = 2e-5, views: int = 31, seed: int = 0,
                       train_unet_qkv: bool = True, box_mask: bool = True, progress=None, outpainter=None):
    """ProFusion's test-time fine-tuning in one call (the node's library function).

    image: IMAGE (1, H, W, C) -> `views` augmented views plus the photo, the emptied area outpainted by
    `outpainter` (train/outpaint.py) or, without one, filled with the mean colour; or (N, H, W, C) with N > 1 ->
    used as the views as they are.
    Returns (MODEL clone with the attention changes as weight patches, tuned PromptNet module, losses,
    {UNet weight key: dW}). The input model, CLIP, VAE and PromptNet are left as they were."""
    from ..weights.promptnet_file import check_fits
    from .base_models import BaseModels
    from .data import square_resize
    from .local import train_local

    if not torch.is_tensor(image) or image.ndim != 4 or image.shape[-1] not in (3, 4) or image.shape[0] < 1:
        raise ValueError("image must be an IMAGE batch (batch, height, width, 3) of the subject")
    if min(image.shape[1:3]) < 16:
        raise ValueError(f"image is only {image.shape[2]}x{image.shape[1]} pixels; give a photo of the subject")
    if not 1 <= int(steps) <= 100000:
        raise ValueError(f"steps must be between 1 and 100000 (got {steps})")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be above 0 (got {learning_rate})")
    check_fits(meta, context_dim=model.model.model_config.unet_config.get("context_dim"),
               vision_width=vision_width(clip_vision), name="the PromptNet")
    check_trainable_model(model)
    if outpainter is not None:
        outpainter.check(model.model.model_config.unet_config.get("context_dim"))
    size = 8 * promptnet.latent_size
    with torch.inference_mode(False):
        pixels = fresh(image[..., :3]).float().cpu()
    if pixels.shape[0] == 1:
        view_set = make_views(pixels[0], views, size, seed, box_mask=box_mask, outpainter=outpainter)
    else:
        view_set = torch.stack([square_resize(p, size)[0] for p in pixels])
    with torch.inference_mode(False):
        view_set = fresh(view_set).float().cpu()
    tuner = PromptNetFineTuner(BaseModels(model, clip, vae, clip_vision), promptnet, meta, view_set,
                               {"train_unet_qkv": bool(train_unet_qkv)}, seed)
    with gradients_on():  # the node runs under inference mode: new weights must be normal tensors
        try:
            tuner.setup()
            losses = train_local(tuner, steps, batch_size, learning_rate, seed, progress=progress)
            deltas = tuner.weight_deltas()
            patched, net = tuner.patched_model(patches={k: (v,) for k, v in deltas.items()}), tuner.tuned_promptnet()
        finally:
            tuner.close()
    log.info("Likeness PromptNet fine-tuning: %d steps, loss %.4f -> %.4f", len(losses), losses[0], losses[-1])
    return patched, net, losses, deltas
