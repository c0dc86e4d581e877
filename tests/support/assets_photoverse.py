"""Files the shipped PhotoVerse workflows need in a test host.

- models/clip_vision/clip-vit-large-patch14.safetensors: the full-size random ViT-L/14 stand-in (standins.py),
  which the host's CLIPVisionLoader accepts.
- models/likeness/photoverse_sd15.safetensors: a PhotoVerse adapter with random weights, real shapes (1024-wide
  mappers, rank-8 LoRA, visual K/V) for the stand-in checkpoint and a ViT-L/14. No trained PhotoVerse weights
  exist; the trainer (issue 7) writes a real one under the same format.

Both are placed by standins.py under the names the shipped workflows use.
"""
import standins

ADAPTER_NAME = "photoverse_sd15.safetensors"
CHECKPOINT = standins.CHECKPOINT_NAME
VIT_L14 = {"width": 1024, "layers": 24, "image_size": 224, "patch": 14}


def write_standin_photoverse(path: str, checkpoint_path: str, seed: int = 31) -> str:
    import comfy.sd
    from comfyui_likeness.weights.photoverse import write_random_photoverse

    model = comfy.sd.load_checkpoint_guess_config(checkpoint_path, output_vae=False, output_clip=False)[0]
    return write_random_photoverse(path, model, VIT_L14, seed=seed, scale=0.5)

