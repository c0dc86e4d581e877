"""Face crop geometry, image/mask input handling and 5-point alignment: pure tensor math, no detector."""
import numpy as np
import pytest
import torch

from fixtures_faces import astronaut  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def F(pack):
    from comfyui_likeness.faces import alignment, crop, detection, face_info, images, segmentation
    return type("F", (), {"crop": crop, "images": images, "align": alignment, "det": detection, "info": face_info,
                          "seg": segmentation})


# --- the crop window -----------------------------------------------------------------------------------
def test_window_is_factor_times_the_longer_box_side_centred_on_the_box(F):
    w = F.crop.face_window((400, 300, 500, 380), 1.3, 1000, 1000)   # 100 x 80 box, centre (450, 340)
    assert w.side == 130
    assert (w.x0 + w.side / 2, w.y0 + w.side / 2) == (450, 340)
    tall = F.crop.face_window((400, 300, 460, 420), 1.5, 1000, 1000)   # 60 x 120: the height decides
    assert tall.side == 180 and (tall.x0 + 90, tall.y0 + 90) == (430, 360)


def test_shift_moves_the_window_inside_and_never_exceeds_the_short_side(F):
    left = F.crop.face_window((0, 200, 100, 300), 1.3, 640, 480)
    assert (left.x0, left.side) == (0, 130) and left.y0 == 250 - 65
    corner = F.crop.face_window((590, 430, 640, 480), 2.0, 640, 480)
    assert corner.x0 + corner.side == 640 and corner.y0 + corner.side == 480
    huge = F.crop.face_window((100, 50, 500, 450), 1.3, 640, 480)   # 520 px wanted, image 480 tall
    assert huge.side == 480 and huge.y0 == 0 and 0 <= huge.x0 <= 640 - 480


def test_pad_modes_keep_the_face_centred_and_fill_like_numpy_pad(F):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 20, 30, 3, generator=g)
    w = F.crop.face_window((-5, -8, 15, 12), 1.3, 30, 20, border="constant")
    assert w.x0 < 0 and w.y0 < 0 and w.side == 26
    pads = ((-w.y0, w.y0 + w.side - 20), (-w.x0, w.x0 + w.side - 30))
    pads = tuple((max(a, 0), max(b, 0)) for a, b in pads)
    for border, mode in (("constant", "constant"), ("replicate", "edge"), ("reflect", "reflect")):
        got = F.crop.cut_window(img, w, border)[0].numpy()
        padded = np.pad(img[0].numpy(), (*pads, (0, 0)), mode=mode)
        oy, ox = pads[0][0] + w.y0, pads[1][0] + w.x0
        np.testing.assert_allclose(got, padded[oy:oy + w.side, ox:ox + w.side], err_msg=border)


def test_reflect_handles_pads_larger_than_the_image(F):
    img = torch.arange(5, dtype=torch.float32).reshape(1, 1, 5, 1).expand(1, 5, 5, 3).contiguous()
    win = F.info.CropWindow(-12, 0, 5 + 24)
    got = F.crop.cut_window(img, win, "reflect")[0, 0, :, 0].numpy()
    np.testing.assert_array_equal(got, np.pad(np.arange(5.0), (12, 12), mode="reflect"))


def test_crop_resizes_to_a_square_without_distorting(F):
    # a disc of radius 30 centred at (100, 70) in a 240 x 160 image stays a disc in the crop
    yy, xx = torch.meshgrid(torch.arange(160.0), torch.arange(240.0), indexing="ij")
    disc = (((xx - 100) ** 2 + (yy - 70) ** 2) <= 30 ** 2).float()
    img = disc[None, :, :, None].expand(1, 160, 240, 3).contiguous()
    w = F.crop.face_window((70, 40, 130, 100), 1.3, 240, 160)
    out = F.crop.crop_window(img, w, 224, "shift")[0, :, :, 0] > 0.5
    rows, cols = out.any(1).nonzero(), out.any(0).nonzero()
    height, width = rows.max() - rows.min(), cols.max() - cols.min()
    assert out.shape == (224, 224)
    assert abs(int(height) - int(width)) <= 2
    assert abs(int(width) - round(60 * 224 / w.side)) <= 3


def test_letterbox_and_whole_image_windows(F):
    assert F.crop.letterbox_window(600, 400) == F.info.CropWindow(0, -100, 600)
    assert F.crop.whole_image_window(600, 400) == F.info.CropWindow(100, 0, 400)


def test_window_rejects_bad_settings(F):
    with pytest.raises(ValueError, match="border"):
        F.crop.face_window((0, 0, 10, 10), 1.3, 20, 20, border="wrap")
    with pytest.raises(ValueError, match="factor"):
        F.crop.face_window((0, 0, 10, 10), 0.0, 20, 20)


def test_crop_window_maps_points_both_ways(F):
    w = F.info.CropWindow(100, 40, 200)
    pts = np.float32([[150, 90], [299, 239]])
    crop = w.to_crop(pts, 512)
    np.testing.assert_allclose(crop, [[128, 128], [509.44, 509.44]], rtol=1e-5)
    np.testing.assert_allclose(w.to_source(crop, 512), pts, rtol=1e-5)


# --- IMAGE / MASK inputs --------------------------------------------------------------------------------
def test_as_rgb_accepts_rgba_gray_and_unbatched_images(F):
    rgba = torch.rand(2, 8, 9, 4)
    np.testing.assert_array_equal(F.images.as_rgb(rgba).numpy(), rgba[..., :3].numpy())
    gray = torch.rand(1, 8, 9, 1)
    out = F.images.as_rgb(gray)
    assert out.shape == (1, 8, 9, 3) and torch.equal(out[..., 0], out[..., 2])
    assert F.images.as_rgb(torch.rand(8, 9, 2)).shape == (1, 8, 9, 3)
    assert F.images.as_rgb(torch.full((1, 2, 2, 3), 3.0)).max() == 1.0


@pytest.mark.parametrize("bad, match", [
    (torch.rand(1, 8, 8, 5), "5 channels"), (torch.rand(0, 8, 8, 3), "empty"), (torch.rand(8, 8), "shape"),
    ("astronaut.png", "IMAGE tensor")])
def test_as_rgb_names_the_input_in_errors(F, bad, match):
    with pytest.raises(ValueError, match=match) as e:
        F.images.as_rgb(bad, "reference")
    assert "reference" in str(e.value)


def test_as_mask_checks_size_and_batch(F):
    assert F.images.as_mask(torch.ones(8, 9), 3, 8, 9).shape == (3, 8, 9)
    with pytest.raises(ValueError, match="mask is 8x9 but the image is 10x10"):
        F.images.as_mask(torch.ones(1, 9, 8), 1, 10, 10)
    with pytest.raises(ValueError, match="2 masks for 3 images"):
        F.images.as_mask(torch.ones(2, 8, 9), 3, 8, 9)


# --- choosing a face ------------------------------------------------------------------------------------
def test_pick_detection_orders(F):
    D = F.det.Detection
    a, b, c = D((0, 0, 10, 10), 0.9), D((50, 0, 80, 30), 0.6), D((20, 0, 40, 20), 0.99)
    assert F.det.pick_detection([a, b, c], "largest", 0) is b
    assert F.det.pick_detection([a, b, c], "largest", 1) is c
    assert F.det.pick_detection([b, c, a], "left_to_right", 0) is a
    assert F.det.pick_detection([a, b, c], "confidence", 0) is c
    assert F.det.pick_detection([a, b, c], "largest", 3) is None
    with pytest.raises(ValueError, match="order"):
        F.det.pick_detection([a], "random", 0)


# --- segmentation helpers -------------------------------------------------------------------------------
def test_convex_hull_and_shape_masks(F):
    pts = np.array([[10, 10], [50, 10], [50, 50], [10, 50], [30, 30], [20, 40]], np.float32)
    hull = F.seg.convex_hull(pts)
    assert len(hull) == 4 and [30, 30] not in hull.tolist()
    poly = F.seg.polygon_mask(hull, 64)
    assert abs(float(poly.sum()) - 41 * 41) < 90
    ell = F.seg.ellipse_mask((10, 10, 50, 50), 64)
    assert abs(float(ell.sum()) - np.pi * 20 * 20) < 0.05 * np.pi * 400
    assert float(F.seg.box_mask((10, 10, 50, 50), 64).sum()) == 1600


# --- alignment -------------------------------------------------------------------------------------------
def test_similarity_fit_recovers_a_known_transform(F):
    angle, scale, t = 0.3, 1.7, torch.tensor([12.0, -5.0], dtype=torch.float64)
    rot = torch.tensor([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=torch.float64)
    src = torch.rand(2, 5, 2, dtype=torch.float64) * 100
    dst = scale * src @ rot.T + t
    m = F.align.similarity_matrices(src, dst)
    np.testing.assert_allclose(m[0, :, :2].numpy(), (scale * rot).numpy(), atol=1e-9)
    np.testing.assert_allclose(m[1, :, 2].numpy(), t.numpy(), atol=1e-9)


def test_warp_matches_opencv_warp_affine(F):
    import cv2

    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 90, 120, generator=g)
    kps = torch.tensor([[[40.0, 30.0], [75.0, 33.0], [58.0, 50.0], [44.0, 68.0], [72.0, 70.0]]])
    m = F.align.alignment_matrices(kps, 112)
    ours = F.align.warp_affine(img, m, 112)[0].permute(1, 2, 0).numpy()
    ref = cv2.warpAffine(img[0].permute(1, 2, 0).numpy(), m[0].numpy(), (112, 112), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    inside = ref.sum(-1) > 0
    assert inside.mean() > 0.5
    # cv2 rounds sample positions to 1/32 pixel; torch does not
    assert np.abs(ours - ref)[inside].mean() < 0.01


def test_alignment_is_differentiable_and_checks_landmarks(F):
    img = torch.rand(2, 3, 64, 64, requires_grad=True)
    kps = torch.tensor([[20.0, 25.0], [44.0, 25.0], [32.0, 36.0], [23.0, 47.0], [41.0, 47.0]])
    out = F.align.align_faces(img, kps, 112)
    assert out.shape == (2, 3, 112, 112)
    out.sum().backward()
    assert img.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="landmarks"):
        F.align.align_faces(img.detach(), torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="template"):
        F.align.arcface_template(100)
