"""Errors of the face layer. Each says in plain words what is wrong and what to do about it."""


class FaceBackendMissing(RuntimeError):
    """An optional library (insightface, onnxruntime, mediapipe, OpenCV, onnx) is not installed or cannot load."""


class FaceModelMissing(FileNotFoundError):
    """A model file or pack is not where the pack looks for it."""


class NoFaceError(ValueError):
    """No face was found where one was required."""
