"""Shared pieces for the PhotoVerse tests: micro models, random adapters written to real files, a face image,
an independent attention reference and a recorder of what the host hands the cross-attention blocks."""
import math

import torch

import micro as m

HIDDEN = 32  # mapper hidden width for micro adapters (1024 in real ones)


def unet_model(context: int, sd2: bool = False, channels: int = 32, seed: int = 0, v_prediction: bool = False):
    """A ModelPatcher of a small UNet with the given context width: SD1.5's model class, or SD2's (linear
    projections in the transformers, 64-wide heads: use channels >= 64) when sd2 is set; v_prediction gives the
    SD2-768 kind (SD2.x 768-v checkpoints)."""
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
    kind = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(cfg, model_type=kind, device="cpu")
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


def head_by_hand(seq, x):
    """ELITE's head Linear -> LN -> LeakyReLU -> Linear -> LN -> LeakyReLU -> Linear from the raw parameters."""
    x = x.double()
    for i in (0, 3):
        x = x @ seq[i].weight.double().T + seq[i].bias.double()
        x = torch.nn.functional.layer_norm(x, x.shape[-1:], seq[i + 1].weight.double(), seq[i + 1].bias.double(), 1e-5)
        x = torch.where(x > 0, x, 0.01 * x)
    return x @ seq[6].weight.double().T + seq[6].bias.double()


# SD1.x's cross-attention blocks: the host's site key -> the diffusers module ELITE names its weights after
# (written out from the two UNet layouts, not computed by the pack).
SD15_ELITE_BLOCKS = {
    "input_1_0": "down_blocks.0.attentions.0", "input_2_0": "down_blocks.0.attentions.1",
    "input_4_0": "down_blocks.1.attentions.0", "input_5_0": "down_blocks.1.attentions.1",
    "input_7_0": "down_blocks.2.attentions.0", "input_8_0": "down_blocks.2.attentions.1",
    "middle_0_0": "mid_block.attentions.0",
    **{f"output_{3 + 3 * u + a}_0": f"up_blocks.{1 + u}.attentions.{a}" for u in range(3) for a in range(3)},
}


def elite_checkpoints(blocks: dict, widths: dict, clip_width: int, text_width: int, hidden: int, seed: int = 0,
                      dtype=torch.float32):
    """(global_mapper, local_mapper) state dicts in ELITE's key layout [ELITE train_global.py, train_local.py]:
    mapping_{i} / mapping_patch_{i} heads (Linear W->h, LN, LeakyReLU, Linear h->h, LN, LeakyReLU, Linear h->d)
    and <module path with underscores>_attn2_to_k / _to_v weights. blocks: site -> diffusers attention module;
    widths: site -> (inner, context)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, std=None):
        return (torch.randn(shape, generator=g) * (std if std is not None else shape[-1] ** -0.5)).to(dtype)

    def mapper():
        sd = {}
        for i in range(5):
            for head in (f"mapping_{i}", f"mapping_patch_{i}"):
                sd.update({f"{head}.0.weight": t(hidden, clip_width), f"{head}.0.bias": t(hidden, std=0.1),
                           f"{head}.1.weight": 1 + t(hidden, std=0.1), f"{head}.1.bias": t(hidden, std=0.1),
                           f"{head}.3.weight": t(hidden, hidden), f"{head}.3.bias": t(hidden, std=0.1),
                           f"{head}.4.weight": 1 + t(hidden, std=0.1), f"{head}.4.bias": t(hidden, std=0.1),
                           f"{head}.6.weight": t(text_width, hidden, std=0.05 * hidden ** -0.5),
                           f"{head}.6.bias": t(text_width, std=0.01)})
        for site, module in blocks.items():
            inner, ctx = widths[site]
            name = f"{module}.transformer_blocks.0.attn2".replace(".", "_")
            sd[f"{name}_to_k.weight"], sd[f"{name}_to_v.weight"] = t(inner, ctx), t(inner, ctx)
        return sd

    return mapper(), mapper()


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


def check_sampled_blocks(model, loaded, concept, alpha, gamma, sigma, positive, negative, latent_size=8) -> int:
    """Samples one step with PhotoVerse Apply's model and checks every cross-attention block's output against
    to_out(gamma * Attn(Q, K^T, V^T) + sigma * Attn(Q, K^S, V^S)), Q, K^T, V^T from W + alpha * B @ A and the
    unconditional rows on the concept's unconditional tokens, recomputed in float64 from the raw weights.
    Returns the number of blocks checked."""
    import comfy.model_management
    from comfyui_likeness.attention.photoverse import apply_photoverse
    from comfyui_likeness.core.layout import attention_layout

    comfy.model_management.unload_all_models()   # an earlier patched clone may still hold the weights patched
    base_sd = {k: v.double() for k, v in model.model.diffusion_model.state_dict().items()}
    patched = apply_photoverse(model, loaded, concept, alpha, gamma, sigma)
    recorder = Attn2Recorder()
    recorder.attach(patched)
    sample(patched, positive, negative, latent_size=latent_size, steps=1)
    layout = attention_layout(model)
    assert set(recorder.outputs) == set(layout.keys)
    sd = {k: v.double() for k, v in loaded.module.state_dict().items()}
    data = concept.metadata["photoverse"]
    for site in layout.sites:
        n, context, eo = recorder.inputs[site.key]
        p, lay = f"{site.path}.attn2", f"layers.{site.name}"

        def w(t):
            return base_sd[f"{p}.to_{t}.weight"] + alpha * sd[f"{lay}.lora_{t}.up.weight"] @ sd[f"{lay}.lora_{t}.down.weight"]

        q, k, v = n.double() @ w("q").T, context.double() @ w("k").T, context.double() @ w("v").T
        heads = eo["n_heads"]
        text = manual_attention(q, k, v, heads)
        per = q.shape[0] // len(eo["cond_or_uncond"])
        rows = []
        for i, c in enumerate(eo["cond_or_uncond"]):
            f = (data["visual_uncond"] if c == 1 else data["visual"]).double()
            ks, vs = (f @ sd[f"{lay}.visual_k.weight"].T)[None], (f @ sd[f"{lay}.visual_v.weight"].T)[None]
            qi = q[i * per:(i + 1) * per]
            rows.append(gamma * text[i * per:(i + 1) * per] + sigma * manual_attention(qi, ks, vs, heads))
        expected = torch.cat(rows) @ base_sd[f"{p}.to_out.0.weight"].T + base_sd[f"{p}.to_out.0.bias"]
        assert sorted(eo["cond_or_uncond"]) == [0, 1]
        assert torch.allclose(recorder.outputs[site.key].double(), expected, atol=1e-4), site.name
    return len(layout.sites)


def sample(model, positive, negative, latent_size=8, steps=2, cfg=5.0, seed=0, denoise=1.0, latent=None):
    import comfy.sample

    latent = torch.zeros(1, 4, latent_size, latent_size) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=seed,
                               denoise=denoise, disable_pbar=True)


def random_cond(context, seed, length=77):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, context, generator=g), {"pooled_output": torch.randn(1, context, generator=g)}]]
