"""Shared pieces for the Fusion Sampling tests: micro conditionings, direct model calls, a micro ControlNet."""
import torch

import micro as m


def encode(clip, text):
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def conds(clip):
    return {"negative": encode(clip, ""), "fused": encode(clip, "a photo of a red apple"),
            "concept": encode(clip, "a photo of a green apple"), "context": encode(clip, "a photo of a fruit")}


def empty_latent(batch=1, size=8, seed=None):
    if seed is None:
        return {"samples": torch.zeros(batch, 4, size, size)}
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, 4, size, size, generator=g)}


def direct_denoise(model_patcher, x, sigma, cond):
    """D(x; sigma, c) straight from BaseModel.apply_model, no guider, no batching (reference computation)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model_patcher])
    torch.set_grad_enabled(False)
    tensor = cond[0][0]
    s = torch.full((x.shape[0],), float(sigma))
    try:
        return model_patcher.model.apply_model(x, s, c_crossattn=tensor.repeat(x.shape[0], 1, 1)).float()
    finally:
        torch.set_grad_enabled(True)


def micro_controlnet(seed=3):
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm

    cfg = m.unet_config()
    net = comfy.cldm.cldm.ControlNet(
        image_size=32, in_channels=4, model_channels=cfg["model_channels"], hint_channels=3,
        num_res_blocks=cfg["num_res_blocks"], channel_mult=cfg["channel_mult"], transformer_depth=cfg["transformer_depth"],
        transformer_depth_middle=cfg["transformer_depth_middle"], context_dim=cfg["context_dim"], num_heads=8,
        use_spatial_transformer=True, legacy=False, use_linear_in_transformer=False, device="cpu")
    m._fill(net, seed)
    # Like a classic SD1.5 ControlNet: the hint is an image, no latent format, no VAE needed.
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device())
