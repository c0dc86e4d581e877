"""Stacking the pack's attention methods with other packs' attention patches, in either order (docs/stacking.md),
on the SD1.5 block layout and the micro SDXL layout, final latents of the host's sampler compared.

The other pack is the stand-in of the adding convention that IPAdapter_plus, InstantID and PuLID_ComfyUI share
(tests/support/foreign_patches.py: 2-tuple keys on SD1.5, 3-tuple keys on SDXL, .add() on a taken key), and the
real ComfyUI_IPAdapter_plus when a copy is available (tests/support/fixtures_ipadapter.py). For every method and
order: each side at weight 0 gives exactly the other alone, both at non-zero weight differ from each alone, and
both orders agree; chains three deep; two of the pack's methods; the host's patch lists; patches that replace a
dispatcher after the pack.
"""
import os

import pytest
import torch

import fixtures_ipadapter
import micro as m
from fixtures_stacking import LAYOUTS, METHODS, PackMethods, assert_distinct, same
from foreign_patches import ChainingPatch, RecordingAttention, StandInPack

ORDERS = ("other_first", "pack_first")
SECOND = {"inv_adapter": "taming", "eaa": "photoverse", "photoverse": "taming", "taming": "eaa"}


@pytest.fixture(scope="module")
def clip_vision():
    return m.micro_clip_vision()


@pytest.fixture(scope="module", params=LAYOUTS)
def pm(request, pack, clip_vision, tmp_path_factory):
    methods = PackMethods(request.param, str(tmp_path_factory.mktemp("stacking")), clip_vision)
    methods.cache = {}
    return methods


@pytest.fixture(scope="module")
def ipadapter_plus(base_dir):
    """The real pack's node classes, loaded into the test host for this module (None when no copy is available)."""
    if fixtures_ipadapter.source() is None:
        yield None
        return
    classes, uninstall = fixtures_ipadapter.install(os.path.join(base_dir, "custom_nodes"))
    yield classes
    uninstall()


@pytest.fixture(params=["stand-in", "IPAdapter_plus"])
def other(request, pm, ipadapter_plus, clip_vision):
    if request.param == "stand-in":
        return StandInPack(pm.layout, pm.kind)
    if ipadapter_plus is None:
        pytest.skip(f"no copy of ComfyUI_IPAdapter_plus: set {fixtures_ipadapter.ENV} or put its archive in "
                    "../shared/anchors beside the checkout")
    import folder_paths

    if "ipadapter" not in pm.cache:
        pm.cache["ipadapter"] = fixtures_ipadapter.RealIPAdapter(ipadapter_plus, pm, clip_vision,
                                                                 folder_paths.models_dir)
    return pm.cache["ipadapter"]


def cached(pm, label, make):
    if label not in pm.cache:
        pm.cache[label] = pm.sample(make())
    return pm.cache[label]


def stacked(pm, other, method, order, other_weight, pack_weight):
    if order == "other_first":
        return pm.apply(method, other.apply(pm.model, other_weight), pack_weight)
    return other.apply(pm.apply(method, pm.model, pack_weight), other_weight)


def stacked_reference(pm, other, method):
    return cached(pm, (other.name, method), lambda: stacked(pm, other, method, "other_first", 1.0, 1.0))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method", METHODS)
def test_either_order_keeps_both_sides(pm, other, method, order):
    other_alone = cached(pm, other.name, lambda: other.apply(pm.model, 1.0))
    pack_alone = cached(pm, method, lambda: pm.apply(method, pm.model, 1.0))
    # the pack at weight 0 registers nothing: the other pack's model comes out as it went in
    patched = other.apply(pm.model, 1.0)
    assert pm.apply(method, patched, 0.0) is patched
    assert torch.equal(pm.sample(stacked(pm, other, method, order, 0.0, 1.0)), pack_alone)
    both = (stacked_reference(pm, other, method) if order == "other_first"
            else pm.sample(stacked(pm, other, method, order, 1.0, 1.0)))
    assert_distinct(both, other_alone, pack_alone)
    assert same(both, stacked_reference(pm, other, method)), "the two orders disagree"


@pytest.mark.parametrize("method", METHODS)
def test_three_deep_other_pack_other(pm, other, method):
    """other -> pack -> other equals both others first: the second one's callback is given the others' output
    (the stand-in's second node reads it), not the pack's terms."""
    chain = pm.sample(other.second(pm.apply(method, other.apply(pm.model, 1.0), 1.0)))
    canonical = pm.sample(pm.apply(method, other.second(other.apply(pm.model, 1.0)), 1.0))
    assert same(chain, canonical)
    assert_distinct(chain, stacked_reference(pm, other, method))


@pytest.mark.parametrize("method", METHODS)
def test_three_deep_pack_other_pack(pm, other, method):
    second = SECOND[method]
    chain = pm.sample(pm.apply(second, other.apply(pm.apply(method, pm.model, 1.0), 1.0), 0.8))
    canonical = pm.sample(pm.apply(second, pm.apply(method, other.apply(pm.model, 1.0), 1.0), 0.8))
    assert same(chain, canonical)
    assert_distinct(chain, stacked_reference(pm, other, method))


@pytest.mark.parametrize("method", METHODS)
def test_two_of_the_packs_methods_in_either_order(pm, method):
    second = SECOND[method]
    alone = cached(pm, method, lambda: pm.apply(method, pm.model, 1.0))
    second_alone = cached(pm, second, lambda: pm.apply(second, pm.model, 1.0))
    first = pm.apply(method, pm.model, 1.0)
    assert pm.apply(second, first, 0.0) is first
    one_two = pm.sample(pm.apply(second, first, 1.0))
    two_one = pm.sample(pm.apply(method, pm.apply(second, pm.model, 1.0), 1.0))
    assert same(one_two, two_one), "the two orders disagree"
    assert_distinct(one_two, alone, second_alone)


@pytest.mark.parametrize("method", METHODS)
def test_weight_zero_returns_the_model_that_came_in(pm, method):
    assert pm.apply(method, pm.model, 0.0) is pm.model


def test_every_apply_node_at_weight_zero_outputs_its_input_model(pm):
    from comfyui_likeness.nodes.inv_adapter import LikenessInvAdapterApply
    from comfyui_likeness.nodes.photoverse import LikenessPhotoVerseApply
    from comfyui_likeness.nodes.taming import LikenessTamingApply

    model = StandInPack(pm.layout, pm.kind).apply(pm.model, 1.0)
    outputs = {
        "Inv-Adapter Apply": LikenessInvAdapterApply.execute(model, pm.features, 0.0, True, True, 0.0, 1.0,
                                                             "cond and uncond", adapter=pm.eaa),
        "PhotoVerse Apply": LikenessPhotoVerseApply.execute(model, pm.photoverse, pm.concept, 0.0, 1.0, 0.0, 0.0,
                                                            1.0),
        "Taming Encoder Apply": LikenessTamingApply.execute(model, pm.taming, pm.embedding, 0.0, 0.0, 1.0,
                                                            "null embedding", "average"),
    }
    for node, output in outputs.items():
        assert output.result[0] is model, f"{node} at weight 0 changed the model"


@pytest.mark.parametrize("method", METHODS)
def test_host_patch_lists_in_either_order(pm, method):
    """attn1/attn2 input patches and attn1/attn2 output patches (what the host's set_model_attn*_patch register)."""
    def host_patches(model):
        p = model.clone()
        p.set_model_attn1_patch(lambda n, c, v, eo: (n, c * 2.0, v))
        p.set_model_attn2_patch(lambda n, c, v, eo: (n, c * 0.5, v * 2.0))
        p.set_model_attn1_output_patch(lambda n, eo: n * 1.2)
        p.set_model_attn2_output_patch(lambda n, eo: n + 0.05)
        return p

    patches_alone = cached(pm, "host patches", lambda: host_patches(pm.model))
    pack_alone = cached(pm, method, lambda: pm.apply(method, pm.model, 1.0))
    first = pm.sample(pm.apply(method, host_patches(pm.model), 1.0))
    second = pm.sample(host_patches(pm.apply(method, pm.model, 1.0)))
    assert torch.equal(first, second)  # the patch lists run around the replace patch: nothing to reorder
    assert_distinct(first, patches_alone, pack_alone)


def test_a_later_patch_that_chains_the_dispatcher_is_not_applied_twice(pm):
    """A pack applied second that wraps the patch it finds (and so calls the dispatcher itself) gives the same as
    the same patch applied first under the dispatcher."""
    from comfyui_likeness.attention import dispatcher

    method = "taming"
    patched = pm.apply(method, pm.model, 1.0)
    wrapped = patched.clone()
    for (site, key), disp in dispatcher.dispatchers(patched).items():
        wrapped.set_model_patch_replace(ChainingPatch(disp), site, *key)

    def plain(q, k, v, eo):
        return dispatcher.host_attention(q, k, v, eo["n_heads"], eo)

    under = pm.model.clone()
    for key in pm.layout.keys:
        under.set_model_patch_replace(ChainingPatch(plain), "attn2", *key)
    assert same(pm.sample(wrapped), pm.sample(pm.apply(method, under, 1.0)))


def test_a_later_plain_replace_becomes_the_base(pm):
    """A host-style replace function set after the pack on every site (the host's rule: the last writer wins)
    runs as the base and the pack's terms still apply: the same as setting it before the pack."""
    method = "eaa"
    late = RecordingAttention()
    after = pm.apply(method, pm.model, 1.0).clone()
    before = pm.model.clone()
    for site in ("attn1", "attn2"):
        for key in pm.layout.keys:
            after.set_model_patch_replace(late, site, *key)
            before.set_model_patch_replace(late, site, *key)
    out_after = pm.sample(after)
    assert late.calls > 0
    assert same(out_after, pm.sample(pm.apply(method, before, 1.0)))
    assert_distinct(out_after, cached(pm, "plain", lambda: before))


def test_an_old_style_extension_call_fails_in_plain_words(pm):
    patched = pm.apply("taming", pm.model, 1.0)
    holder = patched.model_options["transformer_options"]["patches_replace"]["attn2"][pm.layout.keys[0]]
    with pytest.raises(RuntimeError, match="before the Likeness node"):
        holder.set_new_condition(weight=1.0)
