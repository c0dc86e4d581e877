"""The face-region MASK of a crop (PhotoVerse zeroes every non-face pixel, PhotoVerse §2.1 step 4; the Taming
Encoder removes the background, Taming Encoder §3.3).

Sources, best first:
- face_oval: MediaPipe's 468-point face mesh on the crop, the filled convex hull of its face-oval ring
  (forehead to chin, cheek to cheek; hair, ears and neck excluded), the closest built-in stand-in for a face
  parser. The mesh runs on OpenCV (backend_blazeface, any Python) or, where that is missing, through mediapipe
  0.10.21; with neither, or when the mesh finds no face in the crop, 'ellipse' (logged).
- ellipse: the ellipse inscribed in the detected face box. No dependencies.
- person: mediapipe selfie segmentation, a soft person/background mask (background removal). Without
  mediapipe (Python 3.13, numpy 2): OpenCV's GrabCut seeded with the face (definite foreground) and the crop's
  outer frame (probable background), a hard mask; without OpenCV either: 'full' (logged).
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
    """Hull of the mesh face oval nearest the expected face box (crop pixels), or None when no mesh face fits.
    OpenCV's mesh first; mediapipe's when the OpenCV one cannot load."""
    from .backend_blazeface import face_oval_points

    try:
        oval = face_oval_points(crop_rgb, expected_box)
    except FaceBackendMissing as first:
        try:
            return mediapipe_face_oval_mask(crop_rgb, expected_box)
        except FaceBackendMissing as second:
            raise FaceBackendMissing(f"{first} | {second}") from second
    return None if oval is None else polygon_mask(convex_hull(oval), crop_rgb.shape[0])


def mediapipe_face_oval_mask(crop_rgb: np.ndarray, expected_box):
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
            mask, how = person_mask(to_uint8(crops[i]), box)
            masks[i] = torch.from_numpy(mask)
            if how != "mediapipe":
                fell_back.append((i, how))
        else:  # face_oval
            oval = None
            try:
                oval = face_oval_mask(to_uint8(crops[i]), box)
            except FaceBackendMissing as e:
                if not fell_back:
                    log.warning("Likeness faces: face_oval needs the face mesh (%s); using the box ellipse instead", e)
            if oval is None:
                fell_back.append(i)
                oval = ellipse_mask(box, size)
            masks[i] = oval
    if fell_back and source == "face_oval":
        log.info("Likeness faces: face_oval mask fell back to the box ellipse for output image(s) %s", fell_back)
    elif fell_back:
        log.info("Likeness faces: person mask without mediapipe's selfie segmentation (image, method): %s", fell_back)
    return masks


GRABCUT_ITERATIONS = 5
GRABCUT_FRAME = 0.04   # the outer frame of the crop (fraction of its side) seeds the background


def person_mask(rgb: np.ndarray, face_box) -> tuple:
    """((H, W) float32 in [0, 1], 1 = person; the method used): selfie segmentation ('mediapipe'), else
    'grabcut', else the whole crop ('full')."""
    from .backend_mediapipe import person_mask as selfie_mask

    try:
        return selfie_mask(rgb), "mediapipe"
    except FaceBackendMissing:
        pass
    try:
        return grabcut_person_mask(rgb, face_box), "grabcut"
    except ImportError:
        return np.ones(rgb.shape[:2], np.float32), "full"


def grabcut_person_mask(rgb: np.ndarray, face_box) -> np.ndarray:
    """GrabCut on the crop: the inner face ellipse is certain foreground, a thin outer frame probable background,
    the rest probable foreground; holes inside the person's outline are filled. A hard 0/1 mask (GrabCut gives
    no soft edge). On the test photos it overlaps selfie segmentation by IoU 0.57-0.93, median 0.77
    (bench/bench_faces.py)."""
    import cv2

    h, w = rgb.shape[:2]
    seeds = np.full((h, w), cv2.GC_PR_FGD, np.uint8)
    frame = max(1, round(GRABCUT_FRAME * min(h, w)))
    seeds[:frame, :] = seeds[-frame:, :] = cv2.GC_PR_BGD
    seeds[:, :frame] = seeds[:, -frame:] = cv2.GC_PR_BGD
    x1, y1, x2, y2 = (float(v) for v in face_box)
    inner = (x1 + 0.2 * (x2 - x1), y1 + 0.2 * (y2 - y1), x2 - 0.2 * (x2 - x1), y2 - 0.2 * (y2 - y1))
    seeds[ellipse_mask(inner, max(h, w))[:h, :w].numpy() > 0.5] = cv2.GC_FGD
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(np.ascontiguousarray(rgb[..., ::-1]), seeds, None, bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    person = np.isin(seeds, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
    outlines, _ = cv2.findContours(person, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(person)
    cv2.drawContours(filled, outlines, -1, 1, thickness=-1)
    return filled.astype(np.float32)
