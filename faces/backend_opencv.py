"""No-download detector: OpenCV's frontal-face Haar cascade, whose XML ships inside opencv-python (< 5).

Boxes only (no landmarks); the score is the cascade's level weight, not a probability. Measured against
mediapipe in bench/bench_faces.py; mediapipe is the better no-download backend, this one is the fallback that
needs nothing beyond OpenCV."""
import logging
import os

import numpy as np

from .detection import Detection, FaceAnalysis
from .errors import FaceBackendMissing

log = logging.getLogger("likeness.faces")

CASCADE = "haarcascade_frontalface_default.xml"
MIN_SIDE = 160   # the cascade's smallest window is 24 px: upscale small images so small faces still fit


def import_cv2():
    try:
        import cv2
    except Exception as e:  # ImportError, or a broken binary wheel
        raise FaceBackendMissing(
            "OpenCV is not installed in ComfyUI's Python (needed by the 'opencv' face backend). Install it with: "
            "python -m pip install \"opencv-python-headless<5\" (any one OpenCV 4 distribution works). "
            f"[{type(e).__name__}: {e}]") from e
    return cv2


def cascade_path(cv2) -> str:
    base = getattr(getattr(cv2, "data", None), "haarcascades", None)
    path = os.path.join(base, CASCADE) if base else None
    if not path or not os.path.exists(path) or not hasattr(cv2, "CascadeClassifier"):
        raise FaceBackendMissing(
            f"OpenCV {getattr(cv2, '__version__', '?')} has no Haar cascades (OpenCV 5 stopped shipping them). Install "
            "OpenCV 4: python -m pip install \"opencv-python-headless<5\", or use the 'mediapipe' or 'insightface' backend.")
    return path


class HaarFaceAnalysis(FaceAnalysis):
    backend = "opencv"

    def __init__(self, min_neighbors: int = 5):
        super().__init__()
        cv2 = import_cv2()
        self._cv2 = cv2
        self._cascade = cv2.CascadeClassifier(cascade_path(cv2))
        if self._cascade.empty():
            raise FaceBackendMissing(f"OpenCV could not read its cascade file {cascade_path(cv2)}")
        self.min_neighbors = min_neighbors

    @property
    def name(self) -> str:
        return "opencv (haar frontal face)"

    def detect(self, rgb: np.ndarray) -> list:
        cv2 = self._cv2
        h, w = rgb.shape[:2]
        scale = max(1.0, MIN_SIDE / min(h, w))
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        if scale > 1.0:
            gray = cv2.resize(gray, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_CUBIC)
        with self._lock:
            boxes, _, weights = self._cascade.detectMultiScale3(
                gray, scaleFactor=1.1, minNeighbors=self.min_neighbors, outputRejectLevels=True)
        out = []
        for (x, y, bw, bh), weight in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(weights).reshape(-1)):
            out.append(Detection((float(x), float(y), float(x + bw), float(y + bh)), float(weight)).scaled(1.0 / scale))
        return out
