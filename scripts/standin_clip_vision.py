"""Write a stand-in CLIP vision file that the host's CLIPVisionLoader accepts (ViT-L/14 or ViT-H/14 layout,
random weights).

The host picks the CLIP-vision architecture from key names and widths (comfy/clip_vision.py), so a loadable
stand-in must have the real shapes (ViT-L/14: about 300 M parameters, 0.6 GB in fp16; ViT-H/14: 630 M, 1.3 GB).
It is built at test time and never shipped. Usage: python standin_clip_vision.py COMFYUI_DIR OUT_FILE [vitl|vith]
"""
import json
import os
import sys

import torch


CONFIGS = {"vitl": "clip_vision_config_vitl.json", "vith": "clip_vision_config_h.json"}


def build_standin_clip_vision(comfy_dir: str, out_file: str, seed: int = 0, tower: str = "vitl") -> str:
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.clip_model import CLIPVisionModelProjection
    from safetensors.torch import save_file

    if tower not in CONFIGS:
        raise ValueError(f"tower must be one of {sorted(CONFIGS)} (got {tower!r})")
    with open(os.path.join(comfy_dir, "comfy", CONFIGS[tower])) as f:
        config = json.load(f)
    model = CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in model.state_dict().items():
        if key.endswith("bias"):
            t = torch.zeros(value.shape)
        elif value.ndim <= 1:
            t = torch.ones(value.shape)
        else:
            t = torch.randn(value.shape, generator=g) * (value[0].numel() ** -0.5)
        sd[key] = t.to(torch.float16).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    save_file(sd, out_file, metadata={"likeness_standin": f"random {tower} weights; for tests only"})
    return out_file


if __name__ == "__main__":
    print(build_standin_clip_vision(sys.argv[1], sys.argv[2], tower=sys.argv[3] if len(sys.argv) > 3 else "vitl"))
