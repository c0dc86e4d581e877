"""The full-size UNets the benchmarks build (bench/full_models.py, the host's classes on the meta device) have the
released models' parameter counts, and the INV_FEATURES sizes and EAA sizes docs/methods/inv-adapter.md states
follow from their layouts."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))


@pytest.fixture(scope="module")
def layouts(pack):
    import full_models as fm
    from comfyui_likeness.core.layout import attention_layout

    return {f: attention_layout(fm.MetaPatcher(f)) for f in fm.FAMILIES}


def test_full_builders_have_the_released_parameter_counts(pack):
    import full_models as fm

    for family, count in fm.UNET_PARAMETERS.items():
        assert sum(p.numel() for p in fm.meta_unet(family).parameters()) == count, family
    assert fm.UNET_PARAMETERS["sd15"] == 859_520_964  # "859.5 M"


def test_documented_feature_sizes_follow_from_the_layouts(layouts):
    import torch
    from comfyui_likeness.attention.inv_adapter import feature_bytes_per_point, stored_points
    from comfyui_likeness.encoders.embedded_attention_adapter import EAASpec

    sd15, sdxl = layouts["sd15"], layouts["sdxl"]
    assert len(sd15.sites) == 16 and len(sdxl.sites) == 70
    assert sorted({s.downscale for s in sdxl.sites}) == [2, 4]
    both = lambda layout, size: feature_bytes_per_point(layout, ("attn1", "attn2"), 1, (size // 8,) * 2)  # noqa: E731
    assert both(sd15, 512) == 46_202_880                 # 44.1 MiB per step
    assert both(sdxl, 1024) == 400 * 2**20               # 400 MiB per step
    assert feature_bytes_per_point(sdxl, ("attn1",), 1, (96, 96)) == int(112.5 * 2**20)
    # the 4 GB budget at SDXL 1024, 50 steps: 10 points with both attentions, 20 with self-attention only
    assert len(stored_points(50, both(sdxl, 1024), 4.0)) == 10
    assert len(stored_points(50, both(sdxl, 1024) // 2, 4.0)) == 20
    assert 30 * feature_bytes_per_point(sdxl, ("attn1",), 1, (96, 96)) < 4 * 2**30  # the SDXL workflow fits
    assert EAASpec.for_layout(sdxl, (128, 128), 256).parameter_count() == pytest.approx(435.8e6, rel=1e-3)
    assert torch.tensor([], dtype=torch.float16).element_size() == 2
