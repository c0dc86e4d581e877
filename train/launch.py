"""Entry script of the trainers, for `accelerate launch` (or plain `python`):

    accelerate launch [--multi_gpu --num_processes N ...] train/launch.py --method promptnet --config my.json

It runs as a stand-alone script (no package around it), so it first imports the host the way ComfyUI's own
main.py would (device per process, CPU flag, base directory), then imports this pack under the importable name
`comfyui_likeness` and hands over to train/cli.py. Only the standard library and torch are used before that.

Where the host is found: --comfyui, else $COMFYUI_PATH, else the ComfyUI this pack is installed in
(<ComfyUI>/custom_nodes/<pack>), else the one scripts/setup.sh recorded in .host/comfyui_path.
"""
import os
import sys
import types

PACK_NAME = "comfyui_likeness"
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_comfyui(explicit: str | None = None) -> str:
    candidates = [explicit, os.environ.get("COMFYUI_PATH"), os.path.dirname(os.path.dirname(PACK_ROOT))]
    recorded = os.path.join(os.environ.get("LIKENESS_HOST", os.path.join(PACK_ROOT, ".host")), "comfyui_path")
    if os.path.exists(recorded):
        candidates.append(open(recorded).read().strip())
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "main.py")) and os.path.isdir(os.path.join(path, "comfy")):
            return os.path.abspath(path)
    raise SystemExit("ComfyUI was not found: pass --comfyui /path/to/ComfyUI or set COMFYUI_PATH "
                     "(the trainers run on ComfyUI's own model classes)")


def import_host(comfyui: str, cpu: bool = False, base_directory: str | None = None):
    """Import the host's modules for this process. Under accelerate every process gets its LOCAL_RANK's GPU
    before comfy.model_management is imported, so the host and accelerate agree on the device."""
    import torch

    if comfyui not in sys.path:
        sys.path.insert(0, comfyui)
    use_cpu = cpu or not torch.cuda.is_available()
    if not use_cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu = use_cpu
    args.disable_api_nodes = True
    if base_directory:
        args.base_directory = os.path.abspath(base_directory)
    import utils.extra_config  # noqa: F401  claims the top-level 'utils' package before comfy/ is on sys.path
    import folder_paths  # noqa: F401  (the base directory is fixed from here on)
    return comfyui


def import_pack():
    """This pack as the package `comfyui_likeness` without running its __init__ (no nodes are registered: the
    trainers only need the library modules)."""
    if PACK_NAME not in sys.modules:
        package = types.ModuleType(PACK_NAME)
        package.__path__ = [PACK_ROOT]
        package.__file__ = os.path.join(PACK_ROOT, "__init__.py")
        sys.modules[PACK_NAME] = package
    return sys.modules[PACK_NAME]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    comfyui = base = None
    cpu = "--cpu" in argv
    for flag in ("--comfyui", "--base-directory"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise SystemExit(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
            if flag == "--comfyui":
                comfyui = value
            else:
                base = value
    import_host(find_comfyui(comfyui), cpu=cpu, base_directory=base)
    import_pack()
    from comfyui_likeness.train.cli import main as cli_main
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
