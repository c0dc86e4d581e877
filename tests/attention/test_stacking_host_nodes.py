"""The pack's attention methods stacked with the host's own nodes, in either order (docs/stacking.md): SAG (a
replace patch on the middle block's self-attention and a post-CFG function), PAG (a post-CFG function whose extra
pass puts a 2-tuple key patch there), ControlNet (on the conditioning) and a LoRA on the same cross-attention
weights as PhotoVerse's LoRA. The real host nodes and loaders on the micro SD1.5-architecture model (its middle
block has the 4x4 tokens SAG needs at an 8x8 latent), final latents compared."""
import pytest
import torch

import micro as m
from fixtures_stacking import METHODS, PackMethods, assert_distinct, attn2_lora, micro_controlnet, same

SELF_ATTENTION = "inv_adapter"  # the method with terms on the middle block's self-attention, which SAG and PAG patch


@pytest.fixture(scope="module")
def pm(pack, tmp_path_factory):
    return PackMethods("micro", str(tmp_path_factory.mktemp("stacking_host")), m.micro_clip_vision())


def node_model(node_class, **inputs):
    return node_class.execute(**inputs).result[0]


def sag(model, scale):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return node_model(SelfAttentionGuidance, model=model, scale=scale, blur_sigma=2.0)


def pag(model, scale):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return node_model(PerturbedAttentionGuidance, model=model, scale=scale)


@pytest.mark.parametrize("method", [SELF_ATTENTION, "taming"])
@pytest.mark.parametrize("guidance", [sag, pag], ids=["SAG", "PAG"])
def test_post_cfg_guidance_in_either_order(pm, guidance, method):
    run = pm.sample
    guided = run(guidance(pm.model, 1.5))
    alone = run(pm.apply(method, pm.model, 1.0))
    guidance_first = run(pm.apply(method, guidance(pm.model, 1.5), 1.0))
    pack_first = run(guidance(pm.apply(method, pm.model, 1.0), 1.5))
    assert same(guidance_first, pack_first), "the two orders disagree"
    assert_distinct(pack_first, guided, alone)
    assert torch.equal(run(guidance(pm.apply(method, pm.model, 0.0), 1.5)), guided)
    if guidance is pag:  # scale 0 skips PAG's extra pass: the pack alone, bit for bit
        assert torch.equal(run(pag(pm.apply(method, pm.model, 1.0), 0.0)), alone)


@pytest.mark.parametrize("method", METHODS)
def test_controlnet_and_the_pack(pm, method):
    import nodes

    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    control = micro_controlnet("micro")

    def run(model, strength):
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(pm.positive, pm.negative, control, hint, strength,
                                                                    0.0, 1.0)
        return pm.sample(model, positive=pos, negative=neg)

    cn_alone = run(pm.model, 1.0)
    pack_alone = pm.sample(pm.apply(method, pm.model, 1.0))
    both = run(pm.apply(method, pm.model, 1.0), 1.0)
    assert_distinct(both, cn_alone, pack_alone)
    assert torch.equal(run(pm.apply(method, pm.model, 0.0), 1.0), cn_alone)
    assert torch.equal(run(pm.apply(method, pm.model, 1.0), 0.0), pack_alone)


def test_lora_on_photoverses_cross_attention_weights_in_either_order(pm):
    import comfy.sd

    lora = attn2_lora(pm.layout)

    def with_lora(model, strength):
        return comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)[0]

    lora_alone = pm.sample(with_lora(pm.model, 1.0))
    pv_alone = pm.sample(pm.apply("photoverse", pm.model, 1.0))
    lora_first = pm.sample(pm.apply("photoverse", with_lora(pm.model, 1.0), 1.0))
    pv_first = pm.sample(with_lora(pm.apply("photoverse", pm.model, 1.0), 1.0))
    assert same(lora_first, pv_first), "the two orders disagree"
    assert_distinct(lora_first, lora_alone, pv_alone)
    assert torch.equal(pm.sample(pm.apply("photoverse", with_lora(pm.model, 1.0), 0.0)), lora_alone)
    assert torch.equal(pm.sample(with_lora(pm.apply("photoverse", pm.model, 1.0), 0.0)), pv_alone)
