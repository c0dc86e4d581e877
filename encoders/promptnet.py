"""ProFusion's PromptNet (Zhou et al. 2023, App. B; docs/methods/promptnet.md), built on the host's own UNet blocks.

Body: the base UNet's conv_in, time embedding, down levels and middle block (the encoder half of the host's
UNetModel, so the same LDM key layout and the same attention patches apply). Inputs at every evaluation:
  reference  the VAE latent of the reference image (SD-scaled), through conv_in;
  x_t        the current noisy latent in VP scaling, through a small conv embedding added to conv_in's output;
  t          the UNet's timestep;
  tokens     CLIP-vision last_hidden_state (before post-LayerNorm), projected to the cross-attention width.
Head: the conv_in sum, each down level's output and the middle block's output are each mapped to
`region_channels` x G x G (G = the deepest grid), concatenated and reduced by a G x G convolution to one token
S* of the text-encoder width. ProFusion's residual heads are multiplied by zero in its code and are left out.
PromptNet needs a fixed latent size (64 for 512-pixel SD); other sizes are resized to it (docs/methods/promptnet.md).
"""
import copy

import torch
import torch.nn.functional as F

import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, forward_timestep_embed, timestep_embedding

BODY_PREFIXES = ("input_blocks.", "middle_block.", "time_embed.")


def level_ends(unet_config) -> list[int]:
    """Index in input_blocks of the last block of each level (its downsampler, except for the last level)."""
    ends, idx = [], 0
    levels = len(unet_config["channel_mult"])
    for x in range(levels):
        idx += unet_config["num_res_blocks"][x]
        if x != levels - 1:
            idx += 1
        ends.append(idx)
    return ends


def has_middle(unet_config) -> bool:
    depth = unet_config.get("transformer_depth_middle")
    return depth is not None and depth >= -1


class PromptNet(torch.nn.Module):
    def __init__(self, unet_config: dict, vision_width: int, prompt_width: int, latent_size: int = 64,
                 region_channels: int = 128, dtype=None, device=None, operations=comfy.ops.manual_cast):
        super().__init__()
        unet_config = {k: v for k, v in unet_config.items() if k not in ("dtype", "device")}
        self.unet_config = copy.deepcopy(unet_config)
        self.vision_width, self.prompt_width = vision_width, prompt_width
        self.latent_size, self.region_channels = latent_size, region_channels
        levels = len(unet_config["channel_mult"])
        if latent_size % (2 ** (levels - 1)):
            raise ValueError(f"latent_size {latent_size} must be divisible by {2 ** (levels - 1)} for this UNet layout")
        self.grid = latent_size // 2 ** (levels - 1)
        ch = unet_config["model_channels"]
        body = UNetModel(**unet_config, dtype=dtype, device="meta", operations=operations)
        # Keep the encoder half only; everything else stays on the meta device and is dropped.
        self.model_channels = ch
        self.time_embed = body.time_embed.to_empty(device=device or "cpu")
        self.input_blocks = body.input_blocks.to_empty(device=device or "cpu")
        self.middle_block = body.middle_block.to_empty(device=device or "cpu") if has_middle(unet_config) else None
        del body
        self.ends = level_ends(unet_config)
        level_channels = [ch * m for m in unet_config["channel_mult"]]
        self.cond_embedding = torch.nn.ModuleDict({
            "conv_in": operations.Conv2d(4, ch, 3, padding=1, dtype=dtype, device=device),
            "conv_out": operations.Conv2d(ch, ch, 3, padding=1, dtype=dtype, device=device)})
        context_dim = unet_config["context_dim"]
        self.vision_proj = operations.Linear(vision_width, context_dim, dtype=dtype, device=device)
        sizes = [latent_size] + [max(latent_size // 2 ** (x + 1), self.grid) for x in range(levels)]
        channels = [ch] + level_channels
        if self.middle_block is not None:
            sizes.append(self.grid)
            channels.append(level_channels[-1])
        self.projections = torch.nn.ModuleList([
            operations.Conv2d(c, region_channels, s // self.grid, stride=s // self.grid, dtype=dtype, device=device)
            for c, s in zip(channels, sizes)])
        self.head = operations.Conv2d(len(channels) * region_channels, prompt_width, self.grid, stride=self.grid,
                                      dtype=dtype, device=device)

    def forward(self, reference, x_t, timesteps, vision_tokens, transformer_options=None):
        """reference, x_t: (B, 4, h, w) latents (SD-scaled; x_t in VP scaling); timesteps: (B,);
        vision_tokens: (B, T, vision_width). Returns S*: (B, 1, prompt_width)."""
        size = (self.latent_size, self.latent_size)
        if reference.shape[-2:] != size:
            reference = F.interpolate(reference, size=size, mode="bilinear", align_corners=False)
        if x_t.shape[-2:] != size:
            x_t = F.interpolate(x_t, size=size, mode="bilinear", align_corners=False)
        options = dict(transformer_options or {})
        context = self.vision_proj(vision_tokens)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(context.dtype))
        cond = self.cond_embedding["conv_out"](F.silu(self.cond_embedding["conv_in"](x_t)))
        h = forward_timestep_embed(self.input_blocks[0], reference, emb, context, options) + cond
        features = [h]
        for i, block in enumerate(self.input_blocks[1:], start=1):
            options["block"] = ("input", i)
            h = forward_timestep_embed(block, h, emb, context, options)
            if i in self.ends:
                features.append(h)
        if self.middle_block is not None:
            options["block"] = ("middle", 0)
            h = forward_timestep_embed(self.middle_block, h, emb, context, options)
            features.append(h)
        regions = torch.cat([proj(f) for proj, f in zip(self.projections, features)], dim=1)
        return self.head(regions).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def init_from_unet(self, diffusion_model):
        """Copy the base UNet's encoder half (ProFusion initialises PromptNet from SD2-base's UNet)."""
        source = diffusion_model.state_dict()
        own = self.state_dict()
        copied = 0
        for key in own:
            if key.startswith(BODY_PREFIXES) and key in source and source[key].shape == own[key].shape:
                own[key].copy_(source[key])
                copied += 1
        return copied
