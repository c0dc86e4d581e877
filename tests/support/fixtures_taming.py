"""Shared pieces for the Taming Encoder tests: the micro CLIP vision, a subject photo with its mask, random
adapters for a model, an independent (host-free) computation of the projection and the added attention, and a
spy that records what the attn2 dispatchers got and gave."""
import math

import pytest
import torch

import micro as m
from fixtures_inv_adapter import Spy  # noqa: F401  (shared with the Inv-Adapter tests)
from fixtures_photoverse import manual_attention  # noqa: F401  (shared with the PhotoVerse tests)


@pytest.fixture(scope="session")
def micro_cv():
    """The host's ClipVisionModel with the ViT-L/14 layout at width 32 (24 layers, 257 tokens)."""
    return m.micro_clip_vision()


@pytest.fixture(scope="session")
def taming(pack):
    from comfyui_likeness.attention import dispatcher, taming
    from comfyui_likeness.core import layout
    from comfyui_likeness.encoders import taming_encoder, taming_object, taming_training
    from comfyui_likeness.weights import safetensors_file, taming_embeds_file, taming_file
    return {"d": dispatcher, "layout": layout, "att": taming, "enc": taming_encoder, "obj": taming_object,
            "train": taming_training, "file": taming_file, "embeds_file": taming_embeds_file,
            "st": safetensors_file}


@pytest.fixture(scope="session")
def taming_assets(base_dir, checkpoint, input_images):
    """The Taming workflows' files (stand-in CLIP vision, random adapter, the painted cat) in the host's folders."""
    import assets_taming
    import host_harness as harness

    assets_taming.prepare(base_dir, harness.comfy_dir())
    return base_dir


def subject_photo(h=60, w=80, seed=3):
    """An IMAGE with a bright textured 'object' on a dark noisy background, and its MASK (1 = object)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    mask = (((yy - 25) / 14) ** 2 + ((xx - 50) / 18) ** 2 <= 1.0).float()
    background = 0.2 * torch.rand(h, w, 3, generator=g)
    obj = torch.stack([0.8 + 0.1 * torch.sin(xx / 3), 0.5 + 0.2 * torch.cos(yy / 4), 0.3 + 0.0 * xx], -1)
    img = background * (1 - mask[..., None]) + obj * mask[..., None]
    return img[None].clamp(0, 1), mask[None]


def micro_sd2_768(seed=12, context=96, v_prediction=True):
    """An SD2-768-style micro UNet from the host's SD20 config: v-prediction (eps for SD2-base), linear projections
    in the transformers, SD2's 64-channel heads on 64 and 128 channels (1 and 2 heads), context 96."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    cfg = m.unet_config(context=context, channels=64)
    cfg.update({"use_linear_in_transformer": True})   # SD20 adds num_head_channels 64
    config = comfy.supported_models.SD20(cfg)
    config.set_inference_dtype(torch.float32, None)
    kind = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(config, model_type=kind, device="cpu")
    m._fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def vision_of(lib, cv):
    return lib["enc"].VisionSpec.of_clip_vision(cv)


def random_adapter(lib, model, vision, queries=4, depth=2, seed=0, gate=0.8, scale=1.0, null="fixed"):
    """A TamingAdapter (float32, random weights) for model and vision, without a file."""
    layout = lib["layout"].attention_layout(model)
    spec = lib["enc"].TamingSpec.for_layout(layout, vision, queries=queries, depth=depth, null=null)
    module = lib["enc"].TamingEncoder(spec, dtype=torch.float32, device="cpu").init_random(seed, scale, gate)
    module.requires_grad_(False)
    return lib["file"].TamingAdapter(module, "random-test-adapter")


# --- independent computations (plain tensor math from the state dict, no module code) -------------------------

def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def manual_projection(state: dict, spec, features):
    """The object tokens from the adapter's state dict: Perceiver resampler (or per-token linear) + LayerNorm."""
    s = {k: v.double() for k, v in state.items() if k.startswith("projection.")}
    x = features.double()
    if spec.queries == 0:
        y = x @ s["projection.proj_out.weight"].t() + s["projection.proj_out.bias"]
        return layer_norm(y, s["projection.norm_out.weight"], s["projection.norm_out.bias"])
    x = x @ s["projection.proj_in.weight"].t() + s["projection.proj_in.bias"]
    lat = s["projection.latents"].expand(x.shape[0], -1, -1)
    for i in range(spec.depth):
        p = lambda n: s[f"projection.blocks.{i}.{n}"]  # noqa: E731
        t = layer_norm(x, p("norm_tokens.weight"), p("norm_tokens.bias"))
        ln = layer_norm(lat, p("norm_latents.weight"), p("norm_latents.bias"))
        kv = torch.cat([t, ln], 1)
        att = manual_attention(ln @ p("to_q.weight").t(), kv @ p("to_k.weight").t(), kv @ p("to_v.weight").t(),
                               spec.heads)
        lat = lat + att @ p("to_out.weight").t()
        h = layer_norm(lat, p("norm_ff.weight"), p("norm_ff.bias")) @ p("ff_in.weight").t()
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
        lat = lat + h @ p("ff_out.weight").t()
    y = lat @ s["projection.proj_out.weight"].t() + s["projection.proj_out.bias"]
    return layer_norm(y, s["projection.norm_out.weight"], s["projection.norm_out.bias"])


def state_of(adapter):
    """The adapter's tensors in float64, plus "null_expected": its null tokens computed independently."""
    state = {k: v.double() for k, v in adapter.module.state_dict().items()}
    return {**state, "null_expected": null_tokens(state, adapter.module.spec)}


def row_kinds(eo, rows):
    cou = eo["cond_or_uncond"]
    per = rows // len(cou)
    return ["uncond" if cou[r // per] == 1 else "cond" for r in range(rows)]


def expected_output(taming, e, state, tokens, weight, uncond="null embedding", row_factor=None):
    """Attn(Q, K, V) + weight * tanh(g) * Attn(Q, W_k o_r, W_v o_r) with o_r = tokens (cond) or the null tokens
    (uncond; state_of's independent computation: the projection of all-zero CLIP tokens for a fixed phi)."""
    q, k, v, eo = e["q"], e["k"], e["v"], e["eo"]
    heads = eo["n_heads"]
    name = taming["layout"].site_name(key_of(eo))
    wk, wv = state[f"layers.{name}.to_k.weight"], state[f"layers.{name}.to_v.weight"]
    gate = torch.tanh(state[f"layers.{name}.gate"])
    out = manual_attention(q, k, v, heads)
    null = state["null_expected"][0]
    for r, kind in enumerate(row_kinds(eo, q.shape[0])):
        if kind == "uncond" and uncond == "no adapter":
            continue
        ctx = null if kind == "uncond" else tokens[0]
        term = manual_attention(q[r:r + 1], (ctx @ wk.t())[None], (ctx @ wv.t())[None], heads)
        factor = 1.0 if row_factor is None else row_factor(e, r)
        out[r:r + 1] = out[r:r + 1] + weight * gate * factor * term
    return out


def null_tokens(state: dict, spec):
    """The null tokens from the state dict: the projection of eq. 4's fixed phi (zeros), or the learned ones."""
    if spec.null == "fixed":
        return manual_projection(state, spec, torch.zeros(1, spec.vision.tokens, spec.vision.hidden_size))
    return state["null_tokens"].double()


def combined_tokens(per_image, combine):
    """Several photos' object tokens (images, N, C) combined, written out: mean; side by side; the mean rescaled
    token by token to the mean of the photos' norms."""
    if combine == "concat":
        return per_image.reshape(1, -1, per_image.shape[-1])
    mean = per_image.mean(0, keepdim=True)
    if combine == "average":
        return mean
    norms = torch.sqrt((per_image ** 2).sum(-1, keepdim=True)).mean(0, keepdim=True)
    return mean * norms / torch.sqrt((mean ** 2).sum(-1, keepdim=True))


def spy_on(lib, model, site="attn2"):
    log = []
    spied = model.clone()
    for (s, key), disp in lib["d"].dispatchers(model, site).items():
        spied.set_model_patch_replace(Spy(disp, log), s, *key)
    return spied, log


def key_of(eo):
    return (eo["block"][0], eo["block"][1], eo.get("block_index", 0))


def random_cond(context: int, seed: int, length: int = 77):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, length, context, generator=g), {"pooled_output": torch.randn(1, context, generator=g)}]]


def sample(model, positive, negative, latent_size=8, steps=3, cfg=5.0, sampler="euler", scheduler="normal",
           seed=0, batch=1):
    import comfy.sample

    latent = torch.zeros(batch, 4, latent_size, latent_size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=seed,
                               disable_pbar=True)
