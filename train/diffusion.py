"""The diffusion objective on the host's own model classes (the host's BaseModel.apply_model).

The frozen base model is a ComfyUI ModelPatcher; its BaseModel.apply_model(x, sigma, ...) is called directly
with gradients on (torch.inference_mode(False)). It works in the host's sigma space (x = x0 + sigma * eps, the
model returns the denoised x0), so the papers' eps-MSE is computed on eps_hat = (x_t - D(x_t)) / sigma, which
is the network's eps prediction for eps models and the same objective for any other parameterisation.
Timesteps are the papers' t ~ U{0..999} (the DDPM grid), mapped to the model's sigma table.
"""
import contextlib
import logging

import torch
import torch.nn.functional as F

log = logging.getLogger("likeness.train")


@contextlib.contextmanager
def gradients_on():
    """Autograd inside the host: ComfyUI runs nodes under torch.inference_mode()."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _set_requires_grad(p, flag: bool):
    if p.is_inference():  # a tensor made under inference mode takes flag changes only there
        with torch.inference_mode():
            p.requires_grad_(flag)
    else:
        p.requires_grad_(flag)


@contextlib.contextmanager
def frozen(*modules):
    """requires_grad off for every parameter of the given modules (the host leaves it on), restored afterwards,
    so training never leaves gradients or changed flags on a model that belongs to someone else."""
    saved = []
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            saved.append((p, p.requires_grad))
            _set_requires_grad(p, False)
    try:
        yield
    finally:
        for p, flag in saved:
            _set_requires_grad(p, flag)
            p.grad = None


@contextlib.contextmanager
def normal_tensors(*modules):
    """Models loaded inside a running ComfyUI hold inference tensors (nodes run under torch.inference_mode()),
    which autograd refuses to save for backward even when frozen. For the duration, every such parameter and
    buffer is replaced by a normal copy (same values); the original objects are put back afterwards, so the
    model is left exactly as it was. Models loaded outside inference mode are not touched."""
    swapped = []
    with torch.inference_mode(False):
        for module in modules:
            if module is None:
                continue
            for owner in module.modules():
                for name, p in list(owner.named_parameters(recurse=False)):
                    if p.is_inference():
                        setattr(owner, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                        swapped.append((owner, name, p))
                for name, b in list(owner.named_buffers(recurse=False)):
                    if b is not None and b.is_inference():
                        owner._buffers[name] = b.clone()
                        swapped.append((owner, name, b))
    if swapped:
        log.info("Likeness trainer: %d tensors made in inference mode are used through normal copies", len(swapped))
    try:
        yield len(swapped)
    finally:
        for owner, name, original in reversed(swapped):
            if isinstance(original, torch.nn.Parameter):
                setattr(owner, name, original)
            else:
                owner._buffers[name] = original


def fresh(t):
    """A normal tensor from one made under inference mode (those cannot be saved for backward)."""
    if t is None or not torch.is_tensor(t):
        return t
    return t.clone() if t.is_inference() else t


def needs_size_conditioning(model_patcher) -> bool:
    """SDXL-style UNets take a vector `y` (the pooled text output and six size embeddings) besides the context."""
    return model_patcher.model.model_config.unet_config.get("adm_in_channels") is not None


def check_trainable_model(model_patcher):
    """The trainers condition the UNet on its cross-attention context, plus `y` for SDXL (size_conditioning_y).
    Other vector-conditioned UNets (unCLIP, SVD, ...) build `y` from inputs the trainers do not have."""
    import comfy.model_base

    if needs_size_conditioning(model_patcher) and not isinstance(model_patcher.model, comfy.model_base.SDXL):
        raise ValueError(f"the trainers support SD1.x, SD2.x and SDXL UNets; this model "
                         f"({type(model_patcher.model).__name__}) needs vector conditioning they cannot build")
    return model_patcher


def size_conditioning_y(model_patcher, pooled, height: int, width: int):
    """The SDXL UNet's `y` for images of height x width pixels, uncropped, as CLIPTextEncodeSDXL conditions
    (the host's SDXL.encode_adm: pooled clip_g output + embeddings of size, crop and target size); None for
    models without vector conditioning. pooled: (B, width_g)."""
    if not needs_size_conditioning(model_patcher):
        return None
    if pooled is None:
        raise ValueError("this SDXL model needs the pooled text output to build its size conditioning")
    y = model_patcher.model.encode_adm(pooled_output=pooled, height=int(height), width=int(width), crop_h=0, crop_w=0,
                                       target_height=int(height), target_width=int(width), device=pooled.device)
    return y.to(pooled.device)


def model_sampling(model_patcher):
    return model_patcher.get_model_object("model_sampling")


def sample_timesteps(batch: int, generator=None, low: int = 0, high: int = 1000) -> torch.Tensor:
    """t ~ U{low .. high-1} on the 1000-step training grid (ProFusion, PhotoVerse, Inv-Adapter, IP-Adapter)."""
    return torch.randint(low, high, (batch,), generator=generator)


def sigmas_for(model_patcher, t: torch.Tensor) -> torch.Tensor:
    ms = model_sampling(model_patcher)
    table = ms.sigmas.float().cpu()
    if int(t.max()) >= table.shape[0]:
        raise ValueError(f"timestep {int(t.max())} is past the model's {table.shape[0]}-step schedule")
    return table[t.long().cpu()]


def add_noise(model_patcher, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t in the host's space for each sample's sigma (x0 + sigma * eps for eps/v models)."""
    ms = model_sampling(model_patcher)
    return ms.noise_scaling(sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0), noise, x0)


def vp_input(model_patcher, x_t: torch.Tensor, sigma: torch.Tensor):
    """(x_t in VP scaling, float timestep) as the UNet sees them: PromptNet's inputs (docs/methods/fusion-sampling.md)."""
    ms = model_sampling(model_patcher)
    sigma = sigma.to(x_t.device)
    return ms.calculate_input(sigma, x_t), ms.timestep(sigma).float()


def denoise(model_patcher, x_t, sigma, context, transformer_options=None, **model_conds):
    """D(x_t; sigma, context) through BaseModel.apply_model of the (loaded) patcher, gradients on. A copy of the
    patcher's transformer_options is passed (the forward writes into it), plus any per-step extras."""
    base = model_patcher.model
    options = dict(model_patcher.model_options.get("transformer_options", {}))
    options.update(transformer_options or {})
    device = model_patcher.load_device
    return base.apply_model(x_t.to(device), sigma.to(device).float(), c_crossattn=context.to(device),
                            transformer_options=options, **model_conds)


def eps_from_denoised(x_t, sigma, denoised):
    return (x_t.to(denoised) - denoised) / sigma.to(denoised).reshape(-1, *([1] * (x_t.ndim - 1)))


def eps_loss(eps_hat, noise, reduction="mean"):
    """The papers' ||eps - eps_hat||^2 (mean over elements); reduction='none' gives one value per sample."""
    per = F.mse_loss(eps_hat.float(), noise.to(eps_hat).float(), reduction="none").flatten(1).mean(1)
    return per.mean() if reduction == "mean" else per


def encode_images(vae, model_patcher, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) in [0, 1] -> latents in the model's space (process_latent_in), no gradients."""
    with torch.no_grad():
        raw = vae.encode(images[..., :3].float())
    return model_patcher.model.process_latent_in(raw.float())


def decode_differentiable(vae, model_patcher, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images (B, 3, H, W) in [0, 1] with gradients (PhotoVerse's L_face needs the
    denoised image). Calls the VAE's decoder module directly: the host's VAE.decode batches into a fresh buffer."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([vae.patcher])
    raw = model_patcher.model.process_latent_out(latents)
    out = vae.first_stage_model.decode(raw.to(vae.device, vae.vae_dtype))
    return vae.process_output(out.float())


def load_models(*patchers):
    """Load the training patcher (weight wrappers, attention patches) and its companions fully on the device.
    Sampling or DDIM inversion with another clone of the same UNet unloads it, so trainers call this per step."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([p for p in patchers if p is not None], force_full_load=True)


def unload(patcher):
    """Take a training patcher out of the host's loaded models (its weight wrappers leave the modules)."""
    import comfy.model_management as mm

    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        if mm.current_loaded_models[i].model is patcher:
            mm.current_loaded_models.pop(i).model_unload()
    for m in patcher.model.modules():
        if hasattr(m, "weight_function") and len(getattr(m, "weight_function", [])) > 0:
            m.weight_function = []
