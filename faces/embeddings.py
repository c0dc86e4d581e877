"""Identity embeddings through insightface's recognition model, and the likeness score built on them."""
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .detection import pick_detection
from .errors import NoFaceError
from .images import as_rgb, from_uint8, to_uint8

log = logging.getLogger("likeness.faces")

EMBED_NO_FACE = ("error", "skip")


@dataclass
class FaceEmbeds:
    """The LIKENESS_FACE_EMBEDS value: one L2-normalised embedding per face."""
    embeddings: torch.Tensor                 # (N, D) float32, unit length
    source_indices: list                     # input image of each row
    boxes: np.ndarray                        # (N, 4) source pixels
    kps: np.ndarray                          # (N, 5, 2) source pixels
    model: str                               # e.g. "buffalo_l/w600k_r50.onnx"
    scores: list = field(default_factory=list)

    def __len__(self):
        return self.embeddings.shape[0]

    def mean(self) -> torch.Tensor:
        """One identity from several photos: the normalised mean of the unit embeddings."""
        return F.normalize(self.embeddings.mean(0), dim=0)


def _require_embedder(analysis, node: str):
    if not getattr(analysis, "can_embed", False):
        raise ValueError(f"{node}: the face analysis '{analysis.name}' has no recognition model. Identity embeddings "
                         "need the insightface backend with a pack that contains an ArcFace model (buffalo_l: "
                         "w600k_r50.onnx, antelopev2: glintr100.onnx).")


def _model_name(analysis) -> str:
    f = getattr(analysis, "recognition_file", "")
    return f"{getattr(analysis, 'pack', analysis.name)}/{os.path.basename(f)}" if f else analysis.name


def embed_faces(analysis, images, order: str = "largest", index: int = 0, no_face: str = "error",
                progress=None, node: str = "Face Embed"):
    """(FaceEmbeds, aligned 112x112 crops (N, 112, 112, 3)) for one face per image of an IMAGE batch."""
    if no_face not in EMBED_NO_FACE:
        raise ValueError(f"no_face: '{no_face}' is not one of {', '.join(EMBED_NO_FACE)}")
    _require_embedder(analysis, node)
    rgb = as_rgb(images, "image")
    rows, aligned, idx, boxes, kps, scores = [], [], [], [], [], []
    for b in range(rgb.shape[0]):
        u8 = to_uint8(rgb[b])
        det = pick_detection(analysis.detect(u8), order, index)
        if det is None or det.kps is None:
            msg = f"{node}: no face found in image {b} of {rgb.shape[0]} by {analysis.name}"
            if no_face == "error":
                raise NoFaceError(msg + ". Set no_face to 'skip' to leave such images out, or lower det_thresh.")
            log.warning("Likeness %s -> skipped", msg)
        else:
            rows.append(torch.from_numpy(analysis.embed(u8, det)))
            aligned.append(from_uint8(analysis.aligned_crop(u8, det)))
            idx.append(b)
            boxes.append(det.box)
            kps.append(det.kps)
            scores.append(det.score)
        if progress:
            progress(b + 1, rgb.shape[0])
    if not rows:
        raise NoFaceError(f"{node}: no face in any of the {rgb.shape[0]} image(s)")
    embeds = FaceEmbeds(F.normalize(torch.stack(rows).float(), dim=-1), idx, np.asarray(boxes, np.float32),
                        np.asarray(kps, np.float32), _model_name(analysis), scores)
    return embeds, torch.stack(aligned)


@dataclass
class LikenessReport:
    scores: list            # cosine per image; 0.0 where no face was found
    found: list             # face found per image
    mean: float             # over all images (a lost face counts 0)
    mean_found: float       # over images with a face
    best_index: int
    model: str
    references: int

    @property
    def text(self) -> str:
        lines = [f"Likeness: ArcFace cosine similarity ({self.model}) to {self.references} reference face(s)"]
        for i, (s, ok) in enumerate(zip(self.scores, self.found)):
            lines.append(f"  image {i}: {s:.4f}" if ok else f"  image {i}: no face (scored 0)")
        n = sum(self.found)
        lines.append(f"mean {self.mean:.4f} over {len(self.scores)} image(s); {n} with a face, mean over those "
                     f"{self.mean_found:.4f}; best: image {self.best_index}")
        return "\n".join(lines)


def likeness_scores(analysis, reference, images, progress=None) -> LikenessReport:
    """Cosine similarity of the largest face of every image to the reference identity (the normalised mean of
    the reference batch's largest faces)."""
    _require_embedder(analysis, "Likeness Score")
    ref, _ = embed_faces(analysis, reference, no_face="skip" if as_rgb(reference, "reference").shape[0] > 1 else "error",
                         node="Likeness Score (reference)")
    target = ref.mean()
    rgb = as_rgb(images, "images")
    scores, found = [], []
    for b in range(rgb.shape[0]):
        u8 = to_uint8(rgb[b])
        det = pick_detection(analysis.detect(u8), "largest", 0)
        if det is None or det.kps is None:
            log.warning("Likeness Score: no face in generated image %d of %d; it scores 0", b, rgb.shape[0])
            scores.append(0.0)
            found.append(False)
        else:
            e = F.normalize(torch.from_numpy(analysis.embed(u8, det)).float(), dim=0)
            scores.append(float((e * target).sum()))
            found.append(True)
        if progress:
            progress(b + 1, rgb.shape[0])
    with_face = [s for s, ok in zip(scores, found) if ok]
    report = LikenessReport(scores, found, float(np.mean(scores)), float(np.mean(with_face)) if with_face else 0.0,
                            int(np.argmax(scores)), ref.model, len(ref))
    log.info("%s", report.text)
    return report
