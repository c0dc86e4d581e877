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
STANDIN_SD2_UNET = STANDIN_UNET_SD2


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


# config.json of a PromptNet as ProFusion's code writes it (diffusers save_pretrained of PromptNetModel, every
# constructor argument plus _class_name and _diffusers_version), at micro widths: SD2's four levels and linear
# projections, so ProFusion's own kernel rule (first projection max(2^(levels-1), 8)) holds as for SD2.
DIFFUSERS_CONFIG = {
    "_class_name": "PromptNetModel", "_diffusers_version": "0.15.0.dev0", "act_fn": "silu",
    "attention_head_dim": [2, 2, 4, 4], "block_out_channels": [32, 32, 64, 64], "center_input_sample": False,
    "class_embed_type": None, "conv_in_kernel": 3, "cross_attention_dim": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "in_channels": 4, "layers_per_block": 1, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": None, "prompt_channel": 64, "region_kernel_size": 1,
    "region_proj_channel": 16, "res_block_out_channels": [32, 32, 64, 64], "resnet_time_scale_shift": "default",
    "sample_size": 8, "time_cond_proj_dim": None, "time_embedding_type": "positional", "timestep_post_act": None,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "upcast_attention": False, "use_clip_vision_embeds": True, "use_linear_projection": True, "use_res": True,
    "with_noise": True,
}
VISION_WIDTH = 32   # ProFusion's OpenCLIP ViT-H gives 1280; the micro CLIP vision 32


def micro_promptnet(seed=0, vision_width=32):
    from comfyui_likeness.encoders.promptnet import PromptNet

    net = PromptNet(m.micro_model().model.model_config.unet_config, vision_width=vision_width, prompt_width=m.CONTEXT,
                    latent_size=8, region_channels=16)
    m._fill(net, seed)
    with torch.no_grad():
        net.head.weight.mul_(0.05)  # keep S* in the range of token embeddings
    return net.eval().requires_grad_(False)


def micro_sdxl_promptnet(seed=0, vision_width=32):
    """A PromptNet on the micro SDXL UNet's encoder half (label embedding of y, depth-2 transformers), one S*
    part per text encoder (clip_l 64 + clip_g 96)."""
    from comfyui_likeness.encoders.promptnet import PromptNet

    net = PromptNet(m.micro_sdxl_model().model.model_config.unet_config, vision_width=vision_width,
                    prompt_width=[m.SDXL_L_WIDTH, m.SDXL_G_WIDTH], latent_size=8, region_channels=16)
    m._fill(net, seed)
    with torch.no_grad():
        net.head.weight.mul_(0.05)
    return net.eval().requires_grad_(False)


def promptnet_patcher(net):
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(net, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


class DiffusersPromptNet(torch.nn.Module):
    """ProFusion's PromptNet (its promptnet.py) rebuilt with diffusers' own blocks and ProFusion's parameter names and
    construction rules, residual heads included: the reference forward and the source of official-layout files."""

    def __init__(self, seed=0, config=None, vision_width=VISION_WIDTH):
        from diffusers import UNet2DConditionModel

        super().__init__()
        c = config or DIFFUSERS_CONFIG
        torch.manual_seed(seed)
        ch, res, r = c["block_out_channels"], c["res_block_out_channels"], c["region_proj_channel"]
        unet = UNet2DConditionModel(sample_size=c["sample_size"], in_channels=4, out_channels=4,
                                    down_block_types=tuple(c["down_block_types"]), up_block_types=tuple(c["up_block_types"]),
                                    block_out_channels=tuple(ch), layers_per_block=c["layers_per_block"],
                                    cross_attention_dim=c["cross_attention_dim"], attention_head_dim=c["attention_head_dim"],
                                    use_linear_projection=c["use_linear_projection"], norm_num_groups=c["norm_num_groups"])
        self.conv_in, self.time_proj, self.time_embedding = unet.conv_in, unet.time_proj, unet.time_embedding
        self.down_blocks, self.mid_block = unet.down_blocks, unet.mid_block
        self.promptnet_cond_embedding = torch.nn.ModuleDict({"conv_in": torch.nn.Conv2d(4, ch[0], 3, padding=1),
                                                             "conv_out": torch.nn.Conv2d(ch[0], ch[0], 3, padding=1)})
        self.vision_embedding = torch.nn.Linear(vision_width, c["cross_attention_dim"])
        # ProFusion's kernel rule: max(2^(levels - 1), 8) for conv_in's output, halved after every downsampling block
        size = max(2 ** (len(ch) - 1), 8)
        self.first_prompt_projection = torch.nn.Conv2d(ch[0], r, size, stride=size)
        self.down_prompt_projections = torch.nn.ModuleList()
        self.residual_projections = torch.nn.ModuleList([torch.nn.Conv2d(ch[0], res[0], 1)])
        self.residual_projections_2 = torch.nn.ModuleList([torch.nn.Conv2d(res[0], res[0], 1, bias=False)])
        for i, out in enumerate(ch):
            final = i == len(ch) - 1
            size = size if final else size // 2
            self.down_prompt_projections.append(torch.nn.Conv2d(out, r, size, stride=size))
            for _ in range(c["layers_per_block"] + (0 if final else 1)):
                self.residual_projections.append(torch.nn.Conv2d(out, res[i], 1))
                self.residual_projections_2.append(torch.nn.Conv2d(res[i], res[i], 1, bias=False))
        self.mid_prompt_projection = torch.nn.Conv2d(ch[-1], r, size, stride=size)
        self.mid_residual_projection = torch.nn.Conv2d(ch[-1], res[-1], 1)
        self.mid_residual_projection_2 = torch.nn.Conv2d(res[-1], res[-1], 1, bias=False)
        k = c["region_kernel_size"]
        self.region_prompt_output = torch.nn.Conv2d((len(ch) + 2) * r, c["prompt_channel"], k, stride=k)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.05)

    def forward(self, reference, x_t, t, tokens):
        """S* as ProFusion's forward computes it (its residual outputs are multiplied by zero there: left out)."""
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


def write_official_promptnet(folder, ref, weights="safetensors", config=None):
    """A `promptnet/` folder as ProFusion's save_pretrained writes it: config.json and
    diffusion_pytorch_model.safetensors, or the pickled diffusion_pytorch_model.bin as published (torch.save of the
    state dict; the test writes the pickle, the pack only ever reads it through the host's weights-only loader)."""
    import json
    import os

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config or DIFFUSERS_CONFIG, f, indent=2, sort_keys=True)
    state = {k: v.detach().clone().contiguous() for k, v in ref.state_dict().items()}
    if weights == "bin":
        path = os.path.join(folder, "diffusion_pytorch_model.bin")
        torch.save(state, path)
    else:
        path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        save_file(state, path, metadata={"format": "pt"})
    return path
