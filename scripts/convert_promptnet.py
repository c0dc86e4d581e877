"""Convert ProFusion's PromptNet (its diffusers layout) into the pack's PromptNet file, offline.

    .host/venv/bin/python scripts/convert_promptnet.py SOURCE OUT.safetensors

SOURCE is the `promptnet/` folder of ProFusion's saved pipeline (config.json plus diffusion_pytorch_model.bin as
published, or diffusion_pytorch_model.safetensors), the pipeline folder holding it, or one of those weight files.
A .bin is read only through the host's restricted loader (torch.load with weights_only), never a plain unpickle.
Relative paths are taken from the current directory. OUT must not exist yet: nothing is overwritten.

The PromptNet Loader does the same conversion by itself when the folder sits under models/likeness; this script
is for converting once, elsewhere.
"""
import os
import sys
import tempfile


def promptnet_folder(source: str) -> str:
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    nested = os.path.join(folder, "promptnet")
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isdir(nested):
        return nested
    return folder


def main(source: str, out: str) -> str:
    # Absolute paths first: importing the host changes the working directory.
    source, out = os.path.abspath(source), os.path.abspath(out)
    if not os.path.exists(source):
        sys.exit(f"{source} does not exist")
    if os.path.exists(out):
        sys.exit(f"{out} already exists; give another name (the converter never overwrites a file)")
    import host_harness as harness

    harness.import_host(tempfile.mkdtemp(prefix="likeness_convert_"))
    from comfyui_likeness.weights.promptnet_diffusers import (is_promptnet_folder, read_config, read_weights,
                                                             weight_files)
    from comfyui_likeness.weights.promptnet_file import convert_diffusers_promptnet, save_promptnet

    folder = promptnet_folder(source)
    if not is_promptnet_folder(folder):
        sys.exit(f"{folder} has no ProFusion config.json (_class_name PromptNetModel)")
    weights = source if os.path.isfile(source) else next(iter(weight_files(folder)), None)
    if weights is None:
        sys.exit(f"{folder} has no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin")
    net = convert_diffusers_promptnet(read_weights(weights), read_config(folder))
    save_promptnet(out, net, extra={"converted_from": "ProFusion diffusers PromptNet"})
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
