"""The real ComfyUI_IPAdapter_plus for the stacking tests (docs/stacking.md), when a copy is available.

Where it comes from: LIKENESS_IPADAPTER_PLUS (the unpacked pack, or an archive of it: .ci/run unpacks one), else
an archive ComfyUI_IPAdapter_plus-*.tar.gz in ../shared/anchors beside the checkout. Without either the tests that
need it are skipped; a LIKENESS_IPADAPTER_PLUS that holds no IPAdapter_plus is an error. The pack is put into the
test host's custom_nodes and loaded with the host's own custom-node loader, then removed again, so the rest of
the session sees the host as it was.

Its model files are written here with random weights in its real key layouts: image_proj.proj / image_proj.norm
(the image-embedding projection to 4 tokens) and ip_adapter.<n>.to_k_ip / to_v_ip for the n-th attention site in
the pack's own numbering (n = 1, 3, 5, ...): 16 sites on SD1.5 (input 1, 2, 4, 5, 7, 8, output 3-11 and a middle
key ("middle", 1), which the host never calls), 70 on SDXL (input 4, 5 with 2 transformers, 7, 8 with 10, output
0-2 with 10, 3-5 with 2, middle with 10). The token width tells the pack the family: 768 is SD1.5 (2-tuple keys),
2048 SDXL (3-tuple keys). Sites the micro model has get its widths; the others a small placeholder.
"""
import asyncio
import glob
import os
import shutil
import tarfile
import tempfile

import torch

import host_harness

ENV = "LIKENESS_IPADAPTER_PLUS"
FOLDER = "ComfyUI_IPAdapter_plus"
FILES = {"sd15": "ip-adapter_sd15.safetensors", "sdxl": "ip-adapter_sdxl_vit-h.safetensors"}
TOKEN_WIDTH = {"sd15": 768, "sdxl": 2048}


def source():
    """The folder or archive of ComfyUI_IPAdapter_plus to use, or None."""
    given = os.environ.get(ENV)
    if given:
        if not os.path.exists(given):
            raise FileNotFoundError(f"{ENV}={given} does not exist")
        return given
    found = sorted(glob.glob(os.path.join(os.path.dirname(host_harness.REPO), "shared", "anchors",
                                          f"{FOLDER}-*.tar.gz")))
    return found[-1] if found else None


def _unpack(archive, dest):
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        tops = [os.path.join(tmp, d) for d in os.listdir(tmp)]
        root = tops[0] if len(tops) == 1 and os.path.isdir(tops[0]) else tmp
        shutil.copytree(root, dest)


def install(custom_nodes_dir):
    """Put the pack into custom_nodes and load it as the host does. Returns (its node classes, uninstall)."""
    import nodes

    src = source()
    dest = os.path.join(custom_nodes_dir, FOLDER)
    if os.path.isdir(src):
        shutil.copytree(src, dest)
    else:
        _unpack(src, dest)
    if not os.path.exists(os.path.join(dest, "IPAdapterPlus.py")):
        shutil.rmtree(dest)
        raise FileNotFoundError(f"{src} holds no ComfyUI_IPAdapter_plus (no IPAdapterPlus.py)")
    before = set(nodes.NODE_CLASS_MAPPINGS)
    loop = asyncio.new_event_loop()
    try:
        loaded = loop.run_until_complete(nodes.load_custom_node(dest))
    finally:
        loop.close()
    added = set(nodes.NODE_CLASS_MAPPINGS) - before
    if not loaded or "IPAdapterAdvanced" not in added:
        shutil.rmtree(dest)
        raise RuntimeError(f"the host did not load ComfyUI_IPAdapter_plus from {src}")
    classes = {name: nodes.NODE_CLASS_MAPPINGS[name] for name in added}

    def uninstall():
        for name in added:
            nodes.NODE_CLASS_MAPPINGS.pop(name, None)
            nodes.NODE_DISPLAY_NAME_MAPPINGS.pop(name, None)
        shutil.rmtree(dest, ignore_errors=True)

    return classes, uninstall


def site_keys(family):
    """The pack's attention sites in its own numbering order (its n-th site has module key 2n + 1)."""
    if family == "sd15":
        return ([("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)]
                + [("middle", 1)])
    depth = {4: 2, 5: 2, 7: 10, 8: 10}
    out_depth = {0: 10, 1: 10, 2: 10, 3: 2, 4: 2, 5: 2}
    return ([("input", i, j) for i, d in depth.items() for j in range(d)]
            + [("output", i, j) for i, d in out_depth.items() for j in range(d)]
            + [("middle", 1, j) for j in range(10)])


def write_model_file(path, layout, family, image_embeds_width, seed=0, placeholder=8):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    width = TOKEN_WIDTH[family]
    inner = {s.key: s.inner_dim for s in layout.sites}
    state = {"image_proj.proj.weight": torch.randn(4 * width, image_embeds_width, generator=g) * image_embeds_width ** -0.5,
             "image_proj.proj.bias": torch.zeros(4 * width),
             "image_proj.norm.weight": torch.ones(width), "image_proj.norm.bias": torch.zeros(width)}
    for n, key in enumerate(site_keys(family)):
        rows = inner.get(key if len(key) == 3 else (*key, 0), placeholder)
        for t in ("k", "v"):
            state[f"ip_adapter.{2 * n + 1}.to_{t}_ip.weight"] = torch.randn(rows, width, generator=g) * width ** -0.5
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in state.items()}, path)
    return path


class RealIPAdapter:
    """IPAdapter Advanced of the real pack on one of PackMethods' models, with a random file of its family."""

    name = "IPAdapter_plus"

    def __init__(self, classes, pm, clip_vision, models_dir):
        family = pm.kind
        path = os.path.join(models_dir, "ipadapter", FILES[family])
        if not os.path.exists(path):
            embeds = clip_vision.encode_image(torch.zeros(1, 224, 224, 3)).image_embeds
            write_model_file(path, pm.layout, family, embeds.shape[-1])
        self.model_file = classes["IPAdapterModelLoader"]().load_ipadapter_model(FILES[family])[0]
        self.node = classes["IPAdapterAdvanced"]()
        self.clip_vision = clip_vision

    def apply(self, model, weight, seed=0):
        g = torch.Generator().manual_seed(seed)
        image = torch.rand(1, 64, 64, 3, generator=g)
        return self.node.apply_ipadapter(model, self.model_file, weight=weight, weight_type="linear",
                                         combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
                                         image=image, clip_vision=self.clip_vision)[0]

    def second(self, model):
        return self.apply(model, 0.7, seed=5)
