"""LIKENESS_CONCEPT: what a concept source hands to the Likeness Prompt node.

A concept is either plain text (its tokens replace the placeholder) or vectors, keyed by the width of the text
encoder they belong to (768 for CLIP-L / SD1.x, 1024 for OpenCLIP-H / SD2.x, 1280 for CLIP-G / SDXL), so one
concept can serve SDXL's two encoders: an SDXL concept holds a 768-wide set for clip_l and a 1280-wide set for
clip_g, with the same number of vectors in each (docs/architecture.md, "The concept type"). `space` says where
vectors enter the text encoder:
  "token"  - the token-embedding table, before position embeddings (textual inversion, PhotoVerse/ELITE words);
  "hidden" - the whole input embedding of the slot, position embedding included (ProFusion's S*, which the
             paper's code writes over the embedded prompt); injected as S* - pos_emb because the host adds
             position embeddings after injection (docs/methods/fusion-sampling.md).
`source` records where it came from (a file name, an adapter hash) so later stages can check compatibility.
`dynamic`, when set, recomputes the vectors from the current latent at every model evaluation (ProFusion's
PromptNet: S* follows x_t); `vectors` then hold a static approximation for samplers that cannot follow it.
A dynamic source is called as dynamic(x, sigma, model_patcher, size) and returns a list of (vectors by width,
weight) pairs, one per reference photo it mixes (docs/methods/promptnet.md, "Several reference photos").
"""
from dataclasses import dataclass, field

import torch

TOKEN_SPACE, HIDDEN_SPACE = "token", "hidden"


@dataclass
class LikenessConcept:
    text: str | None = None
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)
    space: str = TOKEN_SPACE
    source: str = ""
    metadata: dict = field(default_factory=dict)
    dynamic: object | None = None

    def __post_init__(self):
        if self.space not in (TOKEN_SPACE, HIDDEN_SPACE):
            raise ValueError(f"concept space must be '{TOKEN_SPACE}' or '{HIDDEN_SPACE}', not '{self.space}'")
        if (self.text is None) == (not self.vectors):
            raise ValueError("a concept holds either text or vectors, exactly one of the two")
        if self.text is not None and not self.text.strip():
            raise ValueError("the concept text is empty")
        for width, v in self.vectors.items():
            if v.ndim != 2 or v.shape[-1] != width or v.shape[0] < 1:
                raise ValueError(f"concept vectors for width {width} must have shape (n, {width}); got {tuple(v.shape)}")
        counts = {int(v.shape[0]) for v in self.vectors.values()}
        if len(counts) > 1:
            raise ValueError(f"a concept needs the same number of vectors for every text encoder; got "
                             f"{ {w: int(v.shape[0]) for w, v in self.vectors.items()} }")

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0] if self.vectors else 0

    def vectors_for(self, width: int, encoder: str) -> torch.Tensor:
        if width not in self.vectors:
            have = ", ".join(str(w) for w in sorted(self.vectors)) or "none"
            raise ValueError(
                f"the concept '{self.source or 'unnamed'}' has vectors of width {have}, but this CLIP's {encoder} text "
                f"encoder is {width} wide ({_family(width)}): use a concept made for this model family")
        return self.vectors[width]


def by_width(vectors, widths) -> dict:
    """Vectors for each text-encoder width: a dict {width: (..., width)} as it is, or one tensor (..., sum(widths))
    cut in the order of `widths` (how PromptNet's head and the trainers lay out SDXL's clip_l + clip_g vectors)."""
    widths = [int(w) for w in widths]
    if isinstance(vectors, dict):
        missing = [w for w in widths if w not in vectors]
        if missing:
            raise ValueError(f"vectors for width(s) {missing} are missing (have {sorted(vectors)})")
        return vectors
    if vectors.shape[-1] != sum(widths):
        raise ValueError(f"vectors {vectors.shape[-1]} wide cannot be split into the text encoders' widths {widths}")
    return dict(zip(widths, vectors.split(widths, dim=-1)))


def _family(width: int) -> str:
    return {768: "SD1.x / CLIP-L", 1024: "SD2.x / OpenCLIP-H", 1280: "SDXL / CLIP-G"}.get(width, "unknown family")
