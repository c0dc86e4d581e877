"""The face-region MASK of a crop (PhotoVerse zeroes every non-face pixel, seed 001 §2.1 step 4; the Taming
Encoder removes the background, seed 003 §3.3).

Sources, best first:
- face_oval: mediapipe's face mesh on the crop, filled convex hull of its face-oval ring (forehead to chin,
  cheek to cheek; hair, ears and neck excluded), the closest built-in stand-in for a face parser. Falls back
  to 'ellipse' (logged) when mediapipe is missing or the mesh finds no face in the crop.
- ellipse: the ellipse inscribed in the detected face box. No dependencies.
- person: mediapipe selfie segmentation, soft person-vs-background mask (background removal).
- box: the detected face box. full: the whole crop.
A MASK from another pack (a BiSeNet face parser, SAM, a painted mask) overrides all of these in Face Crop."""
import logging

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import FaceBackendMissing
from .images import to_uint8

log = logging.getLogger("likeness.faces")

MASK_SOURCES = ("face_oval", "ellipse", "person", "box", "full")
# The one default of Face Crop, the face crops of the trainers and the shipped workflows: a mask the trainers
# train with is the mask the nodes make.
DEFAULT_MASK_SOURCE = "face_oval"


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; (N, 2) -> hull vertices in order."""
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(pts) <= 2:
        return np.asarray(pts)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.asarray(lower[:-1] + upper[:-1])


def polygon_mask(points: np.ndarray, size: int) -> torch.Tensor:
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(map(float, p)) for p in points], fill=255)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def ellipse_mask(box, size: int) -> torch.Tensor:
    x1, y1, x2, y2 = (float(v) for v in box)
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).ellipse([x1, y1, x2, y2], fill=255)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def box_mask(box, size: int) -> torch.Tensor:
    x1, y1, x2, y2 = (float(v) for v in box)
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).rectangle([x1, y1, x2 - 1, y2 - 1], fill=255)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)


def face_oval_mask(crop_rgb: np.ndarray, expected_box):
    """Hull of the mesh face oval nearest the expected face box (crop pixels), or None when no mesh face fits."""
    from .backend_mediapipe import face_mesh_points, face_oval_indices

    faces = face_mesh_points(crop_rgb)
    if not faces:
        return None
    x1, y1, x2, y2 = (float(v) for v in expected_box)
    centre = np.float32([(x1 + x2) / 2, (y1 + y2) / 2])
    oval = face_oval_indices()
    best = min(faces, key=lambda pts: float(np.linalg.norm(pts[oval].mean(0) - centre)))
    c = best[oval].mean(0)
    if not (x1 <= c[0] <= x2 and y1 <= c[1] <= y2):   # the mesh found some other face
        return None
    return polygon_mask(convex_hull(best[oval]), crop_rgb.shape[0])


def face_region_masks(crops: torch.Tensor, infos, source: str) -> torch.Tensor:
    """(N, S, S, 3) crops with their FaceInfo -> (N, S, S) masks. Images without a face get an empty mask
    ('original' policy) or a full one ('whole_image')."""
    if source not in MASK_SOURCES:
        raise ValueError(f"mask_source: '{source}' is not one of {', '.join(MASK_SOURCES)}")
    n, size = crops.shape[0], crops.shape[1]
    masks = torch.zeros((n, size, size), dtype=torch.float32)
    fell_back = []
    for i, info in enumerate(infos):
        if not info.found:
            masks[i] = 1.0 if info.policy == "whole_image" else 0.0
            continue
        box = info.box_in_crop
        if source == "full":
            masks[i] = 1.0
        elif source == "box":
            masks[i] = box_mask(box, size)
        elif source == "ellipse":
            masks[i] = ellipse_mask(box, size)
        elif source == "person":
            from .backend_mediapipe import person_mask
            masks[i] = torch.from_numpy(person_mask(to_uint8(crops[i])))
        else:  # face_oval
            oval = None
            try:
                oval = face_oval_mask(to_uint8(crops[i]), box)
            except FaceBackendMissing as e:
                if not fell_back:
                    log.warning("Likeness faces: face_oval needs mediapipe (%s); using the box ellipse instead", e)
            if oval is None:
                fell_back.append(i)
                oval = ellipse_mask(box, size)
            masks[i] = oval
    if fell_back:
        log.info("Likeness faces: face_oval mask fell back to the box ellipse for output image(s) %s", fell_back)
    return masks
