"""Likeness Prompt on SDXL's text stack (micro widths, the host's SDXL classes and real tokenizers): the concept
reaches both encoders (clip_l and clip_g) at the placeholder found by token ids in both tokenizers, the pooled
clip_g output follows it, gamma scales exactly its rows in both halves, textual-inversion files with clip_l /
clip_g load, and a concept for one encoder only is refused in plain words."""
import pytest
import torch
from safetensors.torch import save_file

import micro as m
from text_reference import sdxl_encode_with_slot

L, G = m.SDXL_L_WIDTH, m.SDXL_G_WIDTH


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.concepts import concept, embedding_files, prompt_injection
    return {"concept": concept, "files": embedding_files, "inject": prompt_injection}


@pytest.fixture(scope="module")
def clip():
    return m.micro_sdxl_clip()


def host_encode(clip, text):
    import nodes
    cond = nodes.CLIPTextEncode().encode(clip, text)[0]
    return cond[0][0], cond[0][1]["pooled_output"]


def vectors(n, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return {L: torch.randn(n, L, generator=g) * scale, G: torch.randn(n, G, generator=g) * scale}


def slot_of(clip, text, placeholder="holder"):
    ids = [t[0] for t in clip.tokenize(text)["l"][0]]
    return ids.index(clip.tokenizer.clip_l.tokenizer(placeholder)["input_ids"][1])


def test_text_concept_equals_the_hosts_encoding_of_the_words_with_pooled(lib, clip):
    concept = lib["concept"].LikenessConcept(text="a red apple")
    fused, conc, context = lib["inject"].encode_likeness_prompt(clip, "a photo of holder, on a table", concept,
                                                                 "holder", "fruit", 1.0)
    want, want_pooled = host_encode(clip, "a photo of a red apple, on a table")
    assert conc[0][0].shape == (1, 77, m.SDXL_CONTEXT)
    assert torch.allclose(conc[0][0], want, atol=1e-6)
    assert torch.allclose(conc[0][1]["pooled_output"], want_pooled, atol=1e-6)
    ctx, ctx_pooled = host_encode(clip, "a photo of fruit, on a table")
    assert torch.allclose(context[0][0], ctx, atol=1e-6) and torch.allclose(context[0][1]["pooled_output"], ctx_pooled)


@pytest.mark.parametrize("space", ["token", "hidden"])
def test_vectors_reach_both_encoders_as_an_independent_computation(lib, clip, space):
    """The injected prompt equals the text models run directly on input embeddings with the vectors written at the
    placeholder's slot, for clip_l and clip_g, and the pooled output is clip_g's at the end token."""
    vec = vectors(2, 1)
    concept = lib["concept"].LikenessConcept(vectors=vec, space=space)
    _, conc, _ = lib["inject"].encode_likeness_prompt(clip, "a photo of holder, smiling", concept, "holder", "x", 1.0)
    want, want_pooled = sdxl_encode_with_slot(clip, "a photo of", ", smiling", vec, space)
    assert torch.allclose(conc[0][0], want, atol=1e-5), (conc[0][0] - want).abs().max()
    assert torch.allclose(conc[0][1]["pooled_output"], want_pooled, atol=1e-5)
    # without the concept: the plain words through the same reference equal the host's own encoding
    plain, plain_pooled = sdxl_encode_with_slot(clip, "a photo of", ", smiling")
    host, host_pooled = host_encode(clip, "a photo of, smiling")
    assert torch.allclose(plain, host, atol=1e-5) and torch.allclose(plain_pooled, host_pooled, atol=1e-5)
    assert not torch.allclose(conc[0][1]["pooled_output"], host_pooled, atol=1e-3)  # the pooled output follows


def test_gamma_scales_exactly_the_concept_rows_of_both_halves(lib, clip):
    concept = lib["concept"].LikenessConcept(vectors=vectors(3, 2))
    text = "a photo of holder at the beach"
    fused, conc, _ = lib["inject"].encode_likeness_prompt(clip, text, concept, "holder", "person", 0.6)
    f, c = fused[0][0], conc[0][0]
    slot = slot_of(clip, text)
    assert torch.allclose(f[:, slot:slot + 3], 0.6 * c[:, slot:slot + 3])   # clip_l and clip_g columns alike
    others = torch.ones(77, dtype=torch.bool)
    others[slot:slot + 3] = False
    assert torch.equal(f[:, others], c[:, others])
    assert torch.equal(fused[0][1]["pooled_output"], conc[0][1]["pooled_output"])   # gamma acts on rows only
    same, _, _ = lib["inject"].encode_likeness_prompt(clip, text, concept, "holder", "person", 1.0)
    assert torch.equal(same[0][0], c)                                               # gamma 1: the concept itself


def test_placeholder_is_found_by_token_ids_in_both_tokenizers(lib, clip):
    """'holder,' and a second chunk: both encoders see the concept at the same rows."""
    concept = lib["concept"].LikenessConcept(vectors=vectors(2, 3))
    text = " ".join(["tree"] * 80) + " holder, waving"
    fused, conc, _ = lib["inject"].encode_likeness_prompt(clip, text, concept, "holder", "person", 0.5)
    f, c = fused[0][0], conc[0][0]
    assert f.shape[1] == 154
    for part in (slice(0, L), slice(L, L + G)):
        diff = (f[..., part] != c[..., part]).any(-1)[0].nonzero().flatten().tolist()
        assert len(diff) == 2 and all(77 <= d < 154 for d in diff)


def test_sdxl_embedding_file_acts_like_the_words(lib, clip, tmp_path):
    """A clip_l / clip_g textual-inversion file holding the token embeddings of 'red apple' in both tables."""
    ids = clip.tokenizer.clip_l.tokenizer("red apple")["input_ids"][1:-1]
    tables = {k: getattr(clip.cond_stage_model, f"clip_{k}").transformer.get_input_embeddings().weight.detach()
              for k in ("l", "g")}
    path = tmp_path / "red_apple_sdxl.safetensors"
    save_file({"clip_l": tables["l"][ids].clone().contiguous(), "clip_g": tables["g"][ids].clone().contiguous()},
              str(path))
    concept = lib["files"].load_embedding_concept(str(path))
    assert sorted(concept.vectors) == [L, G] and concept.num_vectors == 2
    _, conc, _ = lib["inject"].encode_likeness_prompt(clip, "a photo of holder on a table", concept, "holder", "x", 1.0)
    want, want_pooled = host_encode(clip, "a photo of red apple on a table")
    assert torch.allclose(conc[0][0], want, atol=1e-5)
    assert torch.allclose(conc[0][1]["pooled_output"], want_pooled, atol=1e-5)


def test_a_concept_for_one_encoder_only_is_refused(lib, clip, tmp_path):
    concept = lib["concept"].LikenessConcept(vectors={L: torch.zeros(1, L)}, source="sd15_style")
    with pytest.raises(ValueError, match=rf"width {L}, but this CLIP's g text encoder is {G} wide"):
        lib["inject"].encode_likeness_prompt(clip, "a photo of holder", concept, "holder", "person", 1.0)
    with pytest.raises(ValueError, match="same number of vectors for every text encoder"):
        lib["concept"].LikenessConcept(vectors={L: torch.zeros(1, L), G: torch.zeros(2, G)})


def test_dynamic_prompt_re_encodes_context_and_pooled(lib, clip):
    """What the Fusion Guider calls per evaluation equals the static encoding with the same vectors, per batch row,
    from a dict by width or one concatenated tensor (ascending widths)."""
    from comfyui_likeness.concepts.prompt_injection import DYNAMIC_KEY, encoder_widths

    assert encoder_widths(clip) == [L, G]

    class Follows:
        def models(self):
            return []

    start = vectors(1, 4)
    concept = lib["concept"].LikenessConcept(vectors=start, space="hidden", dynamic=Follows())
    fused, conc, _ = lib["inject"].encode_likeness_prompt(clip, "a holder is smiling", concept, "holder", "person", 0.7)
    rows = [vectors(1, 5), vectors(1, 6)]
    batch = {w: torch.stack([r[w] for r in rows]) for w in (L, G)}
    for cond in (fused, conc):
        dynamic = cond[0][1][DYNAMIC_KEY]
        got, pooled = dynamic.encode_with_pooled(batch)
        joined, _ = dynamic.encode_with_pooled(torch.cat([batch[L], batch[G]], -1))
        assert torch.equal(got, joined) and got.shape == (2, 77, m.SDXL_CONTEXT) and pooled.shape == (2, G)
        for i, row in enumerate(rows):
            static = lib["concept"].LikenessConcept(vectors=row, space="hidden")
            want_f, want_c, _ = lib["inject"].encode_likeness_prompt(clip, "a holder is smiling", static, "holder",
                                                                     "person", dynamic.gamma)
            assert torch.allclose(got[i:i + 1], want_f[0][0], atol=1e-6)
            assert torch.allclose(pooled[i:i + 1], want_c[0][1]["pooled_output"], atol=1e-6)
    with pytest.raises(ValueError, match=r"width\(s\) \[96\] are missing"):
        conc[0][1][DYNAMIC_KEY].encode_with_pooled({L: batch[L]})


def test_trainable_prompt_on_sdxl_gives_gradients_to_both_encoders(lib, clip):
    from comfyui_likeness.train.diffusion import gradients_on
    from comfyui_likeness.train.prompt import TrainablePrompt

    prompt = TrainablePrompt(clip, "a photo of holder", "holder", None, 1, "hidden")
    assert prompt.widths == [L, G] and prompt.width == L + G
    v = torch.randn(2, 1, L + G, generator=torch.Generator().manual_seed(7)) * 0.05
    with torch.no_grad():
        want, want_pooled = prompt.dynamic.encode_with_pooled(v)
    with gradients_on():
        leaf = v.clone().requires_grad_(True)
        got, pooled = prompt.encode_with_pooled(leaf)
        (got.square().mean() + pooled.square().mean()).backward()
    assert torch.allclose(got.detach(), want, atol=1e-5) and torch.allclose(pooled.detach(), want_pooled, atol=1e-5)
    assert float(leaf.grad[..., :L].abs().sum()) > 0 and float(leaf.grad[..., L:].abs().sum()) > 0
    with pytest.raises(ValueError, match=r"\[64, 96\] wide"):
        TrainablePrompt(clip, "a photo of holder", "holder", L, 1, "hidden")
