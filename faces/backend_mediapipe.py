"""No-download backend: mediapipe 0.10.21, the last release whose wheel bundles its .tflite models (Python 3.9-3.12
only, and it declares numpy < 2). The 'blazeface' backend runs the same BlazeFace and face-mesh models on any
Python through OpenCV; this one stays for installs that already have mediapipe.

- detection: the BlazeFace short-range model, then the full-range model when the first finds nothing
  (mediapipe's own "within 2 m" / "within 5 m" split); 6 keypoints, from which the 5 insightface-style
  landmarks are derived (eyes and nose as given; mouth corners = mouth centre -/+ 0.414 x the eye vector,
  the ratio of mouth width to eye distance in the ArcFace template).
- face mesh: 468 landmarks; the face-oval ring gives the face-region mask (see segmentation.py).
- selfie segmentation: a person/background mask (Taming Encoder's background removal).
"""
import logging
import threading

import numpy as np

from .backend_blazeface import five_from_six
from .detection import Detection, FaceAnalysis
from .errors import FaceBackendMissing

log = logging.getLogger("likeness.faces")

INSTALL = ("python -m pip install --no-deps mediapipe==0.10.21 && python -m pip install \"protobuf>=4.25.3,<5\" "
           "absl-py attrs flatbuffers matplotlib  (0.10.21 is the last release that bundles its models; "
           "--no-deps keeps it from replacing numpy and OpenCV)")

_lock = threading.Lock()
_solutions = {}


def import_mediapipe():
    try:
        import mediapipe as mp
        solutions = mp.solutions
    except AttributeError as e:
        raise FaceBackendMissing("this mediapipe has no bundled models (mp.solutions is gone since 0.10.30). "
                                 f"Install the last release that has them: {INSTALL}") from e
    except Exception as e:
        raise FaceBackendMissing(f"mediapipe is not installed or cannot load [{type(e).__name__}: {e}]. "
                                 f"Install it with: {INSTALL}") from e
    return solutions


def _solution(kind: str, **options):
    """One cached mediapipe graph per (kind, options); building one takes tens of milliseconds."""
    key = (kind, tuple(sorted(options.items())))
    if key not in _solutions:
        solutions = import_mediapipe()
        factory = {
            "detection": solutions.face_detection.FaceDetection,
            "mesh": solutions.face_mesh.FaceMesh,
            "selfie": solutions.selfie_segmentation.SelfieSegmentation,
        }[kind]
        _solutions[key] = factory(**options)
    return _solutions[key]


class MediaPipeFaceAnalysis(FaceAnalysis):
    backend = "mediapipe"
    gives_landmarks = True

    def __init__(self, det_thresh: float = 0.5):
        super().__init__()
        import_mediapipe()   # fail at load time, not at the first image
        self.det_thresh = float(det_thresh)

    @property
    def name(self) -> str:
        return "mediapipe (blazeface)"

    def detect(self, rgb: np.ndarray) -> list:
        h, w = rgb.shape[:2]
        rgb = np.ascontiguousarray(rgb)
        with _lock:
            for model_selection in (0, 1):   # short range, then full range
                result = _solution("detection", model_selection=model_selection,
                                   min_detection_confidence=self.det_thresh).process(rgb)
                if result.detections:
                    break
        out = []
        for det in result.detections or []:
            rel = det.location_data.relative_bounding_box
            box = (rel.xmin * w, rel.ymin * h, (rel.xmin + rel.width) * w, (rel.ymin + rel.height) * h)
            pts = np.array([(k.x * w, k.y * h) for k in det.location_data.relative_keypoints], dtype=np.float32)
            kps = five_from_six(pts) if len(pts) >= 4 else None
            out.append(Detection(tuple(float(v) for v in box), float(det.score[0]), kps))
        return out


def face_mesh_points(rgb: np.ndarray, max_faces: int = 4) -> list:
    """Face-mesh landmarks in pixels, one (468 or 478, 2) array per face found."""
    h, w = rgb.shape[:2]
    with _lock:
        result = _solution("mesh", static_image_mode=True, max_num_faces=max_faces, refine_landmarks=False,
                           min_detection_confidence=0.3).process(np.ascontiguousarray(rgb))
    faces = []
    for lm in result.multi_face_landmarks or []:
        faces.append(np.array([(p.x * w, p.y * h) for p in lm.landmark], dtype=np.float32))
    return faces


def face_oval_indices() -> list:
    solutions = import_mediapipe()
    return sorted({i for edge in solutions.face_mesh.FACEMESH_FACE_OVAL for i in edge})


def person_mask(rgb: np.ndarray) -> np.ndarray:
    """Selfie segmentation: (H, W) float32 in [0, 1], 1 = person."""
    with _lock:
        result = _solution("selfie", model_selection=0).process(np.ascontiguousarray(rgb))
    return np.clip(np.asarray(result.segmentation_mask, dtype=np.float32), 0.0, 1.0)
