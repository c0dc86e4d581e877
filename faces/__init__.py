"""Faces: detection, the papers' face crop, face-region masks, identity embeddings, a differentiable ArcFace.

Library API (what the method nodes and trainers call):
- loader.load_face_analysis(backend, insightface_pack, provider, det_size, det_thresh) -> FaceAnalysis
  backends: 'auto', 'insightface' (models/insightface/models/<pack>), 'blazeface', 'mediapipe', 'opencv' (no download).
  FaceAnalysis.detect(rgb_uint8) -> [Detection(box, score, kps)]; .embed(rgb_uint8, detection) (insightface).
- crop.crop_faces(images, analysis, size, factor=1.3, order, index, border, no_face, mask_source, mask)
  -> FaceCrops(images, masks, infos); .masked is PhotoVerse's x_m. Geometry helpers: face_window, crop_window.
- segmentation.face_region_masks(crops, infos, source) (face_oval / ellipse / person / box / full).
- embeddings.embed_faces(analysis, images, ...) -> (FaceEmbeds, aligned crops); likeness_scores(...).
- alignment.align_faces(images_bchw, landmarks, 112): differentiable 5-point alignment (grid_sample).
- arcface.load_arcface(path_onnx_or_safetensors) / arcface_from_pack(pack) -> ArcFace (torch IResNet);
  ArcFace.embed(images, landmarks), ArcFace.identity_loss(reference, generated, reference_landmarks).
Optional libraries (insightface, onnxruntime, onnx, mediapipe, OpenCV) are imported only when used."""
import logging
import os
import sys

from .insightface_models import register_insightface_folder

# onnxruntime's Linux wheels (1.32) send usage telemetry: DNS lookups of a Microsoft collector every few seconds
# while a session exists. It reads this switch once, when it is first imported, so it is set before any face
# code can import it; a value the user set is kept.
if "onnxruntime" in sys.modules and os.environ.get("ORT_DISABLE_TELEMETRY") is None:
    logging.getLogger("likeness.faces").warning(
        "Likeness faces: another package imported onnxruntime before this pack could turn its telemetry off; "
        "start ComfyUI with ORT_DISABLE_TELEMETRY=1 in the environment to stop its network lookups")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

try:   # make models/insightface a host model folder as soon as the pack's face code is imported
    register_insightface_folder()
except ImportError:   # used outside ComfyUI (no folder_paths): pack lookups then need explicit roots
    pass
