"""Initialisation of modules built on the host's ops, which skip torch's own (comfy.ops.disable_weight_init)."""
import torch


def torch_reset(module: torch.nn.Module) -> torch.nn.Module:
    """torch's default initialisation (the one diffusers gives new layers) for every submodule, found on the
    first torch.nn class in each module's MRO that defines reset_parameters."""
    with torch.no_grad():
        for m in module.modules():
            for cls in type(m).__mro__:
                if cls.__module__.startswith("torch.nn") and "reset_parameters" in cls.__dict__:
                    cls.reset_parameters(m)
                    break
    return module
