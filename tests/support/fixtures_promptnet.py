"""PromptNet test pieces: micro PromptNets, the stand-in's config, and a PromptNet written in ProFusion's
diffusers layout from real diffusers modules (an independent implementation of its forward)."""
import torch
import torch.nn.functional as F

import micro as m

# The stand-in SD1.5 checkpoint's UNet (scripts/standin_checkpoint.py), as the host detects it.
STANDIN_UNET = {"model_channels": 320, "in_channels": 4, "out_channels": 4, "num_res_blocks": [1], "channel_mult": [1],
                "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": -2,
                "context_dim": 768, "use_linear_in_transformer": False, "adm_in_channels": None,
                "use_temporal_attention": False, "use_temporal_resblock": False, "image_size": 32,
                "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False, "num_heads": 8,
                "num_head_channels": -1}

# The SD2.x-base stand-in's UNet (linear transformer in/out, 64-wide heads, cross-attention 1024).
STANDIN_UNET_SD2 = {**STANDIN_UNET, "context_dim": 1024, "use_linear_in_transformer": True, "num_heads": -1,
                    "num_head_channels": 64}


def random_standin_promptnet(seed=0, family="sd15"):
    """A PromptNet with random weights on a stand-in checkpoint's layout (latent_size 8 keeps the one-level
    stand-in's head small: its grid is the whole latent). family sd15: ViT-L/14 tokens; sd2: ViT-H/14 tokens, as
    ProFusion's published one."""
    from comfyui_likeness.encoders.promptnet import PromptNet

    unet, vision, prompt = (STANDIN_UNET, 1024, 768) if family == "sd15" else (STANDIN_UNET_SD2, 1280, 1024)
    net = PromptNet(unet, vision_width=vision, prompt_width=prompt, latent_size=8, region_channels=32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            v.copy_(torch.zeros_like(v) if k.endswith("bias") else torch.ones_like(v) if v.ndim <= 1
                    else torch.randn(v.shape, generator=g) * v[0].numel() ** -0.5 * 0.1)
    return net.eval()


DIFFUSERS_CONFIG = {"block_out_channels": [32, 64], "layers_per_block": 1,
                    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "mid_block_type": "UNetMidBlock2DCrossAttn",
                    "cross_attention_dim": 64, "attention_head_dim": 8, "use_linear_projection": False,
                    "prompt_channel": 64, "region_proj_channel": 16, "region_kernel_size": 4, "sample_size": 8,
                    "in_channels": 4}


def micro_promptnet(seed=0, vision_width=32):
    from comfyui_likeness.encoders.promptnet import PromptNet

    net = PromptNet(m.micro_model().model.model_config.unet_config, vision_width=vision_width, prompt_width=m.CONTEXT,
                    latent_size=8, region_channels=16)
    m._fill(net, seed)
    with torch.no_grad():
        net.head.weight.mul_(0.05)  # keep S* in the range of token embeddings
    return net.eval().requires_grad_(False)


class DiffusersPromptNet(torch.nn.Module):
    """ProFusion's PromptNet forward written with diffusers' own blocks and ProFusion's parameter names."""

    def __init__(self, seed=0):
        from diffusers import UNet2DConditionModel

        super().__init__()
        c = DIFFUSERS_CONFIG
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, down_block_types=tuple(c["down_block_types"]),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=tuple(c["block_out_channels"]),
                                    layers_per_block=1, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        ch, r = c["block_out_channels"], c["region_proj_channel"]
        self.promptnet_cond_embedding = torch.nn.ModuleDict({"conv_in": torch.nn.Conv2d(4, ch[0], 3, padding=1),
                                                             "conv_out": torch.nn.Conv2d(ch[0], ch[0], 3, padding=1)})
        self.vision_embedding = torch.nn.Linear(32, 64)
        self.first_prompt_projection = torch.nn.Conv2d(ch[0], r, 2, stride=2)   # 8x8 -> 4x4
        self.down_prompt_projections = torch.nn.ModuleList([torch.nn.Conv2d(ch[0], r, 1), torch.nn.Conv2d(ch[1], r, 1)])
        self.mid_prompt_projection = torch.nn.Conv2d(ch[1], r, 1)
        self.region_prompt_output = torch.nn.Conv2d(4 * r, c["prompt_channel"], 4, stride=4)
        self.residual_projections = torch.nn.ModuleList([torch.nn.Conv2d(ch[0], ch[0], 1)])  # unused by ProFusion
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.05)

    def forward(self, reference, x_t, t, tokens):
        emb = self.time_embedding(self.time_proj(t))
        h = self.conv_in(reference) + self.promptnet_cond_embedding["conv_out"](F.silu(self.promptnet_cond_embedding["conv_in"](x_t)))
        context = self.vision_embedding(tokens)
        feats = [self.first_prompt_projection(h)]
        for block, proj in zip(self.down_blocks, self.down_prompt_projections):
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, emb, encoder_hidden_states=context)
            else:
                h, _ = block(h, emb)
            feats.append(proj(h))
        h = self.mid_block(h, emb, encoder_hidden_states=context)
        feats.append(self.mid_prompt_projection(h))
        return self.region_prompt_output(torch.cat(feats, 1)).flatten(2).transpose(1, 2)
