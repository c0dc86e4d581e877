"""ProFusion's PromptNet (Zhou et al. 2023, App. B; docs/methods/promptnet.md), built on the host's own UNet blocks.

Body: the base UNet's conv_in, time embedding (with SDXL's label embedding of `y`), down levels and middle block
(the encoder half of the host's UNetModel, so the same LDM key layout and the same attention patches apply).
Inputs at every evaluation:
  reference  the VAE latent of the reference image (SD-scaled), through conv_in;
  x_t        the current noisy latent in VP scaling, through a small conv embedding added to conv_in's output;
  t          the UNet's timestep;
  y          SDXL-style UNets only: the UNet's vector conditioning (concepts/promptnet_source.py builds it from
             the size conditioning with a zero text vector, so S* does not depend on the prompt it goes into);
  tokens     CLIP-vision last_hidden_state (before post-LayerNorm), projected to the cross-attention width.
Head: the conv_in sum, each down level's output and the middle block's output are each mapped to
`region_channels` x G x G, concatenated and reduced by a G x G convolution to one token of every text-encoder
width: S* is (B, 1, sum of prompt_widths), cut per encoder in the order of prompt_widths (SDXL: clip_l 768 then
clip_g 1280). G is the deepest grid (ProFusion: 8 at a 64x64 latent), capped at 8 so an SDXL PromptNet at
128x128 keeps ProFusion's head size. ProFusion's residual heads are multiplied by zero in its code and are left out.
PromptNet needs a fixed latent size (64 for 512-pixel SD); fit_latent resizes other sizes and reports by how much
the resize shrinks white noise, so the caller can tell PromptNet the noise level it really sees.
"""
import copy
import functools
import math

import torch
import torch.nn.functional as F

import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel, forward_timestep_embed, timestep_embedding

BODY_PREFIXES = ("input_blocks.", "middle_block.", "time_embed.", "label_emb.")
MAX_GRID = 8   # ProFusion's head grid (8x8 at SD2-base's 64x64 latent)


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


def head_grid(deepest: int) -> int:
    return deepest if deepest <= MAX_GRID or deepest % MAX_GRID else MAX_GRID


@functools.lru_cache(maxsize=64)
def resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) resampling along one axis: area averaging when shrinking (each output the mean of the inputs
    it covers, so white noise stays nearly white), linear interpolation when enlarging."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]
    if n_out < n_in:
        return F.adaptive_avg_pool1d(eye, n_out)[0].T.contiguous()
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def fit_latent(x: torch.Tensor, size: int):
    """x (B, C, h, w) resized to size x size (per axis: area when shrinking, linear when enlarging) and the
    resize's white-noise gain k: the resized noise of a latent x0 + sigma * eps has standard deviation k * sigma
    (rms over pixels). Shrinking 128 -> 64 or 96 -> 64 gives k = 0.5: without being told, PromptNet
    would see a latent cleaner than its timestep says (docs/methods/promptnet.md, "Latent size")."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x, 1.0
    rh, rw = resize_matrix(int(h), size), resize_matrix(int(w), size)
    out = torch.einsum("ij,bcjk,lk->bcil", rh.to(x.device, torch.float32), x.float(), rw.to(x.device, torch.float32))
    gain = math.sqrt(float(rh.square().sum(1).mean() * rw.square().sum(1).mean()))
    return out.to(x.dtype), gain


class PromptNet(torch.nn.Module):
    def __init__(self, unet_config: dict, vision_width: int, prompt_width, latent_size: int = 64,
                 region_channels: int = 128, dtype=None, device=None, operations=comfy.ops.manual_cast):
        super().__init__()
        unet_config = {k: v for k, v in unet_config.items() if k not in ("dtype", "device")}
        self.unet_config = copy.deepcopy(unet_config)
        widths = [int(w) for w in prompt_width] if isinstance(prompt_width, (list, tuple)) else [int(prompt_width)]
        self.vision_width, self.prompt_widths, self.prompt_width = vision_width, widths, sum(widths)
        self.latent_size, self.region_channels = latent_size, region_channels
        levels = len(unet_config["channel_mult"])
        if latent_size % (2 ** (levels - 1)):
            raise ValueError(f"latent_size {latent_size} must be divisible by {2 ** (levels - 1)} for this UNet layout")
        deepest = latent_size // 2 ** (levels - 1)
        self.grid = head_grid(deepest)
        ch = unet_config["model_channels"]
        body = UNetModel(**unet_config, dtype=dtype, device="meta", operations=operations)
        # Keep the encoder half only; everything else stays on the meta device and is dropped.
        self.model_channels = ch
        self.time_embed = body.time_embed.to_empty(device=device or "cpu")
        # SDXL-style UNets add an embedding of their vector conditioning y to the time embedding.
        self.label_emb = body.label_emb.to_empty(device=device or "cpu") if body.num_classes is not None else None
        self.adm_channels = unet_config.get("adm_in_channels") if self.label_emb is not None else None
        self.input_blocks = body.input_blocks.to_empty(device=device or "cpu")
        self.middle_block = body.middle_block.to_empty(device=device or "cpu") if has_middle(unet_config) else None
        del body
        self.ends = level_ends(unet_config)
        level_channels = [ch * m for m in unet_config["channel_mult"]]
        latent_channels = int(unet_config.get("in_channels", 4))
        self.cond_embedding = torch.nn.ModuleDict({
            "conv_in": operations.Conv2d(latent_channels, ch, 3, padding=1, dtype=dtype, device=device),
            "conv_out": operations.Conv2d(ch, ch, 3, padding=1, dtype=dtype, device=device)})
        context_dim = unet_config["context_dim"]
        self.vision_proj = operations.Linear(vision_width, context_dim, dtype=dtype, device=device)
        sizes = [latent_size] + [latent_size // 2 ** min(x + 1, levels - 1) for x in range(levels)]
        channels = [ch] + level_channels
        if self.middle_block is not None:
            sizes.append(deepest)
            channels.append(level_channels[-1])
        self.projections = torch.nn.ModuleList([
            operations.Conv2d(c, region_channels, s // self.grid, stride=s // self.grid, dtype=dtype, device=device)
            for c, s in zip(channels, sizes)])
        self.head = operations.Conv2d(len(channels) * region_channels, self.prompt_width, self.grid, stride=self.grid,
                                      dtype=dtype, device=device)

    def forward(self, reference, x_t, timesteps, vision_tokens, transformer_options=None, y=None):
        """reference, x_t: (B, C, h, w) latents (SD-scaled; x_t in VP scaling); timesteps: (B,);
        vision_tokens: (B, T, vision_width); y: (B, adm) for SDXL-style bodies. Returns S*: (B, 1, prompt_width).
        Latents of another size are resized here without the noise-level correction; callers that know sigma
        use concepts/promptnet_source.promptnet_inputs instead."""
        reference = fit_latent(reference, self.latent_size)[0]
        x_t = fit_latent(x_t, self.latent_size)[0]
        options = dict(transformer_options or {})
        context = self.vision_proj(vision_tokens)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(context.dtype))
        if self.label_emb is not None:
            if y is None or y.shape[-1] != self.adm_channels:
                raise ValueError(f"this PromptNet's body is an SDXL-style UNet: it needs the {self.adm_channels}-wide "
                                 "vector conditioning y")
            emb = emb + self.label_emb(y.to(emb.dtype))
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

    def split(self, s_star: torch.Tensor) -> dict:
        """S* (..., prompt_width) -> {width: (..., width)}, one part per text encoder."""
        return dict(zip(self.prompt_widths, s_star.split(self.prompt_widths, dim=-1)))

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
