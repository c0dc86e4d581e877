"""Put a concept into a prompt at a placeholder, located by token ids, and encode the three conditionings of
Fusion Sampling (docs/methods/fusion-sampling.md):

  fused    the prompt with the concept, its output rows scaled by gamma   (ProFusion's c_gamma, "a holder C")
  concept  the prompt with the concept, gamma = 1                         ("a holder C")
  context  the prompt with the class word in place of the placeholder     ("a person C")

The host's tokenizer gives per-chunk lists of (token, weight, word_id); non-integer entries are embeddings that
the text model inserts before adding position embeddings, and an entry of n vectors lengthens its chunk by n-1
(sd1_clip.process_tokens). So after replacing the placeholder, each chunk is brought back to its length by
dropping trailing padding, or - when the prompt fills the chunk - the last words before the end token.
Whitespace-based trigger handling (as in core PhotoMaker) breaks on punctuation and multi-token words; matching
token ids does not.
"""
import logging

import torch

from .concept import HIDDEN_SPACE, LikenessConcept, by_width

log = logging.getLogger("likeness")


class _Encoder:
    """One text encoder of a CLIP object (SD1: 'l'; SD2: 'h'; SDXL: 'g' and 'l')."""

    def __init__(self, clip, key):
        self.key = key
        self.tokenizer = getattr(clip.tokenizer, f"clip_{key}", None)
        if self.tokenizer is None or not hasattr(self.tokenizer, "tokenizer"):
            raise ValueError(f"Likeness Prompt supports CLIP text encoders (SD1.x, SD2.x, SDXL); this CLIP's "
                             f"'{key}' tokenizer ({type(clip.tokenizer).__name__}) is not one")
        self.end = self.tokenizer.end_token
        self.pad = self.tokenizer.pad_token
        self.model = getattr(clip.cond_stage_model, f"clip_{key}", None)
        if self.model is None:
            raise ValueError(f"Likeness Prompt found no '{key}' text encoder in this CLIP")
        # The width of the token-embedding table, read from the encoder itself (the tokenizer's own
        # embedding_size is only a default).
        self.width = int(self.model.transformer.get_input_embeddings().weight.shape[-1])

    def ids(self, text: str) -> list[int]:
        ids = self.tokenizer.tokenizer(text)["input_ids"]
        start = self.tokenizer.tokens_start
        return list(ids[start:-1] if self.end is not None else ids[start:])

    def position_embedding(self) -> torch.Tensor:
        return self.model.transformer.text_model.embeddings.position_embedding.weight.detach().float().cpu()


def _find(chunk, pattern):
    """Start indices of the token-id sequence `pattern` in a chunk (integer entries only)."""
    ids = [e[0] if isinstance(e[0], int) else None for e in chunk]
    n = len(pattern)
    hits, i = [], 0
    while i + n <= len(ids):
        if ids[i:i + n] == pattern:
            hits.append(i)
            i += n
        else:
            i += 1
    return hits


def _refit(chunk, length, enc: _Encoder, counts_of):
    """Bring a chunk back to `length` token slots (an embedding entry of n vectors counts n)."""
    size = sum(counts_of(e) for e in chunk)
    if size < length:
        return chunk + [(enc.pad, 1.0, 0)] * (length - size)
    excess = size - length
    if excess == 0:
        return chunk
    first_eos = next((i for i, e in enumerate(chunk) if isinstance(e[0], int) and e[0] == enc.end), len(chunk))
    out = list(chunk)
    # Drop padding after the first end token.
    while excess and len(out) - 1 > first_eos and isinstance(out[-1][0], int) and out[-1][0] in (enc.pad, enc.end):
        out.pop()
        excess -= 1
    if excess:
        # The prompt fills the chunk: drop the last words before the end token (ELITE truncates to 77 too).
        eos = next(i for i, e in enumerate(out) if isinstance(e[0], int) and e[0] == enc.end)
        cut = out[eos - excess:eos]
        if any(not isinstance(e[0], int) for e in cut):
            raise ValueError("the prompt is too long for the concept to fit in its 77-token chunk; shorten the prompt")
        log.warning("Likeness Prompt: the prompt was too long with the concept inserted; %d trailing token(s) "
                    "of its 77-token chunk were dropped", excess)
        out = out[:eos - excess] + out[eos:]
    return out


def _substitute(tokens, encoders, placeholder, make_entries, what):
    """Replace every placeholder occurrence; returns new tokens and the concept slots (chunk, start, count)."""
    out, slots = {}, None
    for enc in encoders:
        pattern = enc.ids(placeholder)
        if not pattern:
            raise ValueError(f"the placeholder '{placeholder}' has no tokens; choose a word such as 'holder'")
        new_chunks, key_slots = [], []
        for c, chunk in enumerate(tokens[enc.key]):
            hits = _find(chunk, pattern)
            if not hits:
                new_chunks.append(chunk)
                continue
            length = len(chunk)
            rebuilt, pos, last = [], 0, 0
            for h in hits:
                rebuilt += chunk[last:h]
                pos = sum(_count(e) for e in rebuilt)
                entries = make_entries(enc, pos, chunk[h][1])
                key_slots.append((c, pos, sum(_count(e) for e in entries)))
                rebuilt += entries
                last = h + len(pattern)
            rebuilt += chunk[last:]
            new_chunks.append(_refit(rebuilt, length, enc, _count))
        if not key_slots:
            raise ValueError(f"the placeholder '{placeholder}' does not appear in the prompt; write it where the "
                             f"{what} should go, e.g. 'a photo of {placeholder} on the beach'")
        if slots is not None and slots != key_slots:
            raise ValueError("the concept lands on different positions in this CLIP's two text encoders")
        slots = key_slots
        out[enc.key] = new_chunks
    for k in tokens:
        out.setdefault(k, tokens[k])
    return out, slots


def _count(entry):
    v = entry[0]
    if isinstance(v, int):
        return 1
    data = v["data"] if isinstance(v, dict) else v
    return data.reshape(-1, data.shape[-1]).shape[0]


def _concept_entries(concept: LikenessConcept, record=None):
    def make(enc: _Encoder, pos: int, weight: float):
        if concept.text is not None:
            return [(i, weight, 0) for i in enc.ids(concept.text)]
        vec = concept.vectors_for(enc.width, enc.key).float().cpu()
        if concept.space == HIDDEN_SPACE:
            pe = enc.position_embedding()
            if pos + vec.shape[0] > pe.shape[0]:
                raise ValueError("the concept falls past the text encoder's last position; move the placeholder earlier")
            vec = vec - pe[pos:pos + vec.shape[0]]
        entry = {"type": "embedding", "data": vec}
        if record is not None:
            record.append((enc, entry, pos))
        return [(entry, weight, 0)]
    return make


def _word_entries(word: str):
    def make(enc: _Encoder, pos: int, weight: float):
        return [(i, weight, 0) for i in enc.ids(word)] if word.strip() else []
    return make


def _encode(clip, tokens):
    return clip.encode_from_tokens_scheduled(tokens)


def _scale_rows(conditioning, slots, gamma, chunk_len):
    out = []
    for cond, extra in conditioning:
        cond = cond.clone()
        for c, start, count in slots:
            row = c * chunk_len + start
            cond[:, row:row + count] *= gamma
        out.append([cond, dict(extra)])
    return out


class DynamicPrompt:
    """Re-encodes the prompt with new concept vectors (one set per batch row) inside the sampling loop.

    Kept in the conditioning under DYNAMIC_KEY; the Fusion Guider calls it at every model evaluation. Vectors
    come by text-encoder width ({768: (B, n, 768), 1280: (B, n, 1280)} for SDXL), or as one tensor
    (B, n, sum of widths) laid out in ascending width order (concept.by_width).
    """

    def __init__(self, clip, tokens, entries, slots, gamma, chunk_len, concept: LikenessConcept):
        self.clip, self.tokens, self.entries, self.slots = clip, tokens, entries, slots
        self.gamma, self.chunk_len, self.concept = gamma, chunk_len, concept
        self.widths = sorted({enc.width for enc, _, _ in entries})

    def models(self):
        return [self.clip.patcher] + list(getattr(self.concept.dynamic, "models", lambda: [])())

    def encode(self, vectors) -> torch.Tensor:
        """vectors -> conditioning tensor (B, tokens, context width)."""
        return self.encode_with_pooled(vectors)[0]

    def encode_with_pooled(self, vectors):
        """vectors -> (conditioning (B, tokens, context width), pooled output (B, width) or None). SDXL's UNet
        conditions on the pooled clip_g output too, and it changes with the concept (the end token attends to it)."""
        vectors = by_width(vectors, self.widths)
        batch = {int(v.shape[0]) for v in vectors.values()}
        if len(batch) != 1:
            raise ValueError(f"the concept vectors have different batch sizes per text encoder: {sorted(batch)}")
        rows, pooled_rows = [], []
        for b in range(batch.pop()):
            for enc, entry, pos in self.entries:
                vec = vectors[enc.width][b].float().cpu()
                if self.concept.space == HIDDEN_SPACE:
                    vec = vec - enc.position_embedding()[pos:pos + vec.shape[0]]
                entry["data"] = vec
            cond, pooled = self.clip.encode_from_tokens(self.tokens, return_pooled=True)
            if self.gamma != 1.0:
                cond = _scale_rows([[cond, {}]], self.slots, self.gamma, self.chunk_len)[0][0]
            rows.append(cond)
            pooled_rows.append(pooled)
        pooled = None if any(p is None for p in pooled_rows) else torch.cat(pooled_rows)
        return torch.cat(rows), pooled

    def __deepcopy__(self, memo):
        return self  # holds models; conditionings are copied often


def encoder_widths(clip) -> list[int]:
    """The widths of a CLIP's text encoders, ascending (SD1.x [768], SD2.x [1024], SDXL [768, 1280])."""
    if clip is None:
        raise ValueError("the clip input is missing: connect the CLIP output of your checkpoint loader")
    return sorted({_Encoder(clip, k).width for k in clip.tokenize("a")})


DYNAMIC_KEY = "likeness_dynamic_concept"


def encode_likeness_prompt(clip, text: str, concept: LikenessConcept, placeholder: str, class_word: str,
                           gamma: float):
    """Returns (fused, concept, context) CONDITIONING lists."""
    if clip is None:
        raise ValueError("the clip input is missing: connect the CLIP output of your checkpoint loader")
    if not isinstance(concept, LikenessConcept):
        raise ValueError("the concept input must be a LIKENESS_CONCEPT (from a Likeness concept node)")
    if not placeholder.strip():
        raise ValueError("the placeholder is empty; use a word such as 'holder' and write it in the prompt")
    if not 0.0 <= gamma <= 2.0:
        raise ValueError(f"gamma must be between 0 and 2 (got {gamma})")
    tokens = clip.tokenize(text)
    encoders = [_Encoder(clip, k) for k in tokens]
    chunk_len = len(next(iter(tokens.values()))[0])
    entries = []
    with_concept, slots = _substitute(tokens, encoders, placeholder.strip(), _concept_entries(concept, entries), "concept")
    with_class, _ = _substitute(tokens, encoders, placeholder.strip(), _word_entries(class_word), "concept")
    concept_cond = _encode(clip, with_concept)
    fused = concept_cond if gamma == 1.0 else _scale_rows(concept_cond, slots, gamma, chunk_len)
    context = _encode(clip, with_class)
    if concept.dynamic is not None:
        if concept.text is not None:
            raise ValueError("a dynamic concept must carry vectors")
        concept_cond = _attach(concept_cond, DynamicPrompt(clip, with_concept, entries, slots, 1.0, chunk_len, concept))
        fused = _attach(fused, DynamicPrompt(clip, with_concept, entries, slots, gamma, chunk_len, concept))
    return fused, concept_cond, context


def _attach(conditioning, dynamic):
    return [[t, {**d, DYNAMIC_KEY: dynamic}] for t, d in conditioning]
