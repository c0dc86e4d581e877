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


def vision_of(lib, cv):
    return lib["enc"].VisionSpec.of_clip_vision(cv)


def random_adapter(lib, model, vision, queries=4, depth=2, seed=0, gate=0.8, scale=1.0):
    """A TamingAdapter (float32, random weights) for model and vision, without a file."""
    layout = lib["layout"].attention_layout(model)
    spec = lib["enc"].TamingSpec.for_layout(layout, vision, queries=queries, depth=depth)
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
