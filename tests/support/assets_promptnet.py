"""The ProFusion workflows' PromptNet: a stand-in of ProFusion's own download (its promptnet/ folder: config.json
and the pickled diffusion_pytorch_model.bin, random weights) under the name the workflow gives, sized to fit the
checkpoint and CLIP vision the workflow names (read from their stand-in files); standins.py places it."""
import json
import os

import workflow_tools as wt

WORKFLOW = "profusion_promptnet.json"
FALLBACK = {"context": 768, "vision": 1024}    # the SD1.5 stand-in and the ViT-L stand-in


def _workflow():
    return next(wt.load(p) for p in wt.api_workflows() if os.path.basename(p) == WORKFLOW)


def _shape(path, suffixes):
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            if key.endswith(suffixes):
                return f.get_slice(key).get_shape()
    return None


def _input(prompt, class_type, name):
    return next(n["inputs"][name] for n in prompt.values() if n["class_type"] == class_type)


def write_standin_official_promptnet(base_dir, comfy_dir, weights):
    """ProFusion's download in its own layout at `weights`, sized to the checkpoint and CLIP vision stand-ins the
    ProFusion workflow names (built first if missing)."""
    import standins
    from fixtures_promptnet import DIFFUSERS_CONFIG, DiffusersPromptNet, write_official_promptnet

    prompt = _workflow()
    for _, _, name in standins.model_files.files_named(prompt):
        if name != _input(prompt, "LikenessPromptNetLoader", "promptnet_name"):
            standins.ensure(base_dir, comfy_dir, name)
    models = os.path.join(base_dir, "models")
    attn = _shape(os.path.join(models, "checkpoints", _input(prompt, "CheckpointLoaderSimple", "ckpt_name")),
                  ("attn2.to_k.weight",))
    patch = _shape(os.path.join(models, "clip_vision", _input(prompt, "CLIPVisionLoader", "clip_name")),
                   ("patch_embedding.weight",))
    context = attn[1] if attn else FALLBACK["context"]
    vision = patch[0] if patch else FALLBACK["vision"]
    config = {**DIFFUSERS_CONFIG, "cross_attention_dim": context, "prompt_channel": context}
    ref = DiffusersPromptNet(seed=0, config=config, vision_width=vision)
    folder = os.path.dirname(weights)
    write_official_promptnet(folder, ref, "bin" if weights.endswith(".bin") else "safetensors", config)
