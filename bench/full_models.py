"""Full-size models for the benchmarks: random weights of the real SD1.5, SD2 (512 and 768) and SDXL configurations, built
from the host's own classes (no files, no download), so a bench measures the architecture users run.

    model = full_model("sd15")                     # ModelPatcher of the 859.5 M-parameter SD1.5 UNet
    vae = full_vae("sd15")                          # the host's VAE with the real AutoencoderKL layout
    positive = random_conditioning("sd15", seed=1)  # CONDITIONING of the family's widths (SDXL: pooled + sizes)

Weights are random and deterministic (std 1/sqrt(fan_in), zero biases, unit norms): images are noise-like, cost
and memory are those of the real model. bench_device() picks CUDA in fp16 when a GPU is present (LIKENESS_BENCH_DEVICE
= auto | cpu | cuda), else the CPU in fp32 (bf16 on request, refused on a CPU that only emulates it). Import
after the host (bench/common.boot_host); `python bench/full_models.py` prints the CPU scripts' dtype.
"""
import os

import torch

# The host's UNet configurations (what comfy/model_detection.py reads from the real checkpoints).
_SD_COMMON = {
    "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1,
    "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False, "image_size": 32,
    "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
}
FAMILIES = {
    # name: (supported-models class, model_base class, unet config, prediction, native size, context, pooled width)
    "sd15": ("SD15", "BaseModel", {**_SD_COMMON, "context_dim": 768, "use_linear_in_transformer": False},
             "eps", 512, 768, None),
    "sd2": ("SD20", "BaseModel", {**_SD_COMMON, "context_dim": 1024, "use_linear_in_transformer": True},
            "eps", 512, 1024, None),   # SD2.x-base: ProFusion's published PromptNet belongs to it
    "sd2_768": ("SD20", "BaseModel", {**_SD_COMMON, "context_dim": 1024, "use_linear_in_transformer": True},
                "v", 768, 1024, None),
    "sdxl": ("SDXL", "SDXL", {
        "in_channels": 4, "out_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
        "context_dim": 2048, "use_linear_in_transformer": True, "adm_in_channels": 2816, "num_classes": "sequential",
        "use_temporal_attention": False, "use_temporal_resblock": False, "image_size": 32,
        "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    }, "eps", 1024, 2048, 1280),
}
# Parameter counts of the released UNets, which the builders must reproduce exactly.
UNET_PARAMETERS = {"sd15": 859_520_964, "sd2": 865_910_724, "sd2_768": 865_910_724, "sdxl": 2_567_463_684}
VAE_CONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
VAE_SCALE = {"sd15": 0.18215, "sd2": 0.18215, "sd2_768": 0.18215, "sdxl": 0.13025}


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def bench_device():
    """(torch device, dtype) of a bench run: CUDA in fp16 when present (or asked for), else the CPU in fp32.
    LIKENESS_BENCH_DEVICE = auto | cpu | cuda; LIKENESS_BENCH_DTYPE = fp32 | fp16 | bf16 overrides the dtype (bf16
    on a CPU that only emulates it is refused: see BF16_TOO_SLOW)."""
    choice = os.environ.get("LIKENESS_BENCH_DEVICE", "auto")
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"LIKENESS_BENCH_DEVICE must be auto, cpu or cuda (got {choice!r})")
    named = os.environ.get("LIKENESS_BENCH_DTYPE")
    if named is not None and named not in DTYPES:
        raise ValueError(f"LIKENESS_BENCH_DTYPE must be one of {', '.join(DTYPES)} (got {named!r})")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("LIKENESS_BENCH_DEVICE=cuda but torch sees no CUDA device")
        return torch.device("cuda"), DTYPES[named or "fp16"]
    if named == "bf16":
        slowdown = cpu_bf16_slowdown()
        if slowdown > BF16_TOO_SLOW:
            raise RuntimeError(
                f"LIKENESS_BENCH_DTYPE=bf16: this CPU emulates bfloat16 (no avx512_bf16 or AMX instructions): a bf16 "
                f"matrix product takes {slowdown:.0f} times as long as in fp32 here, so a full-size bench would take "
                "days. Use LIKENESS_BENCH_DTYPE=fp32 (twice the weights' memory).")
    return torch.device("cpu"), DTYPES[named or "fp32"]


# A CPU without bfloat16 instructions (AVX2 only) emulates bf16: a 1024^2 matrix product took 109 times as long as
# in fp32 on such a machine (AMD EPYC, torch 2.13); with avx512_bf16 or AMX bf16 is faster than fp32.
BF16_TOO_SLOW = 4.0


def cpu_bf16_slowdown(size: int = 256, repeats: int = 3) -> float:
    """How many times as long a bf16 matrix product takes as an fp32 one on this CPU (median of `repeats`,
    alternated): measured rather than read off CPU flags, since what matters is what torch's kernels do with them.
    One thread: with two, a core busy elsewhere stalled the fp32 product from 0.24 ms to 16 ms (a scheduler slice)
    in some runs."""
    from common import median_times

    matrices = {name: torch.ones(size, size, dtype=DTYPES[name]) for name in ("bf16", "fp32")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = median_times({name: (lambda m=m: m @ m) for name, m in matrices.items()}, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    return t["bf16"] / max(t["fp32"], 1e-9)


def quick_cpu_dtype() -> str:
    """bf16 where this CPU computes it natively (half the weights' memory and quicker), else fp32: the CPU scripts'
    default (bench/sdxl_cpu.sh, the dry run of bench/gpu.sh)."""
    return "bf16" if cpu_bf16_slowdown() <= BF16_TOO_SLOW else "fp32"


@torch.no_grad()
def fill_random(module, seed: int = 0):
    """Deterministic random weights in place: std 1/sqrt(fan_in) for matrices and kernels, zero biases, unit
    norms, 0.02 for embeddings. The host builds modules uninitialised (disable_weight_init)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in list(module.named_parameters()) + list(module.named_buffers()):
        if p is None or not p.dtype.is_floating_point or p.numel() == 0:
            continue
        if name.endswith("bias"):
            p.zero_()
        elif p.ndim <= 1:
            p.fill_(1.0)
        else:
            std = 0.02 if "emb" in name and p.ndim == 2 and "label" not in name else p[0].numel() ** -0.5
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))
    return module


def unet_config(family: str) -> dict:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)} (got {family!r})")
    return dict(FAMILIES[family][2])


def host_unet_config(family: str) -> dict:
    """The family's config as the host completes it (its supported-models class adds the head layout): what a
    module built outside the host, such as PromptNet's encoder half, needs."""
    import comfy.supported_models

    return dict(getattr(comfy.supported_models, FAMILIES[family][0])(unet_config(family)).unet_config)


def text_widths(family: str) -> list:
    """The widths of the family's text encoders, in the order its context joins them (SDXL: clip_l, clip_g)."""
    return [768, 1280] if family == "sdxl" else [FAMILIES[family][5]]


def native_size(family: str) -> int:
    return FAMILIES[family][4]


def full_model(family: str = "sd15", dtype=None, device=None, seed: int = 0):
    """A ModelPatcher of the family's full UNet with random weights, as CheckpointLoaderSimple would give it."""
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config_name, base_name, config, prediction, _, _, _ = FAMILIES[family] if family in FAMILIES else (None,) * 7
    if config_name is None:
        raise ValueError(f"family must be one of {sorted(FAMILIES)} (got {family!r})")
    dev, dt = bench_device()
    dtype = dtype or dt
    config = getattr(comfy.supported_models, config_name)(dict(config))
    config.set_inference_dtype(dtype, None)
    model_type = comfy.model_base.ModelType.V_PREDICTION if prediction == "v" else comfy.model_base.ModelType.EPS
    base = getattr(comfy.model_base, base_name)(config, model_type=model_type, device="cpu")
    fill_random(base.diffusion_model, seed)
    base.diffusion_model.to(dtype)
    load_device = device or (dev if dev.type == "cuda" else mm.get_torch_device())
    return comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=mm.unet_offload_device())


def meta_unet(family: str):
    """The family's UNetModel on the meta device (no memory): for layouts and parameter counts."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    temporal = ("use_temporal_attention", "use_temporal_resblock")
    config = {k: v for k, v in host_unet_config(family).items() if k not in temporal}
    return UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)


class MetaPatcher:
    """Just enough of a ModelPatcher for core/layout.attention_layout on a meta UNet."""

    def __init__(self, family: str):
        self.unet = meta_unet(family)
        self.model = type("MetaModel", (), {"model_config": None, "model_type": None})()

    def get_model_object(self, name):
        return self.unet


def parameter_count(model_patcher) -> int:
    return sum(p.numel() for p in model_patcher.model.diffusion_model.parameters())


def full_vae(family: str = "sd15", seed: int = 1, dtype=None):
    """The host's VAE (comfy.sd.VAE) on a random state dict with the real SD / SDXL AutoencoderKL layout."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    with torch.device("meta"):
        engine = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": VAE_CONFIG},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": VAE_CONFIG})
    shapes = {k: tuple(v.shape) for k, v in engine.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("bias"):
            sd[k] = torch.zeros(shape)
        elif len(shape) <= 1:
            sd[k] = torch.ones(shape)
        else:
            sd[k] = torch.randn(shape, generator=g) * (torch.tensor(shape[1:]).prod().item() ** -0.5)
    dev, dt = bench_device()
    return comfy.sd.VAE(sd=sd, dtype=dtype or dt)


def random_conditioning(family: str, seed: int, width: int | None = None, height: int | None = None, tokens: int = 77):
    """CONDITIONING with the family's context width; for SDXL also the pooled output and the size keys that
    CLIPTextEncodeSDXL writes (so the host builds the real `y`)."""
    _, _, _, _, size, context, pooled = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, context, generator=g)
    extra = {}
    if pooled is not None:
        w, h = width or size, height or size
        extra = {"pooled_output": torch.randn(1, pooled, generator=g), "width": w, "height": h, "crop_w": 0,
                 "crop_h": 0, "target_width": w, "target_height": h}
    return [[cond, extra]]


VIT_H_WIDTH = 1280   # token width of OpenCLIP ViT-H/14, the CLIP vision ProFusion's PromptNet reads


def full_promptnet(family: str = "sd2", seed: int = 1, dtype=torch.float32, share_with=None):
    """A random PromptNet of ProFusion's construction on the family's UNet (its encoder half, ViT-H tokens, the
    family's native latent; SD2-base is the one ProFusion published). share_with: a UNet whose encoder-half weights
    PromptNet's body then uses in place of its own copy (ProFusion initialises it from the UNet; the compute is the
    same and the copy's 1.6 GB are saved)."""
    from comfyui_likeness.encoders.promptnet import BODY_PREFIXES, PromptNet

    config = host_unet_config(family)
    shape = dict(vision_width=VIT_H_WIDTH, prompt_width=text_widths(family), latent_size=native_size(family) // 8,
                 region_channels=128)
    if share_with is None:
        return fill_random(PromptNet(config, **shape), seed).to(dtype).eval()
    net = PromptNet(config, **shape, device="meta")
    source = dict(share_with.named_parameters())
    for name, module in list(net.named_modules()):
        for leaf, p in list(module.named_parameters(recurse=False)):
            key = f"{name}.{leaf}" if name else leaf
            shared = key.startswith(BODY_PREFIXES) and key in source and source[key].shape == p.shape
            module._parameters[leaf] = source[key] if shared else torch.nn.Parameter(torch.empty(p.shape, dtype=dtype))
    for name, module in list(net.named_modules()):
        for leaf, b in list(module.named_buffers(recurse=False)):
            module._buffers[leaf] = torch.zeros(b.shape, dtype=b.dtype)
    body = tuple(p.rstrip(".") for p in BODY_PREFIXES)
    for m in [m for n, m in net.named_children() if not n.startswith(body)]:
        fill_random(m, seed)
    return net.eval()


def full_clip(family: str, dtype=torch.float32, seed: int = 2):
    """The host's CLIP (tokenizer and the family's full text encoders) with random weights."""
    import comfy.sd
    import comfy.supported_models

    target = getattr(comfy.supported_models, FAMILIES[family][0])(unet_config(family)).clip_target()
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype})
    fill_random(clip.cond_stage_model, seed)
    return clip


def face_image(size: int = 512, seed: int = 5):
    """A smooth synthetic face-like IMAGE (1, size, size, 3) in [0, 1]: the reference photo of a bench run."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = torch.exp(-(xx ** 2 + (yy * 1.2) ** 2) * 2.0)
    img = torch.stack([blob * 0.9, blob * 0.7 + 0.1, blob * 0.5 + 0.2], -1)
    return (img + 0.05 * torch.rand(size, size, 3, generator=g)).clamp(0, 1)[None]


if __name__ == "__main__":  # the CPU scripts' dtype: python bench/full_models.py -> bf16 | fp32
    print(quick_cpu_dtype())
