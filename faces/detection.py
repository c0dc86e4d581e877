"""What every detector backend returns, and how one face is chosen among several."""
import threading
from dataclasses import dataclass, field

import numpy as np

# insightface's five landmarks, in its order: eye on the image's left, eye on the image's right, nose tip,
# mouth corner on the left, mouth corner on the right ([AF] face_align.py template order).
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

ORDERS = ("largest", "left_to_right", "confidence")


@dataclass(frozen=True)
class Detection:
    box: tuple            # (x1, y1, x2, y2) in source pixels
    score: float
    kps: np.ndarray | None = field(default=None, compare=False)   # (5, 2) in source pixels, LANDMARK_NAMES order

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple:
        return (float(self.box[0] + self.box[2]) / 2, float(self.box[1] + self.box[3]) / 2)

    def scaled(self, factor: float) -> "Detection":
        """The same detection in an image resized by `factor` (used when a detector ran on a resized copy)."""
        kps = None if self.kps is None else np.asarray(self.kps, dtype=np.float32) * factor
        return Detection(tuple(float(v) * factor for v in self.box), self.score, kps)


def order_detections(detections, order: str) -> list:
    """Sort detections: 'largest' box first, 'left_to_right' by box centre, or highest 'confidence' first."""
    if order == "largest":
        key = lambda d: -d.area  # noqa: E731
    elif order == "left_to_right":
        key = lambda d: d.center[0]  # noqa: E731
    elif order == "confidence":
        key = lambda d: -d.score  # noqa: E731
    else:
        raise ValueError(f"order: '{order}' is not one of {', '.join(ORDERS)}")
    return sorted(detections, key=key)


def pick_detection(detections, order: str, index: int):
    """The index-th face in the given order, or None when there are not that many faces."""
    if index < 0:
        raise ValueError(f"index: must be 0 or more, got {index}")
    ordered = order_detections(detections, order)
    return ordered[index] if index < len(ordered) else None


class FaceAnalysis:
    """A loaded face backend (the LIKENESS_FACE_ANALYSIS type). Subclasses implement detect().

    detect() takes one RGB uint8 image (H, W, 3) and returns a list of Detection in source pixels.
    Backends that also compute identity embeddings set can_embed and implement embed()."""

    backend = "base"
    can_embed = False
    gives_landmarks = False

    def __init__(self):
        self._lock = threading.Lock()   # the native sessions are not re-entrant

    @property
    def name(self) -> str:
        return self.backend

    def detect(self, rgb: np.ndarray) -> list:
        raise NotImplementedError

    def embed(self, rgb: np.ndarray, detection: Detection) -> np.ndarray:
        raise NotImplementedError(f"the {self.name} face backend has no recognition model; load an insightface pack "
                                  "(antelopev2 or buffalo_l) with the Face Analysis loader for identity embeddings")

    def __repr__(self):
        return f"<FaceAnalysis {self.name}>"
