"""ProFusion's PromptNet as users download it: the diffusers-layout promptnet folder (config.json and the weights
with ProFusion's key names) as safetensors and as the published pickled .bin, through the PromptNet Loader, giving
the same S* as the converter's file; the cache of the conversion; the converter script on relative paths."""
import logging
import os
import pickle
import subprocess
import sys

import pytest
import torch

from fixtures_promptnet import DiffusersPromptNet, write_official_promptnet

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.nodes import promptnet as nodes
    from comfyui_likeness.weights import promptnet_diffusers
    return {"nodes": nodes, "diffusers": promptnet_diffusers}


@pytest.fixture(scope="module")
def ref():
    return DiffusersPromptNet(seed=4).eval()


@pytest.fixture(scope="module")
def likeness(base_dir):
    path = os.path.join(base_dir, "models", "likeness")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def official(ref, likeness):
    """The pipeline folder twice, once with each weight format, and the converter's file made from the .bin."""
    st = write_official_promptnet(os.path.join(likeness, "pf_official_st", "promptnet"), ref)
    binary = write_official_promptnet(os.path.join(likeness, "pf_official_bin", "promptnet"), ref, "bin")
    converted = os.path.join(likeness, "pf_converted.safetensors")
    if not os.path.exists(converted):
        run_converter(os.path.relpath(os.path.dirname(os.path.dirname(binary)), likeness), "pf_converted.safetensors",
                      cwd=likeness)
    return {"st": st, "bin": binary, "converted": converted}


def run_converter(source, out, cwd):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_promptnet.py"), source, out],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return proc


def s_star(promptnet, seed=1):
    g = torch.Generator().manual_seed(seed)
    args = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([801.0, 21.0]),
            torch.randn(2, 257, 32, generator=g))
    with torch.no_grad():
        return promptnet.patcher.model(*args), args


def load(lib, name):
    return lib["nodes"].LikenessPromptNetLoader.execute(name).result[0]


def listed(lib):
    schema = lib["nodes"].LikenessPromptNetLoader.GET_SCHEMA()
    return schema.inputs[0].options


def test_official_layout_loads_and_gives_the_converted_s_star(lib, ref, official, caplog):
    names = listed(lib)
    st_name = "pf_official_st/promptnet/diffusion_pytorch_model.safetensors"
    bin_name = "pf_official_bin/promptnet/diffusion_pytorch_model.bin"
    assert {st_name, bin_name, "pf_converted.safetensors"} <= set(names)
    want, args = s_star(load(lib, "pf_converted.safetensors"))
    with torch.no_grad():
        assert torch.allclose(want, ref(*args), atol=1e-4, rtol=1e-4)     # the converted file is ProFusion's forward
    for name in (st_name, bin_name):
        with caplog.at_level(logging.INFO, logger="likeness"):
            caplog.clear()
            got, _ = s_star(load(lib, name))
        assert torch.equal(got, want), name
        how = "weights-only loader" if name.endswith(".bin") else "safetensors"
        assert "converted ProFusion's PromptNet" in caplog.text and how in caplog.text and "cached it as" in caplog.text
    # the conversion is cached beside the source, used from then on, and not listed a second time
    for folder in ("pf_official_st", "pf_official_bin"):
        assert os.path.isfile(os.path.join(os.path.dirname(official["st"]).replace("pf_official_st", folder),
                                           "likeness_promptnet.safetensors"))
    with caplog.at_level(logging.INFO, logger="likeness"):
        caplog.clear()
        again, _ = s_star(load(lib, bin_name))
    assert torch.equal(again, want) and "uses its cached conversion" in caplog.text
    assert not any("likeness_promptnet" in n for n in listed(lib))
    loaded = load(lib, bin_name)
    assert loaded.meta["converted_from"] == "ProFusion diffusers PromptNet" and int(loaded.meta["vision_width"]) == 32


def test_the_cache_never_overwrites_a_file(lib, ref, likeness, official):
    folder = os.path.join(likeness, "pf_busy", "promptnet")
    source = write_official_promptnet(folder, ref, "bin")
    other = os.path.join(folder, "likeness_promptnet.safetensors")
    with open(official["converted"], "rb") as f:
        original = f.read()
    with open(other, "wb") as f:       # a PromptNet file from elsewhere under the cache's name
        f.write(original)
    name = "pf_busy/promptnet/diffusion_pytorch_model.bin"
    first, _ = s_star(load(lib, name))
    assert open(other, "rb").read() == original
    assert os.path.isfile(os.path.join(folder, "likeness_promptnet_2.safetensors"))
    # the source changes: a new conversion under a new name, the earlier ones kept
    changed = DiffusersPromptNet(seed=9).eval()
    torch.save({k: v.detach().clone() for k, v in changed.state_dict().items()}, source)
    os.utime(source, ns=(os.stat(source).st_atime_ns, os.stat(source).st_mtime_ns + 10 ** 9))
    second, args = s_star(load(lib, name))
    assert os.path.isfile(os.path.join(folder, "likeness_promptnet_3.safetensors"))
    with torch.no_grad():
        assert not torch.allclose(first, second) and torch.allclose(second, changed(*args), atol=1e-4, rtol=1e-4)


class _Marker:
    """A pickle that would write a file if it were unpickled unrestricted."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_bin_is_read_only_through_the_weights_only_loader(lib, likeness, tmp_path):
    folder = os.path.join(likeness, "pf_hostile", "promptnet")
    write_official_promptnet(folder, DiffusersPromptNet(seed=1), "bin")
    marker = tmp_path / "executed"
    with open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb") as f:
        pickle.dump({"conv_in.weight": _Marker(str(marker))}, f)
    with pytest.raises(ValueError, match="restricted \\(weights-only\\) loader"):
        load(lib, "pf_hostile/promptnet/diffusion_pytorch_model.bin")
    assert not marker.exists()
    assert not any(n.startswith("pf_hostile/promptnet/likeness_promptnet") for n in os.listdir(likeness))
    # a pickle outside a ProFusion folder is not listed and is refused by name
    loose = os.path.join(likeness, "loose_promptnet.bin")
    torch.save({"w": torch.zeros(1)}, loose)
    assert "loose_promptnet.bin" not in listed(lib)
    with pytest.raises(ValueError, match="pickled file"):
        lib["diffusers"].load_any_promptnet(loose, "loose_promptnet.bin")


def test_converter_script_takes_relative_paths_and_never_overwrites(official, likeness, tmp_path):
    (tmp_path / "work").mkdir()
    proc = run_converter(os.path.relpath(official["st"], str(tmp_path / "work")), "out.safetensors",
                         cwd=str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "work" / "out.safetensors").is_file()
    again = run_converter(os.path.relpath(official["st"], str(tmp_path / "work")), "out.safetensors",
                          cwd=str(tmp_path / "work"))
    assert again.returncode != 0 and "never overwrites" in again.stderr
