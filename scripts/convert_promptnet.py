"""Convert ProFusion's PromptNet (diffusers layout) into the pack's PromptNet file.

    .host/venv/bin/python scripts/convert_promptnet.py PROMPTNET_FOLDER OUT.safetensors

PROMPTNET_FOLDER is the `promptnet/` folder of ProFusion's saved pipeline: config.json and the weights as
diffusion_pytorch_model.safetensors. The published weights are a pickled .bin; this pack never unpickles, so
convert that file to safetensors first in an environment you trust, e.g. with diffusers:
`PromptNetModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`.
"""
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(folder: str, out: str, comfy_dir: str | None = None):
    import host_harness as harness
    import tempfile

    harness.import_host(tempfile.mkdtemp(prefix="likeness_convert_"))
    from comfyui_likeness.weights.promptnet_file import convert_diffusers_promptnet, save_promptnet
    from safetensors.torch import load_file

    weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        sys.exit(f"{weights} not found: convert the .bin to safetensors first (see this script's help)")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    net = convert_diffusers_promptnet(load_file(weights), config)
    save_promptnet(out, net, extra={"converted_from": "ProFusion diffusers PromptNet"})
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
