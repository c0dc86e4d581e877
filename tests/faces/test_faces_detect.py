"""The no-download backends on real photos, and Face Crop's geometry, masks and no-face policies end to end.

astronaut: scikit-image's photo of Eileen Collins (NASA, public domain); every detector puts her face near
x 177-272, y 66-177 (../docs measurements). coffee: a cup, no face."""
import json
import logging

import numpy as np
import pytest
import torch

from fixtures_faces import astronaut, coffee  # noqa: F401  (fixtures)

FACE_CENTRE = (225, 125)   # astronaut, pixels


@pytest.fixture(scope="module")
def faces(pack):
    from comfyui_likeness import faces
    from comfyui_likeness.faces import crop, embeddings, errors, loader, segmentation  # noqa: F401
    return faces


@pytest.fixture(scope="module")
def mediapipe(faces):
    return faces.loader.load_face_analysis("mediapipe")


@pytest.fixture(scope="module")
def blazeface(faces):
    return faces.loader.load_face_analysis("blazeface")


@pytest.fixture(scope="module")
def haar(faces):
    return faces.loader.load_face_analysis("opencv")


def u8(img):
    return (img[0] * 255).round().to(torch.uint8).numpy()


@pytest.mark.parametrize("backend", ["blazeface", "mediapipe", "haar"])
def test_the_astronaut_face_is_found(request, astronaut, backend):  # noqa: F811
    analysis = request.getfixturevalue(backend)
    dets = analysis.detect(u8(astronaut))
    assert len(dets) == 1, dets
    cx, cy = dets[0].center
    assert abs(cx - FACE_CENTRE[0]) < 20 and abs(cy - FACE_CENTRE[1]) < 25, dets[0]
    assert 70 < dets[0].width < 130
    if backend != "haar":
        kps = dets[0].kps
        assert kps.shape == (5, 2)
        assert kps[0, 0] < kps[1, 0] and kps[3, 0] < kps[4, 0]          # image-left eye/mouth first
        assert kps[:2, 1].max() < kps[2, 1] < kps[3:, 1].min()          # eyes above nose above mouth
        x1, y1, x2, y2 = dets[0].box
        assert ((kps[:, 0] > x1) & (kps[:, 0] < x2) & (kps[:, 1] > y1) & (kps[:, 1] < y2)).all()
    else:
        assert dets[0].kps is None


@pytest.mark.parametrize("backend", ["blazeface", "mediapipe", "haar"])
def test_no_face_in_the_coffee_photo(request, coffee, backend):  # noqa: F811
    assert request.getfixturevalue(backend).detect(u8(coffee)) == []


def test_crop_geometry_on_the_photo(faces, mediapipe, astronaut):  # noqa: F811
    result = faces.crop.crop_faces(astronaut, mediapipe, size=224, factor=1.3, mask_source="ellipse")
    info = result.infos[0]
    x1, y1, x2, y2 = info.box
    assert info.found and info.window.side == round(1.3 * max(x2 - x1, y2 - y1))
    assert abs(info.window.x0 + info.window.side / 2 - (x1 + x2) / 2) <= 1
    assert abs(info.window.y0 + info.window.side / 2 - (y1 + y2) / 2) <= 1
    assert result.images.shape == (1, 224, 224, 3) and result.masks.shape == (1, 224, 224)
    # the crop is the source window resized
    w = info.window
    ref = torch.nn.functional.interpolate(astronaut[:, w.y0:w.y0 + w.side, w.x0:w.x0 + w.side].permute(0, 3, 1, 2),
                                          size=(224, 224), mode="bicubic", antialias=True).permute(0, 2, 3, 1).clamp(0, 1)
    assert (result.images - ref).abs().max() < 1e-5
    # the face box, mapped into the crop, spans 1/1.3 of it
    bx1, by1, bx2, by2 = info.box_in_crop
    assert abs(max(bx2 - bx1, by2 - by1) - 224 / 1.3) < 3
    # landmarks travel with the crop
    np.testing.assert_allclose(info.kps_in_crop, w.to_crop(info.kps, 224))
    assert torch.equal(result.masked, result.images * result.masks[..., None])
    summary = json.loads(json.dumps(info.to_dict()))
    assert summary["found"] and summary["window"] == [w.x0, w.y0, w.side] and len(summary["kps_in_crop"]) == 5
    assert "face 1" not in result.infos.summary() and "score" in result.infos.summary()


def test_crop_at_the_image_border(faces, mediapipe, astronaut):  # noqa: F811
    edge = astronaut[:, 40:, 172:].contiguous()   # the face now touches the left edge
    shifted = faces.crop.crop_faces(edge, mediapipe, size=128, border="shift", mask_source="box")
    padded = faces.crop.crop_faces(edge, mediapipe, size=128, border="constant", mask_source="box")
    s, p = shifted.infos[0], padded.infos[0]
    assert s.window.x0 == 0 and p.window.x0 < 0 and s.window.side == p.window.side
    cols = round(-p.window.x0 * 128 / p.window.side)
    assert cols >= 2
    assert padded.images[0, :, : cols - 1].max() == 0          # black where the window left the image
    assert shifted.images[0, :, :cols].max() > 0.1             # real pixels instead
    rep = faces.crop.crop_faces(edge, mediapipe, size=128, border="replicate", mask_source="box")
    assert torch.allclose(rep.images[0, :, 0], rep.images[0, :, 1], atol=0.02)   # repeated edge column
    assert padded.masks[0, :, : cols - 1].max() == 0


def test_face_oval_mask_covers_the_face_and_not_the_background(faces, mediapipe, astronaut):  # noqa: F811
    result = faces.crop.crop_faces(astronaut, mediapipe, size=256, mask_source="face_oval")
    mask = result.masks[0]
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    frac = float(mask.mean())
    assert 0.25 < frac < 0.75, frac           # a face in a 1.3x crop
    assert mask[128, 128] == 1 and mask[0, 0] == 0 and mask[255, 255] == 0
    ellipse = faces.crop.crop_faces(astronaut, mediapipe, size=256, mask_source="ellipse").masks[0]
    iou = float((mask * ellipse).sum() / ((mask + ellipse) > 0).sum())
    assert 0.5 < iou < 0.98, iou              # related to the box ellipse but not the same shape
    person = faces.crop.crop_faces(astronaut, mediapipe, size=256, mask_source="person").masks[0]
    assert float(person.mean()) > frac and person.max() <= 1


def test_face_oval_falls_back_to_the_ellipse_without_a_face_mesh(faces, haar, astronaut, monkeypatch, caplog):  # noqa: F811
    import comfyui_likeness.faces.backend_blazeface as bb
    import comfyui_likeness.faces.backend_mediapipe as bm

    def missing(*_):
        raise faces.errors.FaceBackendMissing("not installed (test)")
    monkeypatch.setattr(bm, "import_mediapipe", missing)
    monkeypatch.setattr(bm, "_solutions", {})
    monkeypatch.setattr(bb, "model_folder", missing)
    monkeypatch.setattr(bb, "_nets", {})
    with caplog.at_level(logging.WARNING, logger="likeness.faces"):
        result = faces.crop.crop_faces(astronaut, haar, size=128, mask_source="face_oval")
    ellipse = faces.segmentation.ellipse_mask(result.infos[0].box_in_crop, 128)
    assert torch.equal(result.masks[0], ellipse)
    assert "face_oval needs the face mesh" in caplog.text


def test_no_face_policies_on_a_batch(faces, mediapipe, astronaut, coffee, caplog):  # noqa: F811
    cup = torch.nn.functional.interpolate(coffee.permute(0, 3, 1, 2), size=(400, 600)).permute(0, 2, 3, 1)
    photo = torch.nn.functional.interpolate(astronaut.permute(0, 3, 1, 2), size=(400, 600)).permute(0, 2, 3, 1)
    batch = torch.cat([photo, cup])
    with pytest.raises(faces.errors.NoFaceError, match="image 1 of 2") as e:
        faces.crop.crop_faces(batch, mediapipe, size=64, no_face="error")
    assert "no_face" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="likeness.faces"):
        original = faces.crop.crop_faces(batch, mediapipe, size=60, no_face="original", mask_source="box")
    assert "no_face policy 'original'" in caplog.text
    assert original.images.shape == (2, 60, 60, 3)
    assert original.images[1, :9].max() == 0 and original.images[1, 12:48].max() > 0   # letterboxed, uncut
    assert original.masks[1].max() == 0 and original.masks[0].max() == 1
    assert [i.found for i in original.infos] == [True, False] and original.infos[1].policy == "original"
    whole = faces.crop.crop_faces(batch, mediapipe, size=60, no_face="whole_image", mask_source="box")
    assert whole.masks[1].min() == 1 and whole.infos[1].window == faces.crop.whole_image_window(600, 400)
    skip = faces.crop.crop_faces(batch, mediapipe, size=60, no_face="skip", mask_source="box")
    assert skip.images.shape[0] == 1 and [i.source_index for i in skip.infos] == [0]
    with pytest.raises(faces.errors.NoFaceError, match="nothing is left"):
        faces.crop.crop_faces(cup, mediapipe, size=60, no_face="skip")


def test_index_beyond_the_faces_found_is_a_no_face_case(faces, mediapipe, astronaut):  # noqa: F811
    with pytest.raises(faces.errors.NoFaceError, match="no face at index 1"):
        faces.crop.crop_faces(astronaut, mediapipe, index=1)
    out = faces.crop.crop_faces(astronaut, mediapipe, size=32, index=1, no_face="whole_image", mask_source="box")
    assert not out.infos[0].found and len(out.infos[0].boxes) == 1


def test_rgba_grayscale_batches_and_tiny_images(faces, mediapipe, haar, astronaut):  # noqa: F811
    rgba = torch.cat([astronaut, torch.ones_like(astronaut[..., :1])], dim=-1)
    gray = astronaut.mean(-1, keepdim=True)
    for img in (rgba, gray):
        assert faces.crop.crop_faces(img, mediapipe, size=64, mask_source="box").infos[0].found
    twice = faces.crop.crop_faces(torch.cat([astronaut, astronaut]), mediapipe, size=64, mask_source="ellipse")
    assert twice.images.shape[0] == 2 and torch.equal(twice.images[0], twice.images[1])
    # a 56 px thumbnail of the face region: the Haar backend upscales before its 24 px minimum window
    thumb = torch.nn.functional.interpolate(astronaut[:, 30:230, 125:325].permute(0, 3, 1, 2), size=(56, 56),
                                            mode="area").permute(0, 2, 3, 1)
    small = faces.crop.crop_faces(thumb, haar, size=112, mask_source="box")
    assert small.infos[0].found and small.images.shape == (1, 112, 112, 3)
    # 6 px: nothing to find, the policy applies instead of a crash
    speck = faces.crop.crop_faces(astronaut[:, :6, :6], mediapipe, size=32, no_face="whole_image")
    assert not speck.infos[0].found and speck.images.shape == (1, 32, 32, 3)


def test_an_external_mask_is_cropped_like_the_image(faces, mediapipe, astronaut):  # noqa: F811
    mask = torch.zeros(1, 512, 512)
    mask[:, 100:150, 200:250] = 1.0
    out = faces.crop.crop_faces(astronaut, mediapipe, size=200, mask=mask, mask_source="full")
    w = out.infos[0].window
    expected = faces.crop.crop_mask_window(mask, w, 200)
    assert torch.equal(out.masks, expected) and 0 < float(out.masks.mean()) < 0.5
    with pytest.raises(ValueError, match="mask"):
        faces.crop.crop_faces(astronaut, mediapipe, mask=torch.ones(1, 64, 64))


def test_detection_only_backends_cannot_embed(faces, mediapipe, astronaut):  # noqa: F811
    with pytest.raises(ValueError, match="no recognition model"):
        faces.embeddings.embed_faces(mediapipe, astronaut)
    with pytest.raises(ValueError, match="backend"):
        faces.loader.load_face_analysis("dlib")
    with pytest.raises(ValueError, match="det_thresh"):
        faces.loader.load_face_analysis("mediapipe", det_thresh=1.5)
