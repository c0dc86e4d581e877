"""The pack's four attention methods ready to apply to one model at any weight (0 = off), on a layout_model
('sd15': the SD1.5 block layout, 'micro') or on the micro SDXL model, for the stacking tests (docs/stacking.md);
a micro ControlNet and a LoRA on the cross-attention weights for the host-node stacking tests."""
import os

import torch

import micro as m
from fixtures_inv_adapter import face_image, layout_model, random_cond
from fixtures_photoverse import random_adapter_file
from fixtures_taming import random_adapter, subject_photo

METHODS = ("inv_adapter", "eaa", "photoverse", "taming")
LAYOUTS = ("sd15", "sdxl")


def same(a, b):
    """Equal up to the order of float sums. The random micro models amplify rounding from step to step, so the
    measure is relative to the latent's largest value (a few hundred here); a missing term moves it 100x more."""
    return (a - b).abs().max() <= 1e-5 * b.abs().max()


def assert_distinct(result, *alone):
    for a in alone:
        assert (result - a).abs().max() > 1e-3 * a.abs().max(), "one side of the stack had no effect"


class PackMethods:
    """One model of a layout with the pack's methods prepared for it: Inv-Adapter features (training-free and with a
    random EAA adapter), a random PhotoVerse adapter and its concept, a random Taming adapter and an embedding."""

    def __init__(self, kind: str, tmp_dir: str, clip_vision):
        from comfyui_likeness.attention import inv_adapter
        from comfyui_likeness.concepts import photoverse_concept
        from comfyui_likeness.core import layout as layout_lib
        from comfyui_likeness.encoders import embedded_attention_adapter, taming_encoder, taming_object
        from comfyui_likeness.weights import photoverse, taming_file

        self.kind = kind
        if kind == "sdxl":
            self.model, clip = m.micro_sdxl_model(), m.micro_sdxl_clip()
            self.positive = m.sdxl_conditioning(clip, "a photo of a person in a garden", 64, 64)
            self.negative = m.sdxl_conditioning(clip, "", 64, 64)
            caption = m.sdxl_conditioning(clip, "a photo of a face", 64, 64)
        else:
            self.model = layout_model(kind)
            self.positive, self.negative, caption = random_cond(64, 1), random_cond(64, 2), random_cond(64, 7)
        self.layout = layout_lib.attention_layout(self.model)
        self.features = inv_adapter.extract_inv_features(self.model, m.micro_vae(), face_image(), caption, 3, size=64,
                                                         feature_dtype=torch.float32)
        spec = embedded_attention_adapter.EAASpec.for_layout(self.layout, self.features.reference_latent, s_c=16)
        self.eaa = embedded_attention_adapter.EmbeddedAttentionAdapter(spec, dtype=torch.float32,
                                                                       device="cpu").init_random(3)
        path = os.path.join(tmp_dir, f"photoverse_{kind}.safetensors")
        self.photoverse = photoverse.load_photoverse(random_adapter_file(path, self.model, clip_vision, seed=3))
        self.concept = photoverse_concept.encode_photoverse_concept(self.photoverse, clip_vision, face_image(), words=1)
        lib = {"layout": layout_lib, "enc": taming_encoder, "file": taming_file}
        vision = taming_encoder.VisionSpec.of_clip_vision(clip_vision)
        self.taming = random_adapter(lib, self.model, vision, seed=1, gate=0.7)
        image, mask = subject_photo()
        self.embedding = taming_object.encode_object(clip_vision, image, mask)

    def apply(self, method: str, model, weight: float):
        """model with one of the pack's methods at `weight` (PhotoVerse: LoRA strength and visual scale)."""
        from comfyui_likeness.attention import inv_adapter, photoverse, taming

        if method == "inv_adapter":
            return inv_adapter.apply_inv_adapter(model, self.features, weight=weight)
        if method == "eaa":
            return inv_adapter.apply_inv_adapter(model, self.features, adapter=self.eaa, weight=weight)
        if method == "photoverse":
            return photoverse.apply_photoverse(model, self.photoverse, self.concept, lora_strength=weight,
                                               visual_scale=weight)
        if method == "taming":
            return taming.apply_taming_encoder(model, self.taming, self.embedding, weight=weight)
        raise ValueError(method)

    def sample(self, model, latent_size=8, positive=None, negative=None, steps=2, cfg=5.0, seed=0):
        """The final latent of the host's sampler (euler, 2 steps, CFG 5) from a fixed seed."""
        import comfy.sample

        latent = torch.zeros(1, 4, latent_size, latent_size)
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive or self.positive,
                                   negative or self.negative, latent, seed=seed, disable_pbar=True)


def micro_controlnet(kind: str, seed: int = 4):
    """A CONTROL_NET of the host's ControlNet class mirroring a layout_model's UNet (random weights, zero
    convolutions included, so the control changes the result)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    from fixtures_inv_adapter import layout_config

    config = {k: v for k, v in layout_config(kind).items()
              if k not in ("out_channels", "use_temporal_attention", "use_temporal_resblock")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, num_heads=8, operations=comfy.ops.disable_weight_init,
                                     device="cpu", **config)
    m._fill(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device(), manual_cast_dtype=None)


def attn2_lora(layout, seed: int = 6, rank: int = 4) -> dict:
    """A LoRA state dict (the generic 'diffusion_model.<path>.lora_up/down.weight' format the host maps) on the
    to_q / to_k / to_v of every cross-attention: the weights PhotoVerse's LoRA patches too."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for site in layout.sites:
        for t, (rows, cols) in {"q": (site.inner_dim, site.query_dim), "k": (site.inner_dim, site.context_dim),
                                "v": (site.inner_dim, site.context_dim)}.items():
            name = f"diffusion_model.{site.path}.attn2.to_{t}"
            out[f"{name}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.3
            out[f"{name}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * cols ** -0.5
    return out
