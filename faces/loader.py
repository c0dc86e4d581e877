"""One entry point that builds a face backend by name (the Face Analysis loader node calls this)."""
from .backend_insightface import PROVIDERS, InsightFaceAnalysis
from .detection import FaceAnalysis

BACKENDS = ("insightface", "mediapipe", "opencv")


def load_face_analysis(backend: str, insightface_pack: str = "antelopev2", provider: str = "CPU",
                       det_size: int = 640, det_thresh: float = 0.5) -> FaceAnalysis:
    """backend: 'insightface' (a pack from models/insightface; detection + landmarks + identity embeddings),
    'mediapipe' (bundled BlazeFace; detection + derived landmarks) or 'opencv' (bundled Haar cascade; boxes).
    insightface_pack, provider and det_size only matter for insightface."""
    if not 0.0 <= float(det_thresh) <= 1.0:
        raise ValueError(f"det_thresh: {det_thresh} must be between 0 and 1")
    if backend == "insightface":
        return InsightFaceAnalysis(insightface_pack, provider=provider, det_size=det_size, det_thresh=det_thresh)
    if backend == "mediapipe":
        from .backend_mediapipe import MediaPipeFaceAnalysis
        return MediaPipeFaceAnalysis(det_thresh=det_thresh)
    if backend == "opencv":
        from .backend_opencv import HaarFaceAnalysis
        return HaarFaceAnalysis()
    raise ValueError(f"backend: '{backend}' is not one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "PROVIDERS", "load_face_analysis"]
