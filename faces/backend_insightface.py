"""insightface backend: a model pack (antelopev2, buffalo_l, ...) from models/insightface/models/<pack>.

Detection runs through insightface's own SCRFD code and embeddings through its ArcFaceONNX recognition code,
so results match what IPAdapter FaceID / InstantID / PuLID users get from the same pack. The pack's files are
checked before insightface is asked to load anything, because insightface downloads missing packs."""
import logging
import os

import numpy as np

from .detection import Detection, FaceAnalysis
from .errors import FaceBackendMissing, FaceModelMissing
from .insightface_models import locate_pack

log = logging.getLogger("likeness.faces")

# node choice -> onnxruntime execution provider
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCM": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
    "OpenVINO": "OpenVINOExecutionProvider",
}
SMALLEST_DET_SIZE = 256
DET_SIZE_STEP = 64   # retry 640, 576, ..., 256 when nothing is found (as IPAdapter and InstantID do)

INSTALL_INSIGHTFACE = ("python -m pip install insightface onnxruntime  (install exactly one of onnxruntime / "
                       "onnxruntime-gpu; on Windows without build tools, use a prebuilt insightface wheel)")


def import_onnxruntime():
    try:
        import onnxruntime
    except Exception as e:
        raise FaceBackendMissing(f"onnxruntime is not installed or cannot load [{type(e).__name__}: {e}]. "
                                 "Install it with: python -m pip install onnxruntime") from e
    return onnxruntime


def import_insightface():
    import_onnxruntime()
    try:
        from insightface.app import FaceAnalysis as InsightFaceApp
        from insightface.app.common import Face
        from insightface.utils import face_align
    except Exception as e:
        hint = ""
        if "numpy" in str(e) and ("size changed" in str(e) or "ABI" in str(e) or "compiled" in str(e)):
            hint = (" This insightface build was compiled for another numpy major version: reinstall it "
                    "(python -m pip install --force-reinstall --no-deps insightface) or use a wheel built for numpy 2.")
        raise FaceBackendMissing(f"insightface is not installed or cannot load [{type(e).__name__}: {e}].{hint} "
                                 f"Install it with: {INSTALL_INSIGHTFACE}. Or choose the 'blazeface' or 'opencv' "
                                 "backend, which needs no model download (no identity embeddings).") from e
    return InsightFaceApp, Face, face_align


def resolve_providers(provider: str):
    """(providers list, insightface ctx_id). A provider this onnxruntime lacks falls back to CPU, logged."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider: '{provider}' is not one of {', '.join(PROVIDERS)}")
    available = import_onnxruntime().get_available_providers()
    wanted = PROVIDERS[provider]
    if provider == "CPU":
        return ["CPUExecutionProvider"], -1
    if wanted not in available:
        log.warning("Likeness faces: onnxruntime here has no %s (available: %s); running insightface on the CPU. "
                    "For GPU use install onnxruntime-gpu instead of onnxruntime (never both).",
                    wanted, ", ".join(available))
        return ["CPUExecutionProvider"], -1
    return [wanted, "CPUExecutionProvider"], 0


def detection_sizes(det_size: int, static_size=None) -> list:
    """(width, height) pairs to try in order: det_size, then smaller by 64 down to 256."""
    if static_size is not None:    # a detector exported at a fixed resolution only runs at that resolution
        return [tuple(static_size)]
    sizes = [(int(det_size), int(det_size))]
    s = int(det_size) - DET_SIZE_STEP
    while s >= SMALLEST_DET_SIZE:
        sizes.append((s, s))
        s -= DET_SIZE_STEP
    return sizes


class InsightFaceAnalysis(FaceAnalysis):
    backend = "insightface"
    gives_landmarks = True

    def __init__(self, pack: str, provider: str = "CPU", det_size: int = 640, det_thresh: float = 0.5, roots=None):
        super().__init__()
        if not 32 <= int(det_size) <= 2048 or int(det_size) % 32:
            raise ValueError(f"det_size: {det_size} must be a multiple of 32 between 32 and 2048")
        self.location = locate_pack(pack, roots)   # raises with the full "where do the files go" message
        if self.location.misplaced:
            log.warning("Likeness faces: using %s, but %s", self.location.folder, self.location.misplaced)
        InsightFaceApp, self._Face, self._align = import_insightface()
        providers, ctx_id = resolve_providers(provider)
        self.pack = self.location.name
        self.providers = providers
        try:
            # an absolute folder as the name: insightface uses it as is (0.7.x joins it onto root, which keeps
            # an absolute path; 2.x opens it directly), so its downloader is never reached
            app = InsightFaceApp(name=self.location.folder, root=self.location.root,
                                 allowed_modules=["detection", "recognition"], providers=providers)
        except AssertionError as e:
            raise FaceModelMissing(
                f"insightface pack '{pack}' in {self.location.folder} has no face detection model among "
                f"{', '.join(map(os.path.basename, self.location.onnx_files))}; a pack needs an SCRFD detector "
                "(det_10g.onnx or scrfd_10g_bnkps.onnx)") from e
        except Exception as e:
            raise RuntimeError(f"insightface could not load the pack '{pack}' from {self.location.folder}: "
                               f"{type(e).__name__}: {e}. Is a file truncated? Re-extract the pack's zip.") from e
        app.prepare(ctx_id=ctx_id, det_thresh=float(det_thresh), det_size=(int(det_size), int(det_size)))
        self.app = app
        self.det_thresh = float(det_thresh)
        self.det_sizes = detection_sizes(det_size, _static_size(app.det_model))
        self.last_det_size = None
        self.recognition = app.models.get("recognition")
        self.can_embed = self.recognition is not None

    @property
    def name(self) -> str:
        return f"insightface {self.pack}"

    @property
    def recognition_file(self) -> str:
        return getattr(self.recognition, "model_file", "") if self.recognition is not None else ""

    def detect(self, rgb: np.ndarray) -> list:
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        bboxes = np.zeros((0, 5), np.float32)
        kpss = None
        with self._lock:
            for size in self.det_sizes:
                bboxes, kpss = self.app.det_model.detect(bgr, input_size=size, max_num=0)
                self.last_det_size = size
                if len(bboxes):
                    break
        if len(bboxes) and self.last_det_size != self.det_sizes[0]:
            log.info("Likeness faces: %s found no face at det_size %s; found %d at %s",
                     self.name, self.det_sizes[0][0], len(bboxes), self.last_det_size[0])
        out = []
        for i, row in enumerate(np.asarray(bboxes, dtype=np.float32)):
            kps = None if kpss is None else np.asarray(kpss[i], dtype=np.float32).reshape(5, 2)
            out.append(Detection(tuple(float(v) for v in row[:4]), float(row[4]), kps))
        return out

    def embed(self, rgb: np.ndarray, detection: Detection) -> np.ndarray:
        """The recognition model's raw embedding of one detected face (insightface aligns it by its landmarks)."""
        if not self.can_embed:
            raise FaceModelMissing(
                f"insightface pack '{self.pack}' ({self.location.folder}) has no recognition model: identity "
                "embeddings need an ArcFace model such as w600k_r50.onnx (buffalo_l) or glintr100.onnx (antelopev2)")
        if detection.kps is None:
            raise ValueError("this face has no landmarks, which the identity model needs for alignment")
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        face = self._Face(bbox=np.asarray(detection.box, np.float32), kps=np.asarray(detection.kps, np.float32),
                          det_score=detection.score)
        with self._lock:
            embedding = self.recognition.get(bgr, face)
        return np.asarray(embedding, dtype=np.float32).reshape(-1)

    def aligned_crop(self, rgb: np.ndarray, detection: Detection, size: int = 112) -> np.ndarray:
        """insightface's own 5-point similarity alignment (what the recognition model sees), RGB uint8."""
        bgr = np.ascontiguousarray(rgb[..., ::-1])
        return np.ascontiguousarray(self._align.norm_crop(bgr, np.asarray(detection.kps, np.float32), size)[..., ::-1])


def _static_size(det_model):
    """(width, height) of a detector exported with a fixed input resolution, else None (dynamic)."""
    shape = det_model.session.get_inputs()[0].shape
    h, w = shape[2], shape[3]
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return (w, h)
    return None

