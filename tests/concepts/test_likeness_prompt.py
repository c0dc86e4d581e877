"""Likeness Prompt: the concept lands at the placeholder found by token ids, gamma scales exactly its rows,
chunk limits hold, and bad inputs get clear errors."""
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

import micro as m


@pytest.fixture(scope="module")
def lib(pack):
    from comfyui_likeness.concepts import concept, embedding_files, prompt_injection
    return {"concept": concept, "files": embedding_files, "inject": prompt_injection}


@pytest.fixture(scope="module")
def clip():
    return m.micro_clip()


def tensor(cond):
    assert len(cond) == 1
    return cond[0][0]


def token_rows(clip, text):
    """Rows of the tokenized prompt (BOS at 0) for the single chunk."""
    return [t[0] for t in clip.tokenize(text)["l"][0]]


def encode_text(clip, text):
    import nodes
    return tensor(nodes.CLIPTextEncode().encode(clip, text)[0])


def test_text_concept_equals_writing_the_words(lib, clip):
    concept = lib["concept"].LikenessConcept(text="a red apple")
    fused, conc, context = lib["inject"].encode_likeness_prompt(
        clip, "a photo of holder, on a table", concept, "holder", "fruit", 1.0)
    assert torch.allclose(tensor(conc), encode_text(clip, "a photo of a red apple, on a table"), atol=1e-6)
    assert torch.allclose(tensor(context), encode_text(clip, "a photo of fruit, on a table"), atol=1e-6)
    assert torch.equal(tensor(fused), tensor(conc))


def test_placeholder_with_punctuation_and_only_later_positions_change(lib, clip):
    vec = torch.randn(1, m.CONTEXT, generator=torch.Generator().manual_seed(0))
    concept = lib["concept"].LikenessConcept(vectors={m.CONTEXT: vec})
    _, conc, context = lib["inject"].encode_likeness_prompt(clip, "portrait of holder, smiling", concept, "holder", "person", 1.0)
    rows = token_rows(clip, "portrait of holder, smiling")
    slot = rows.index(clip.tokenizer.clip_l.tokenizer("holder")["input_ids"][1])
    a, b = tensor(conc), tensor(context)
    assert torch.allclose(a[:, :slot], b[:, :slot], atol=1e-6)  # causal text model: earlier rows untouched
    assert not torch.allclose(a[:, slot], b[:, slot], atol=1e-3)


def test_embedding_vectors_equal_the_token_embeddings_they_copy(lib, clip, tmp_path):
    """A file holding the token embeddings of 'red apple' must act exactly like the words (token space)."""
    ids = clip.tokenizer.clip_l.tokenizer("red apple")["input_ids"][1:-1]
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.detach()
    path = tmp_path / "red_apple.safetensors"
    save_file({"emb_params": table[ids].clone().contiguous()}, str(path))
    concept = lib["files"].load_embedding_concept(str(path))
    assert concept.num_vectors == 2
    _, conc, _ = lib["inject"].encode_likeness_prompt(clip, "a photo of holder on a table", concept, "holder", "x", 1.0)
    assert torch.allclose(tensor(conc), encode_text(clip, "a photo of red apple on a table"), atol=1e-5)


def test_gamma_scales_exactly_the_concept_rows(lib, clip):
    vec = torch.randn(3, m.CONTEXT, generator=torch.Generator().manual_seed(1))
    concept = lib["concept"].LikenessConcept(vectors={m.CONTEXT: vec})
    fused, conc, _ = lib["inject"].encode_likeness_prompt(clip, "a photo of holder at the beach", concept, "holder", "person", 0.6)
    f, c = tensor(fused), tensor(conc)
    assert f.shape == c.shape == (1, 77, m.CONTEXT)
    slot = 4  # BOS, a, photo, of
    assert torch.allclose(f[:, slot:slot + 3], 0.6 * c[:, slot:slot + 3])
    others = torch.ones(77, dtype=torch.bool)
    others[slot:slot + 3] = False
    assert torch.equal(f[:, others], c[:, others])


def test_several_vectors_shift_later_tokens_and_keep_77(lib, clip):
    vec = torch.randn(4, m.CONTEXT, generator=torch.Generator().manual_seed(2))
    concept = lib["concept"].LikenessConcept(vectors={m.CONTEXT: vec})
    _, conc, _ = lib["inject"].encode_likeness_prompt(clip, "holder smiling", concept, "holder", "person", 1.0)
    assert tensor(conc).shape[1] == 77


def test_second_chunk_placeholder_and_long_prompts(lib, clip):
    words = " ".join(["tree"] * 80)
    text = f"{words} holder waving"
    vec = torch.randn(2, m.CONTEXT, generator=torch.Generator().manual_seed(3))
    concept = lib["concept"].LikenessConcept(vectors={m.CONTEXT: vec})
    fused, conc, _ = lib["inject"].encode_likeness_prompt(clip, text, concept, "holder", "person", 0.5)
    f, c = tensor(fused), tensor(conc)
    assert f.shape[1] == c.shape[1] == 154
    diff = (f != c).any(-1)[0].nonzero().flatten().tolist()
    assert diff and all(77 <= d < 154 for d in diff) and len(diff) == 2


def test_full_chunk_is_truncated_with_a_warning(lib, clip, caplog):
    text = "holder " + " ".join(["tree"] * 74)  # 75 tokens: the chunk is full
    vec = torch.randn(3, m.CONTEXT, generator=torch.Generator().manual_seed(4))
    concept = lib["concept"].LikenessConcept(vectors={m.CONTEXT: vec})
    with caplog.at_level(logging.WARNING, logger="likeness"):
        _, conc, _ = lib["inject"].encode_likeness_prompt(clip, text, concept, "holder", "person", 1.0)
    assert tensor(conc).shape[1] == 77
    assert "dropped" in caplog.text


def test_hidden_space_concept_subtracts_the_position_embedding(lib, clip):
    """ProFusion's S* has no position embedding: injecting S* in hidden space equals injecting
    S* - pos[slot] in token space."""
    s_star = torch.randn(1, m.CONTEXT, generator=torch.Generator().manual_seed(5))
    pos = clip.cond_stage_model.clip_l.transformer.text_model.embeddings.position_embedding.weight.detach().float()
    hidden = lib["concept"].LikenessConcept(vectors={m.CONTEXT: s_star}, space="hidden")
    token = lib["concept"].LikenessConcept(vectors={m.CONTEXT: s_star - pos[4:5]})
    _, a, _ = lib["inject"].encode_likeness_prompt(clip, "a photo of holder", hidden, "holder", "person", 1.0)
    _, b, _ = lib["inject"].encode_likeness_prompt(clip, "a photo of holder", token, "holder", "person", 1.0)
    assert torch.allclose(tensor(a), tensor(b), atol=1e-6)


def test_placeholder_missing_is_a_clear_error(lib, clip):
    concept = lib["concept"].LikenessConcept(text="a cat")
    with pytest.raises(ValueError, match="placeholder 'holder' does not appear"):
        lib["inject"].encode_likeness_prompt(clip, "a photo of a dog", concept, "holder", "person", 1.0)
    with pytest.raises(ValueError, match="placeholder is empty"):
        lib["inject"].encode_likeness_prompt(clip, "a photo of a dog", concept, " ", "person", 1.0)
    with pytest.raises(ValueError, match="gamma"):
        lib["inject"].encode_likeness_prompt(clip, "a photo of holder", concept, "holder", "person", 3.0)


def test_embedding_of_the_wrong_width_is_a_clear_error(lib, clip, tmp_path):
    path = tmp_path / "sd2_style.safetensors"
    save_file({"emb_params": torch.randn(2, 1024)}, str(path))
    concept = lib["files"].load_embedding_concept(str(path))
    with pytest.raises(ValueError, match=r"width 1024.*64 wide"):
        lib["inject"].encode_likeness_prompt(clip, "a photo of holder", concept, "holder", "person", 1.0)
    uneven = tmp_path / "uneven.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(3, 1280)}, str(uneven))
    with pytest.raises(ValueError, match="different number of vectors"):
        lib["files"].load_embedding_concept(str(uneven))
    empty = tmp_path / "empty.safetensors"
    save_file({"step": torch.tensor(3)}, str(empty))
    with pytest.raises(ValueError, match="no embedding vectors"):
        lib["files"].load_embedding_concept(str(empty))


def test_foreign_or_truncated_embedding_files(lib, tmp_path):
    pt = tmp_path / "x.pt"
    pt.write_bytes(b"\x80\x04not a pickle we would ever load")
    with pytest.raises(ValueError, match="never loads pickled"):
        lib["files"].load_embedding_concept(str(pt))
    good = tmp_path / "t.safetensors"
    save_file({"emb_params": torch.randn(2, 768)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        lib["files"].load_embedding_concept(str(cut))


def test_nodes_in_the_host_with_an_embedding_file(host, base_dir, checkpoint):
    """Through the real executor: embedding concept from models/embeddings into a Likeness Prompt."""
    save_file({"emb_params": torch.randn(2, 768, generator=torch.Generator().manual_seed(0))},
              os.path.join(base_dir, "models", "embeddings", "likeness_test_concept.safetensors"))
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "LikenessConceptEmbedding", "inputs": {"embedding": "likeness_test_concept.safetensors"}},
        "3": {"class_type": "LikenessPrompt", "inputs": {"clip": ["1", 1], "concept": ["2", 0], "text": "holder at sea",
                                                        "placeholder": "holder", "class_word": "man", "gamma": 0.5}},
        "4": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 2]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "LikenessKSamplerFusion", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 2, "sampler_name": "euler", "scheduler": "normal",
            "negative": ["4", 0], "fused": ["3", 0], "concept": ["3", 1], "context": ["3", 2], "latent_image": ["5", 0],
            "denoise": 1.0, "w_fusion": 5.0, "w_concept": 5.0, "w_context": 2.0, "fusion_steps": 1, "eta": 1.0,
            "refine": True, "start_percent": 0.0, "end_percent": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    ok, outputs, messages = host.run(prompt)
    assert ok, messages[-1:]
    prompt["3"]["inputs"]["text"] = "a boat at sea"
    ok, _, messages = host.run(prompt)
    assert not ok
    assert "placeholder 'holder' does not appear" in str(messages)
