"""Weight changes of a fine-tune as a LoRA file the host loads (LoraLoaderModelOnly, LoraLoader, Load LoRA Model).

Keys follow the host's UNet LoRA naming (comfy/lora.py model_lora_keys_unet): `lora_unet_<LDM path with _>`.
rank 0 stores each change exactly as a full-rank `.diff` (the host applies W + strength * dW); rank r > 0 stores
the best rank-r approximation (truncated SVD) as `lora_up` / `lora_down` with `alpha` = r (scale 1).
"""
import torch

from .safetensors_file import register_format, save_file

FORMAT, VERSION = "weight_lora", 1
register_format(FORMAT, "LoRA file")
PREFIX = "diffusion_model."


def lora_key(weight_key: str) -> str:
    """'diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight' -> 'lora_unet_input_blocks_1_1_..._to_q'."""
    if not (weight_key.startswith(PREFIX) and weight_key.endswith(".weight")):
        raise ValueError(f"'{weight_key}' is not a UNet weight key (diffusion_model.<path>.weight)")
    return "lora_unet_" + weight_key[len(PREFIX):-len(".weight")].replace(".", "_")


def lora_state_dict(deltas: dict, rank: int = 0, dtype=torch.float16) -> dict:
    """{UNet weight key: dW} -> {LoRA key: tensor} in the host's layout (see the module docstring)."""
    return reduce_lora({f"{lora_key(k)}.diff": v for k, v in deltas.items()}, rank, dtype)


def reduce_lora(state: dict, rank: int = 0, dtype=torch.float16) -> dict:
    """A LoRA state dict with its full-rank `.diff` entries kept (rank 0) or replaced by their best rank-r
    factors; every tensor cast to dtype (alpha stays float32)."""
    if rank < 0:
        raise ValueError(f"lora_rank must be 0 (exact) or a positive rank (got {rank})")
    out = {}
    for key, value in state.items():
        value = value.detach().float().cpu()
        name = key[:-len(".diff")] if key.endswith(".diff") else None
        if name is None or rank == 0 or value.ndim != 2 or rank >= min(value.shape):
            out[key] = value if key.endswith(".alpha") else value.to(dtype).contiguous()
            continue
        u, s, vh = torch.linalg.svd(value, full_matrices=False)
        root = s[:rank].sqrt()
        out[f"{name}.lora_up.weight"] = (u[:, :rank] * root).to(dtype).contiguous()
        out[f"{name}.lora_down.weight"] = (root[:, None] * vh[:rank]).to(dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def save_lora(path: str, state: dict, metadata: dict | None = None) -> str:
    return save_file(path, state, FORMAT, VERSION, metadata)
