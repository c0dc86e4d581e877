"""The insightface backend through insightface's real code, with tiny random packs written at test time:
finding packs (and the usual misplacements), file checks before insightface can download, providers,
detection-size fallback, embeddings and the likeness score."""
import logging
import os
import sys

import numpy as np
import pytest
import torch

from fixtures_faces import CENTRE_BOX, astronaut, coffee, insightface_root, tiny_packs  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def faces(pack):
    from comfyui_likeness import faces
    from comfyui_likeness.faces import embeddings, errors, insightface_models, loader  # noqa: F401
    return faces


@pytest.fixture
def no_network(monkeypatch):
    """Fail loudly if anything tries to download (insightface fetches missing packs from GitHub)."""
    import socket

    import insightface.utils.storage as storage

    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a[:2]}")
    monkeypatch.setattr(storage, "download_file", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def u8(img):
    return (img[0] * 255).round().to(torch.uint8).numpy()


def load(faces, pack, **kw):
    return faces.loader.load_face_analysis("insightface", pack, **kw)


def test_the_folder_is_registered_and_packs_are_listed(faces, tiny_packs, base_dir):  # noqa: F811
    import folder_paths

    assert os.path.join(folder_paths.models_dir, "insightface") in folder_paths.get_folder_paths("insightface")
    packs = faces.insightface_models.available_packs()
    assert {"likeness_centre", "likeness_random", "likeness_nested", "likeness_detonly"} <= set(packs)
    assert "likeness_empty" not in packs


def test_registration_keeps_paths_from_extra_model_paths(faces):
    import folder_paths

    saved = folder_paths.folder_names_and_paths.get("insightface")
    try:
        folder_paths.folder_names_and_paths["insightface"] = (["/elsewhere/insightface"], set())
        faces.insightface_models.register_insightface_folder()
        paths, exts = folder_paths.folder_names_and_paths["insightface"]
        assert paths[0] == "/elsewhere/insightface" and paths[1].endswith(os.path.join("models", "insightface"))
        assert exts == set()    # 'every file' stays 'every file'
    finally:
        folder_paths.folder_names_and_paths["insightface"] = saved


def test_the_centre_pack_runs_through_insightface(faces, tiny_packs, astronaut, no_network):  # noqa: F811
    analysis = load(faces, "likeness_centre")
    assert type(analysis.app).__module__.startswith("insightface")
    assert analysis.det_sizes == [(640, 640)]            # a fixed-size detector is not retried at other sizes
    dets = analysis.detect(u8(astronaut))
    assert len(dets) == 1
    # the prior sits at the 640 canvas centre; a 512 image is scaled by 640/512 before detection
    np.testing.assert_allclose(dets[0].box, np.float32(CENTRE_BOX) * 512 / 640, atol=12)
    assert dets[0].kps.shape == (5, 2) and dets[0].score > 0.5
    assert analysis.can_embed and analysis.recognition_file.endswith("w600k_r50.onnx")


def test_dynamic_detectors_retry_smaller_sizes(faces, tiny_packs, astronaut, caplog):  # noqa: F811
    analysis = load(faces, "likeness_random", det_size=512, det_thresh=0.999)
    assert analysis.det_sizes == [(512, 512), (448, 448), (384, 384), (320, 320), (256, 256)]
    assert analysis.detect(u8(astronaut)) == []
    assert analysis.last_det_size == (256, 256)           # every size was tried
    hits = load(faces, "likeness_random", det_thresh=0.0).detect(u8(astronaut))
    assert len(hits) > 0                                  # the random heads do produce boxes at threshold 0


def test_unavailable_provider_falls_back_to_cpu(faces, tiny_packs, caplog):  # noqa: F811
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA for onnxruntime")
    with caplog.at_level(logging.WARNING, logger="likeness.faces"):
        analysis = load(faces, "likeness_centre", provider="CUDA")
    assert analysis.providers == ["CPUExecutionProvider"]
    assert "no CUDAExecutionProvider" in caplog.text and "onnxruntime-gpu" in caplog.text


def test_a_missing_pack_says_where_the_files_go_and_never_downloads(faces, tiny_packs, base_dir, no_network):  # noqa: F811
    with pytest.raises(faces.errors.FaceModelMissing) as e:
        load(faces, "likeness_missing")
    msg = str(e.value)
    assert os.path.join(insightface_root(base_dir), "models", "likeness_missing") in msg
    assert "antelopev2/antelopev2" in msg and "never downloads" in msg and "blazeface" in msg
    with pytest.raises(faces.errors.FaceModelMissing, match="exists but holds no .onnx files"):
        load(faces, "likeness_empty")
    with pytest.raises(ValueError, match="not a pack name"):
        load(faces, "../checkpoints")


def test_the_nested_zip_layout_is_found_and_explained(faces, tiny_packs, astronaut, caplog):  # noqa: F811
    with caplog.at_level(logging.WARNING, logger="likeness.faces"):
        analysis = load(faces, "likeness_nested")
    assert analysis.location.folder.endswith(os.path.join("likeness_nested", "likeness_nested"))
    assert "one folder too deep" in caplog.text and "Move them up" in caplog.text
    assert len(analysis.detect(u8(astronaut))) == 1


def test_a_pack_without_recognition_model(faces, tiny_packs, astronaut):  # noqa: F811
    analysis = load(faces, "likeness_detonly")
    assert not analysis.can_embed and len(analysis.detect(u8(astronaut))) == 1
    with pytest.raises(ValueError, match="no recognition model"):
        faces.embeddings.likeness_scores(analysis, astronaut, astronaut)


def test_a_truncated_model_file_is_reported(faces, base_dir):
    folder = os.path.join(insightface_root(base_dir), "models", "likeness_truncated")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "det_10g.onnx"), "wb") as f:
        f.write(b"\x08\x07not really onnx")
    with pytest.raises(RuntimeError, match="could not load the pack 'likeness_truncated'"):
        load(faces, "likeness_truncated")


def test_missing_insightface_is_a_clear_error(faces, tiny_packs, monkeypatch):  # noqa: F811
    for name in [m for m in sys.modules if m == "insightface" or m.startswith("insightface.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "insightface", None)   # import insightface -> ImportError
    with pytest.raises(faces.errors.FaceBackendMissing, match="pip install insightface onnxruntime"):
        load(faces, "likeness_centre")


def test_embeddings_are_insightface_normed_embeddings(faces, tiny_packs, astronaut):  # noqa: F811
    from insightface.app.common import Face

    analysis = load(faces, "likeness_centre")
    embeds, aligned = faces.embeddings.embed_faces(analysis, torch.cat([astronaut, astronaut.flip(2)]))
    assert embeds.embeddings.shape == (2, 512) and aligned.shape == (2, 112, 112, 3)
    assert torch.allclose(embeds.embeddings.norm(dim=1), torch.ones(2), atol=1e-5)
    assert embeds.model == "likeness_centre/w600k_r50.onnx" and embeds.source_indices == [0, 1]
    # the same numbers as insightface's own Face.normed_embedding for that detection
    bgr = u8(astronaut)[..., ::-1].copy()
    face = Face(bbox=embeds.boxes[0], kps=embeds.kps[0], det_score=1.0)
    analysis.recognition.get(bgr, face)
    np.testing.assert_allclose(embeds.embeddings[0].numpy(), face.normed_embedding, atol=1e-5)
    assert float(embeds.embeddings[0] @ embeds.embeddings[1]) < 0.9999   # a mirrored image is another input


def test_likeness_score_of_an_image_with_itself_is_one(faces, tiny_packs, astronaut, coffee):  # noqa: F811
    analysis = load(faces, "likeness_centre")
    cup = torch.nn.functional.interpolate(coffee.permute(0, 3, 1, 2), size=(512, 512)).permute(0, 2, 3, 1)
    report = faces.embeddings.likeness_scores(analysis, astronaut, torch.cat([astronaut, cup, astronaut]))
    assert report.scores[0] == pytest.approx(1.0, abs=1e-5) and report.scores[2] == pytest.approx(1.0, abs=1e-5)
    assert report.scores[1] < 0.999
    assert report.mean == pytest.approx(np.mean(report.scores)) and report.best_index in (0, 2)
    assert "image 1: " in report.text and "likeness_centre/w600k_r50.onnx" in report.text


def test_likeness_score_counts_images_without_a_face_as_zero(faces, tiny_packs, astronaut):  # noqa: F811
    analysis = load(faces, "likeness_centre")
    black = torch.zeros(1, 512, 512, 3)       # the centre detector finds no face in a dark image
    assert analysis.detect(u8(black)) == []
    report = faces.embeddings.likeness_scores(analysis, astronaut, torch.cat([astronaut, black]))
    assert report.found == [True, False] and report.scores[1] == 0.0
    assert report.mean == pytest.approx(report.scores[0] / 2) and report.mean_found == pytest.approx(report.scores[0])
    assert "image 1: no face (scored 0)" in report.text
    with pytest.raises(faces.errors.NoFaceError, match="reference"):
        faces.embeddings.likeness_scores(analysis, black, astronaut)
