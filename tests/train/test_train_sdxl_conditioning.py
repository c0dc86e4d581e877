"""The trainers' SDXL conditioning: `y` built from the pooled caption output equals what the host builds from
CLIPTextEncodeSDXL-style conditioning, and SD1.x models get none."""
import torch

import micro as m


def test_size_conditioning_equals_the_hosts_y_for_sdxl():
    from comfyui_likeness.train import diffusion
    from comfyui_likeness.train.prompt import CaptionEncoder

    model, clip = m.micro_sdxl_model(), m.micro_sdxl_clip()
    diffusion.check_trainable_model(model)
    context, pooled = CaptionEncoder(clip).with_pooled(["a photo of a face", "a dog"])
    y = diffusion.size_conditioning_y(model, pooled, 256, 192)
    for row, text in enumerate(["a photo of a face", "a dog"]):
        cond = m.sdxl_conditioning(clip, text, width=192, height=256)
        host = model.model.extra_conds(**cond[0][1], cross_attn=cond[0][0], device="cpu")
        assert torch.equal(y[row:row + 1], host["y"].cond)
        assert torch.equal(context[row:row + 1], cond[0][0][:, :77].float())
    assert diffusion.size_conditioning_y(m.micro_model(), None, 64, 64) is None


def test_sdxl_denoise_runs_with_y_and_changes_with_it():
    from comfyui_likeness.train import diffusion
    from comfyui_likeness.train.prompt import CaptionEncoder

    model, clip = m.micro_sdxl_model(), m.micro_sdxl_clip()
    context, pooled = CaptionEncoder(clip).with_pooled(["a photo"])
    x, sigma = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([2.0])
    with diffusion.gradients_on():
        a = diffusion.denoise(model, x, sigma, context, y=diffusion.size_conditioning_y(model, pooled, 256, 256))
        b = diffusion.denoise(model, x, sigma, context, y=diffusion.size_conditioning_y(model, pooled, 512, 512))
    assert a.shape == x.shape and not torch.equal(a, b)
