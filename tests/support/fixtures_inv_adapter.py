"""Shared pieces for the attention-mechanism and Inv-Adapter tests: models of several UNet layouts built from the
host's classes, a face-like test image, conditionings, sampling helpers and recording contributions."""
import torch

import micro as m

SD15_KEYS = ([("input", n, 0) for n in (1, 2, 4, 5, 7, 8)] + [("middle", 0, 0)]
             + [("output", n, 0) for n in range(3, 12)])  # SD1.5: the host numbers output blocks 0-11
SD15_DOWNSCALE = {1: 1, 2: 1, 4: 2, 5: 2, 7: 4, 8: 4}
SD15_OUT_DOWNSCALE = {3: 4, 4: 4, 5: 4, 6: 2, 7: 2, 8: 2, 9: 1, 10: 1, 11: 1}


def layout_config(kind: str) -> dict:
    """unet_config of: 'sd15' (the SD1.5 block layout, narrow), 'micro' (tests/support/micro.py), 'deep' (3 levels,
    transformer depth 2, context 96)."""
    if kind == "micro":
        return m.unet_config()
    base = m.unet_config()
    if kind == "sd15":
        base.update({"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
                     "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                     "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1})
        return base
    if kind == "deep":
        base.update({"num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2], "transformer_depth": [2, 2, 2],
                     "transformer_depth_output": [2] * 6, "transformer_depth_middle": 2, "context_dim": 96})
        return base
    raise ValueError(kind)


def layout_model(kind: str, seed: int = 0):
    """A ModelPatcher of the given layout (random deterministic weights, EPS)."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(layout_config(kind))
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    m._fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def context_of(kind: str) -> int:
    return layout_config(kind)["context_dim"]


def encode(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def random_cond(context: int, seed: int, length: int = 77):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, context, generator=g), {"pooled_output": torch.randn(1, context, generator=g)}]]


def face_image(h: int = 72, w: int = 64, seed: int = 5, channels: int = 3):
    """A smooth synthetic 'face' image (IMAGE layout, values in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    blob = torch.exp(-(xx ** 2 + (yy * 1.2) ** 2) * 2.0)
    img = torch.stack([blob * 0.9, blob * 0.7 + 0.1, blob * 0.5 + 0.2], -1)
    img = (img + 0.05 * torch.rand(h, w, 3, generator=g)).clamp(0, 1)[None]
    if channels == 1:
        return img.mean(-1, keepdim=True)
    if channels == 4:
        return torch.cat([img, torch.ones(1, h, w, 1)], -1)
    return img


def sample(model, positive, negative, latent_size=8, steps=3, cfg=5.0, sampler="euler", scheduler="ddim_uniform",
           seed=0, batch=1):
    import comfy.sample

    latent = torch.zeros(batch, 4, latent_size, latent_size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed,
                               disable_pbar=True)


class RecordingContribution:
    """Factory of Contribution subclasses that record every call (site, key, row kinds) and add a constant."""

    @staticmethod
    def make(pack_dispatcher, value=0.0, log=None, **window):
        class Recorder(pack_dispatcher.Contribution):
            def compute(self, call):
                if log is not None:
                    log.append({"site": call.site, "key": call.key, "kinds": call.row_kinds(), "sigma": call.sigma,
                                "shape": tuple(call.q.shape), "grid": call.token_grid,
                                "inputs": None if call.inputs is None else tuple(call.inputs[0].shape)})
                return torch.full_like(call.q, float(value))
        return Recorder(**window)


class Spy:
    """Wraps a replace patch and records its inputs and output."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __call__(self, q, k, v, extra_options):
        out = self.inner(q, k, v, extra_options)
        self.log.append({"q": q, "k": k, "v": v, "eo": dict(extra_options), "out": out})
        return out

    def models(self):
        return self.inner.models()

    def to(self, x):
        return self

    def __deepcopy__(self, memo):
        return self
