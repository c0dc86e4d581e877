"""Where a model's attention sites are, derived from the loaded model (never a hard-coded SD1.5 list).

A site is one BasicTransformerBlock of the host's UNet. Its key is the host's replace-patch key
(block name, block number, index inside the SpatialTransformer): ("input", 1, 0), ("middle", 0, 0),
("output", 3, 0) ... exactly what BasicTransformerBlock.forward looks up (comfy/ldm/modules/attention.py).
The walk mirrors how UNetModel._forward numbers its blocks and where its Downsample/Upsample layers sit,
so token counts per site follow from the latent size.
"""
import hashlib
import json
import math
from dataclasses import dataclass

import torch

BlockKey = tuple  # (block name, number, transformer index)


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class TransformerSite:
    key: BlockKey
    path: str          # module path of the BasicTransformerBlock, relative to the diffusion model
    query_dim: int     # width of the hidden states (F_s, F_c of docs/methods/inv-adapter.md)
    inner_dim: int     # heads * dim_head: width of q, k, v
    heads: int
    dim_head: int
    context_dim: int   # width of attn2's context (the text encoder's output)
    downscale: int     # spatial factor of this block relative to the latent

    @property
    def name(self) -> str:
        return site_name(self.key)

    def tokens(self, latent_h: int, latent_w: int) -> int:
        """Tokens this block sees for a latent of latent_h x latent_w (stride-2 convs round up)."""
        h, w = latent_h, latent_w
        f = self.downscale
        while f > 1:
            h, w, f = math.ceil(h / 2), math.ceil(w / 2), f // 2
        return h * w


def site_name(key: BlockKey) -> str:
    """A string form of a site key, usable in file keys and module names: ('input', 1, 0) -> 'input_1_0'."""
    return f"{key[0]}_{int(key[1])}_{int(key[2])}"


def parse_site_name(name: str) -> BlockKey:
    block, number, index = name.rsplit("_", 2)
    return (block, int(number), int(index))


@dataclass(frozen=True)
class AttentionLayout:
    sites: tuple            # TransformerSite, in forward order
    model_name: str         # the host's model config class, e.g. "SD15", "SDXL"
    model_type: str         # "EPS", "V_PREDICTION", ...
    model_channels: int
    context_dim: int
    latent_channels: int

    @property
    def keys(self) -> list:
        return [s.key for s in self.sites]

    def site(self, key: BlockKey) -> TransformerSite:
        for s in self.sites:
            if s.key == tuple(key):
                return s
        raise KeyError(f"the model has no attention block {site_name(key)}")

    def describe(self) -> str:
        return (f"{self.model_name} ({self.model_type}, {self.model_channels} channels, context {self.context_dim}, "
                f"{len(self.sites)} attention blocks)")

    def signature(self) -> dict:
        """Everything about the architecture that reference features and adapters depend on."""
        return {
            "model": self.model_name, "model_type": self.model_type, "model_channels": self.model_channels,
            "context_dim": self.context_dim, "latent_channels": self.latent_channels,
            "sites": {s.name: [s.query_dim, s.inner_dim, s.heads, s.downscale] for s in self.sites},
        }


def _host_classes():
    from comfy.ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample
    return BasicTransformerBlock, SpatialTransformer, Downsample, Upsample


def _sites_in(seq, block: str, number: int, prefix: str, downscale: int, out: list):
    BasicTransformerBlock, SpatialTransformer, Downsample, Upsample = _host_classes()
    for j, layer in enumerate(seq):
        if isinstance(layer, SpatialTransformer):
            for i, tb in enumerate(layer.transformer_blocks):
                if not isinstance(tb, BasicTransformerBlock) or tb.attn2 is None:
                    continue
                a1, a2 = tb.attn1, tb.attn2
                out.append(TransformerSite(
                    key=(block, number, i), path=f"{prefix}.{j}.transformer_blocks.{i}",
                    query_dim=a1.to_q.in_features, inner_dim=a1.to_q.out_features, heads=a1.heads,
                    dim_head=a1.dim_head, context_dim=a2.to_k.in_features, downscale=downscale))
        elif isinstance(layer, Downsample):
            downscale *= 2
        elif isinstance(layer, Upsample):
            downscale //= 2
    return downscale


def attention_layout(model_patcher) -> AttentionLayout:
    """Walk the diffusion model's blocks in the order UNetModel._forward runs them."""
    dm = model_patcher.get_model_object("diffusion_model")
    if not all(hasattr(dm, a) for a in ("input_blocks", "output_blocks", "middle_block")):
        raise UnsupportedModelError(
            f"this model's diffusion model ({type(dm).__name__}) is not a UNet with SpatialTransformer blocks; "
            "the attention adapters of this pack support SD1.x, SD2.x and SDXL-style UNets")
    sites = []
    ds = 1
    for number, seq in enumerate(dm.input_blocks):
        ds = _sites_in(seq, "input", number, f"input_blocks.{number}", ds, sites)
    if dm.middle_block is not None:
        _sites_in(dm.middle_block, "middle", 0, "middle_block", ds, sites)
    for number, seq in enumerate(dm.output_blocks):
        ds = _sites_in(seq, "output", number, f"output_blocks.{number}", ds, sites)
    if not sites:
        raise UnsupportedModelError("this model has no cross-attention transformer blocks to attach an adapter to")
    base = model_patcher.model
    config = getattr(base, "model_config", None)
    latent_channels = getattr(getattr(config, "latent_format", None), "latent_channels", None) or dm.in_channels
    return AttentionLayout(
        sites=tuple(sites), model_name=type(config).__name__ if config is not None else type(base).__name__,
        model_type=getattr(getattr(base, "model_type", None), "name", "unknown"),
        model_channels=int(dm.model_channels), context_dim=sites[0].context_dim, latent_channels=int(latent_channels))


def transformer_block(model_patcher, site: TransformerSite):
    """The host's BasicTransformerBlock module of a site (object patches respected). Call its modules, never
    read their weights inside a patch (lowvram, LoRA and fp8 weights are only right when the module runs)."""
    return model_patcher.get_model_object(f"diffusion_model.{site.path}")


def weights_digest(model_patcher, samples: int = 4096) -> str:
    """A short content hash of the base weights: a strided sample of a few tensors spread over the UNet.

    It ties saved reference features to the checkpoint they came from; weight patches (LoRA) are not included.
    """
    dm = model_patcher.model.diffusion_model
    sd = dm.state_dict()
    names = sorted(k for k in sd if k.endswith("weight") and sd[k].is_floating_point() and sd[k].numel() > 1)
    if not names:
        return "none"
    picks = sorted({names[0], names[len(names) // 3], names[(2 * len(names)) // 3], names[-1]})
    backup = getattr(model_patcher, "backup", {})  # weights patched in place (LoRA) keep their originals here
    h = hashlib.sha256()
    for name in picks:
        saved = backup.get(f"diffusion_model.{name}")
        t = (saved.weight if saved is not None else sd[name]).detach().reshape(-1)
        step = max(1, t.numel() // samples)
        h.update(name.encode())
        h.update(t[::step][:samples].to(device="cpu", dtype=torch.float32).numpy().tobytes())
    return h.hexdigest()[:24]


def model_fingerprint(model_patcher, layout: AttentionLayout | None = None) -> dict:
    layout = layout or attention_layout(model_patcher)
    return {"architecture": layout.signature(), "describe": layout.describe(), "weights": weights_digest(model_patcher)}


def fingerprint_json(fp: dict) -> str:
    return json.dumps(fp, sort_keys=True, separators=(",", ":"))
