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


def micro_sd2_v(seed: int = 3):
    """An SD2-768-style micro model: the host's SD20 config (linear in/out of the transformers, 64-channel heads),
    v-prediction, context 64, 64 channels."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD20({**m.unet_config(context=64, channels=64), "use_linear_in_transformer": True})
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION, device="cpu")
    m._fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


# --- independent statements of the equations -------------------------------------------------------------------

def manual_attention(q, k, v, heads):
    """softmax(Q K^T / sqrt(d_head)) V per head, written out (no host code); k, v with batch 1 broadcast."""
    import math

    b, t, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, t, heads, d).transpose(1, 2).double()
    kh = k.double().expand(b, -1, -1).reshape(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.double().expand(b, -1, -1).reshape(b, v.shape[1], heads, d).transpose(1, 2)
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (w @ vh).transpose(1, 2).reshape(b, t, inner)


def spy_on(dispatcher_module, model):
    """A clone whose dispatchers are wrapped in a Spy; returns (clone, log of every call)."""
    log = []
    spied = model.clone()
    for (site, key), disp in dispatcher_module.dispatchers(model).items():
        spied.set_model_patch_replace(Spy(disp, log), site, *key)
    return spied, log


def call_site(entry):
    """(attn1|attn2, block key) of a Spy log entry: self-attention has as many keys as queries."""
    eo = entry["eo"]
    key = (eo["block"][0], eo["block"][1], eo.get("block_index", 0))
    return ("attn1" if entry["k"].shape[1] == entry["q"].shape[1] else "attn2"), key


def handed_features(reference_module, eo, site, key):
    """The reference features the wrapper handed to the processors of this call."""
    per = eo[reference_module.FEATURES_KEY]
    assert len(per) == 1
    return next(iter(per.values()))[(site, key)].double()


def direct_norm_features(model, layout, latent, sigma, caption, y=None):
    """norm1/norm2 outputs of every BasicTransformerBlock via torch forward hooks, on the model with no patches:
    {(attn1|attn2, block key): (batch, tokens, width)}. sigma: a float or one per row."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    out, handles = {}, []
    dm = model.model.diffusion_model
    for s in layout.sites:
        block = dm.get_submodule(s.path)
        for site, norm in (("attn1", block.norm1), ("attn2", block.norm2)):
            handles.append(norm.register_forward_hook(
                lambda mod, inp, o, key=(site, s.key): out.__setitem__(key, o.detach().clone())))
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(latent.shape[0])
    try:
        with torch.no_grad():
            extra = {} if y is None else {"y": y}
            model.model.apply_model(latent, sigma, c_crossattn=caption, transformer_options={}, **extra)
    finally:
        for h in handles:
            h.remove()
    return out


def eaa_projection(site, key, layout, model_sd, adapter_sd=None):
    """(aggregation, W'_k, W'_v) of one block, read from state dicts for an independent computation: the adapter's
    matrices and, on its cross side, its token aggregation F'[:, j] = sum_i A_ji F[:, i] + b_j (trained), or the
    block's own attn1 to_k / to_v and no aggregation (training-free)."""
    if adapter_sd is None:
        path = layout.site(key).path
        return (lambda F: F), model_sd[f"{path}.attn1.to_k.weight"], model_sd[f"{path}.attn1.to_v.weight"]
    name = f"{key[0]}_{int(key[1])}_{int(key[2])}"
    side = "self" if site == "attn1" else "cross"
    aggregate = lambda F: F  # noqa: E731
    if side == "cross" and f"layers.{name}.aggregate.proj.weight" in adapter_sd:
        A, b = adapter_sd[f"layers.{name}.aggregate.proj.weight"], adapter_sd[f"layers.{name}.aggregate.proj.bias"]
        aggregate = lambda F: torch.einsum("ji,bid->bjd", A, F) + b[None, :, None]  # noqa: E731
    return aggregate, adapter_sd[f"layers.{name}.{side}_k.weight"], adapter_sd[f"layers.{name}.{side}_v.weight"]
