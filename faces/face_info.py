"""FACE_INFO: what Face Crop found and did, per output image, so later steps can map points between the
source image and the crop (PhotoVerse's landmark-based ArcFace warp needs the landmarks in crop pixels)."""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class CropWindow:
    """A square window in source pixels; it may reach outside the image (then the border mode fills it)."""
    x0: int
    y0: int
    side: int

    def to_crop(self, points, size: int) -> np.ndarray:
        """Source-pixel points (..., 2) -> pixels of the crop resized to size x size."""
        return (np.asarray(points, dtype=np.float32) - np.float32([self.x0, self.y0])) * np.float32(size / self.side)

    def to_source(self, points, size: int) -> np.ndarray:
        return np.asarray(points, dtype=np.float32) * np.float32(self.side / size) + np.float32([self.x0, self.y0])


@dataclass
class FaceInfo:
    source_index: int               # index of the image in the input batch
    image_size: tuple               # (width, height) of the source image
    backend: str
    found: bool                     # False: no face (or not enough faces for the index); see `policy`
    policy: str = ""                # the no_face policy applied when found is False
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))  # every face, source pixels
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    box: np.ndarray | None = None   # the chosen face (x1, y1, x2, y2), source pixels
    score: float = 0.0
    kps: np.ndarray | None = None   # (5, 2) landmarks of the chosen face, source pixels
    window: CropWindow | None = None
    crop_size: int = 0

    @property
    def box_in_crop(self):
        if self.box is None or self.window is None:
            return None
        return self.window.to_crop(np.asarray(self.box, np.float32).reshape(2, 2), self.crop_size).reshape(4)

    @property
    def kps_in_crop(self):
        if self.kps is None or self.window is None:
            return None
        return self.window.to_crop(self.kps, self.crop_size)

    def to_dict(self) -> dict:
        """JSON-friendly summary."""
        def arr(a):
            return None if a is None else np.round(np.asarray(a, dtype=np.float64), 2).tolist()
        return {
            "source_index": self.source_index, "image_size": list(self.image_size), "backend": self.backend,
            "found": self.found, "policy": self.policy, "faces": len(self.boxes), "box": arr(self.box),
            "score": round(float(self.score), 4), "kps": arr(self.kps),
            "window": None if self.window is None else [self.window.x0, self.window.y0, self.window.side],
            "crop_size": self.crop_size, "kps_in_crop": arr(self.kps_in_crop),
        }


class FaceInfoList(list):
    """The LIKENESS_FACE_INFO value: one FaceInfo per output image, in output order."""

    def summary(self) -> str:
        parts = []
        for i, info in enumerate(self):
            if info.found:
                x1, y1, x2, y2 = (round(float(v)) for v in info.box)
                parts.append(f"{i}: face {x2 - x1}x{y2 - y1} at ({x1},{y1}) score {info.score:.2f} "
                             f"of {len(info.boxes)} found (image {info.source_index})")
            else:
                parts.append(f"{i}: no face in image {info.source_index} -> {info.policy}")
        return "\n".join(parts)
