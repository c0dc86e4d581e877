"""Micro SD1.5-architecture models built straight from the host's classes, for fast tests (no files).

UNet: 32 channels, two levels, a middle block, context 64 (about 1 M parameters); CLIP: the CLIP-L layout at
width 64 with 2 layers and the host's real tokenizer; VAE: a TAESD-shaped autoencoder. Weights are random and
deterministic. The host leaves weights uninitialised (disable_weight_init), so every tensor is set here.
"""
import json
import os

import torch

CONTEXT = 64


def _fill(module, seed):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in module.state_dict().items():
        if not v.dtype.is_floating_point:
            state[k] = v
        elif k.endswith("bias"):
            state[k] = torch.zeros_like(v)
        elif v.ndim <= 1:
            state[k] = torch.ones_like(v)
        else:
            std = 0.02 if "embedding" in k else v[0].numel() ** -0.5
            state[k] = torch.randn(v.shape, generator=g) * std
    module.load_state_dict(state)


def unet_config(context=CONTEXT, channels=32):
    return {
        "model_channels": channels, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1],
        "channel_mult": [1, 2], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1, "context_dim": context, "use_linear_in_transformer": False,
        "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
        "image_size": 32, "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    }


def micro_model(v_prediction=False, seed=0, context=CONTEXT):
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(unet_config(context))
    config.set_inference_dtype(torch.float32, None)
    model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(config, model_type=model_type, device="cpu")
    _fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def micro_inpaint_model(seed=6):
    """An SD1.5-architecture inpainting UNet at micro size: 9 input channels (latent, mask, masked image), the host's
    inpainting conditioning (concat_keys mask / masked_image), as SD-2-inpainting and sd-v1-5-inpainting are built."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15({**unet_config(), "in_channels": 9})
    config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.EPS, device="cpu")
    model.set_inpaint()
    _fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def micro_clip(seed=1, width=CONTEXT, embedding_directory=None):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    with open(os.path.join(os.path.dirname(comfy.sd1_clip.__file__), "sd1_clip_config.json")) as f:
        config = json.load(f)
    config.update({"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "projection_dim": width})

    class MicroClipL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, model_options={**model_options, "model_name": "clip_l"},
                             return_projected_pooled=False, textmodel_json_config=config)

    class MicroTokenizer(comfy.sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data={**tokenizer_data, "embedding_size": width})

    def clip_model(**kw):
        return comfy.sd1_clip.SD1ClipModel(clip_model=MicroClipL, **kw)

    target = comfy.supported_models_base.ClipTarget(MicroTokenizer, clip_model)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    _fill(clip.cond_stage_model, seed)
    return clip


def micro_vae(seed=2):
    import comfy.sd
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    _fill(taesd, seed)
    sd = dict(taesd.state_dict())
    sd["vae_scale"] = torch.tensor(0.18215)
    sd["vae_shift"] = torch.tensor(0.0)
    return comfy.sd.VAE(sd=sd)


def micro_kl_vae(seed=2):
    """A KL autoencoder (the SD VAE's class, AutoencoderKL with a latent distribution) at micro width: 8x down,
    4 latent channels. Its posterior has a real variance, unlike TAESD's."""
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})
    _fill(vae.first_stage_model, seed)
    return vae


def micro_clip_vision(width=32, layers=24, image_size=224, patch=14, projection=16, tmp_dir=None):
    """A ClipVisionModel of the host with the ViT-L/14 layout but a tiny width (24 layers, 257 tokens at 224),
    so layer-index logic (PhotoVerse's layers 24, 4, 8, 12, 16) is exercised. The host wants a JSON path."""
    import tempfile

    import comfy.clip_vision

    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": width,
              "image_size": image_size, "initializer_factor": 1.0, "initializer_range": 0.02,
              "intermediate_size": 4 * width, "layer_norm_eps": 1e-5, "model_type": "clip_vision_model",
              "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": layers, "patch_size": patch,
              "projection_dim": projection, "torch_dtype": "float32"}
    path = os.path.join(tmp_dir or tempfile.mkdtemp(prefix="micro_clip_vision_"), "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    cv = comfy.clip_vision.ClipVisionModel(path)
    _fill(cv.model, 5)
    return cv


# --- SDXL architecture ---------------------------------------------------------------------------------------
# The host's SDXL classes at micro widths: two text encoders (clip_l 64 wide, clip_g 96 wide, concatenated into a
# 160-wide context), the pooled clip_g output plus six size embeddings as the UNet's `y` (96 + 6 * 256 = 1632),
# three levels with no attention on the first, and transformer depth 2 (keys (..., 0) and (..., 1)) elsewhere.
SDXL_L_WIDTH, SDXL_G_WIDTH = 64, 96
SDXL_CONTEXT = SDXL_L_WIDTH + SDXL_G_WIDTH
SDXL_ADM = SDXL_G_WIDTH + 6 * 256


def sdxl_unet_config(channels=32):
    return {
        "model_channels": channels, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1, 1, 1],
        "channel_mult": [1, 2, 2], "transformer_depth": [0, 2, 2], "transformer_depth_output": [0, 0, 2, 2, 2, 2],
        "transformer_depth_middle": 2, "context_dim": SDXL_CONTEXT, "use_linear_in_transformer": True,
        "num_head_channels": 16, "adm_in_channels": SDXL_ADM, "num_classes": "sequential", "use_temporal_attention": False,
        "use_temporal_resblock": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "use_checkpoint": False,
    }


def micro_sdxl_model(v_prediction=False, seed=10):
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SDXL(sdxl_unet_config())
    config.set_inference_dtype(torch.float32, None)
    model_type = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    model = comfy.model_base.SDXL(config, model_type=model_type, device="cpu")
    _fill(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _clip_config(path, width, layers=3):
    with open(path) as f:
        config = json.load(f)
    config.update({"hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
                   "num_attention_heads": 2, "projection_dim": width})
    return config


def micro_sdxl_clip(seed=11, embedding_directory=None):
    """The host's SDXL text stack (SDXLClipModel / SDXLTokenizer layout: keys 'l' and 'g', clip_g's projected
    pooled output) at micro widths, with the host's real tokenizers."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models_base

    here = os.path.dirname(comfy.sd1_clip.__file__)
    l_config = _clip_config(os.path.join(here, "sd1_clip_config.json"), SDXL_L_WIDTH)
    g_config = _clip_config(os.path.join(here, "clip_config_bigg.json"), SDXL_G_WIDTH)

    class MicroL(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                             model_options={**model_options, "model_name": "clip_l"}, return_projected_pooled=False,
                             textmodel_json_config=l_config)

    class MicroG(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            super().__init__(device=device, dtype=dtype, layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                             model_options={**model_options, "model_name": "clip_g"}, return_projected_pooled=True,
                             textmodel_json_config=g_config, special_tokens={"start": 49406, "end": 49407, "pad": 0})

    class MicroSDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):
            torch.nn.Module.__init__(self)
            self.clip_l = MicroL(device=device, dtype=dtype, model_options=model_options)
            self.clip_g = MicroG(device=device, dtype=dtype, model_options=model_options)
            self.dtypes = {dtype}

    class MicroSDXLTokenizer(comfy.sdxl_clip.SDXLTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):
            self.clip_l = comfy.sd1_clip.SDTokenizer(embedding_directory=embedding_directory, embedding_size=SDXL_L_WIDTH,
                                                     embedding_key="clip_l", tokenizer_data=tokenizer_data)
            self.clip_g = comfy.sd1_clip.SDTokenizer(embedding_directory=embedding_directory, pad_with_end=False,
                                                     embedding_size=SDXL_G_WIDTH, embedding_key="clip_g",
                                                     tokenizer_data=tokenizer_data)

    target = comfy.supported_models_base.ClipTarget(MicroSDXLTokenizer, MicroSDXLClipModel)
    clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32})
    _fill(clip.cond_stage_model, seed)
    return clip


def sdxl_conditioning(clip, text, width=256, height=256):
    """CONDITIONING as the host's CLIPTextEncodeSDXL makes it: the context, the pooled output and the size keys."""
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled, "width": width, "height": height, "crop_w": 0, "crop_h": 0,
                    "target_width": width, "target_height": height}]]
