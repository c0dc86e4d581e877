"""Shared pieces for the PhotoVerse tests: micro models, random adapters written to real files, a face image,
an independent attention reference and a recorder of what the host hands the cross-attention blocks."""
import math

import torch

import micro as m

HIDDEN = 32  # mapper hidden width for micro adapters (1024 in real ones)


def unet_model(context: int, sd2: bool = False, channels: int = 32, seed: int = 0):
    """A ModelPatcher of a small UNet with the given context width: SD1.5's model class, or SD2's (linear
    projections in the transformers, 64-wide heads: use channels >= 64) when sd2 is set."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = m.unet_config(context, channels)
    if sd2:
        config["use_linear_in_transformer"] = True  # SD20 adds num_head_channels 64 itself
        cfg = comfy.supported_models.SD20(config)
    else:
        cfg = comfy.supported_models.SD15(config)
    cfg.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(cfg, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    m._fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def random_adapter_file(path, model, clip_vision, seed=0, scale=1.0, hidden=HIDDEN, text_widths=None, mapper="mlp"):
    from comfyui_likeness.concepts.photoverse_concept import clip_vision_signature
    from comfyui_likeness.weights.photoverse import write_random_photoverse

    return write_random_photoverse(str(path), model, clip_vision_signature(clip_vision), seed=seed, scale=scale,
                                   hidden=hidden, text_widths=text_widths, mapper=mapper)


def loaded_adapter(path, model, clip_vision, **kw):
    from comfyui_likeness.weights.photoverse import load_photoverse

    return load_photoverse(random_adapter_file(path, model, clip_vision, **kw))


def face_image(h=96, w=80, seed=5):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    blob = torch.exp(-(xx ** 2 + (yy * 1.2) ** 2) * 2.0)
    img = torch.stack([blob * 0.9, blob * 0.7 + 0.1, blob * 0.5 + 0.2], -1)
    return (img + 0.1 * torch.rand(h, w, 3, generator=g)).clamp(0, 1)[None]


def manual_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d)) V per head in float64, written out (no host code)."""
    b, t, inner = q.shape
    d = inner // heads
    k, v = k.expand(b, -1, -1), v.expand(b, -1, -1)
    qh = q.reshape(b, t, heads, d).transpose(1, 2).double()
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).double()
    vh = v.reshape(b, v.shape[1], heads, d).transpose(1, 2).double()
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ vh).transpose(1, 2).reshape(b, t, inner)


class Attn2Recorder:
    """attn2_patch + attn2_output_patch that keep, per block, the first call's inputs (hidden states after norm2,
    context, extra_options) and the block's attention output after to_out."""

    def __init__(self):
        self.inputs, self.outputs = {}, {}

    def before(self, n, context, value, extra_options):
        key = (*extra_options["block"], extra_options["block_index"])
        if key not in self.inputs:
            self.inputs[key] = (n.clone(), context.clone(), dict(extra_options))
        return n, context, value

    def after(self, n, extra_options):
        key = (*extra_options["block"], extra_options["block_index"])
        if key not in self.outputs:
            self.outputs[key] = n.clone()
        return n

    def attach(self, model_patcher):
        model_patcher.set_model_attn2_patch(self.before)
        model_patcher.set_model_attn2_output_patch(self.after)
        return model_patcher


def sample(model, positive, negative, latent_size=8, steps=2, cfg=5.0, seed=0, denoise=1.0, latent=None):
    import comfy.sample

    latent = torch.zeros(1, 4, latent_size, latent_size) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed,
                               denoise=denoise, disable_pbar=True)


def random_cond(context, seed, length=77):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, context, generator=g), {"pooled_output": torch.randn(1, context, generator=g)}]]
