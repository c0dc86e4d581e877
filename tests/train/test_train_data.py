"""The trainers' data pipeline: folder / FFHQ / CelebA-HQ layouts, captions, identities, deterministic random
choices, and face crops through the pack's faces/ library."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fixtures_train import noise_image, one_thread, train_lib, write_folder  # noqa: F401


def test_folder_layout_captions_and_subfolder_identities(train_lib, tmp_path):
    d = train_lib["data"]
    root = write_folder(str(tmp_path / "data"), ("anna", "ben"), per=2)
    Image.fromarray(noise_image(7)).save(str(tmp_path / "data" / "loose.jpg"))  # no identity, no caption
    records = d.scan_images(root)
    assert len(records) == 5
    by_name = {os.path.relpath(r.path, root): r for r in records}
    assert by_name[os.path.join("anna", "img1.png")].captions == ("a photo of anna, picture 1",)
    assert by_name[os.path.join("ben", "img0.png")].identity == "ben"
    assert by_name["loose.jpg"].identity is None and by_name["loose.jpg"].captions == ()
    ds = d.ImageDataset(records, resolution=32, default_caption="a photo")
    items = [ds[i] for i in range(len(ds))]
    for i, it in enumerate(items):
        assert it["image"].shape == (32, 32, 3) and 0.0 <= float(it["image"].min()) and float(it["image"].max()) <= 1.0
        r = records[i]
        if r.identity is None:
            assert it["identity"] == -1 and it["other"] == -1 and it["caption"] == "a photo"
        else:
            other = records[it["other"]]
            assert it["other"] != i and other.identity == r.identity  # the cross-reference partner
    batch = d.collate(items[:2])
    assert batch["image"].shape == (2, 32, 32, 3) and batch["identity"].dtype == torch.long
    assert isinstance(batch["caption"], list)


def test_identity_csv_overrides_folders(train_lib, tmp_path):
    d = train_lib["data"]
    root = write_folder(str(tmp_path / "data"), ("x", "y"), per=1, captions=False)
    csv = tmp_path / "ids.csv"
    csv.write_text("file,identity\nx/img0.png,same\ny/img0.png,same\n")
    records = d.scan_images(root, identities=str(csv))
    assert {r.identity for r in records} == {"same"}
    bad = tmp_path / "bad.csv"
    bad.write_text("x/img0.png\n")
    with pytest.raises(ValueError, match="row 1"):
        d.scan_images(root, identities=str(bad))
    with pytest.raises(FileNotFoundError, match="identities"):
        d.scan_images(root, identities=str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="layout must be one of"):
        d.scan_images(root, layout="imagenet")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        d.scan_images(str(empty))


def test_ffhq_and_celebahq_layouts(train_lib, tmp_path):
    d = train_lib["data"]
    ffhq = tmp_path / "ffhq" / "images1024x1024"
    for folder, name in (("00000", "00000.png"), ("00000", "00001.png"), ("01000", "01000.png")):
        (ffhq / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noise_image(int(name[:5]) % 7)).save(str(ffhq / folder / name))
    records = d.scan_images(str(tmp_path / "ffhq"), layout="ffhq")
    assert len(records) == 3 and len({r.identity for r in records}) == 3  # chunk folders are not identities

    celeb = tmp_path / "celebahq"
    (celeb / "CelebA-HQ-img").mkdir(parents=True)
    (celeb / "celeba-caption").mkdir()
    for idx in range(3):
        Image.fromarray(noise_image(idx)).save(str(celeb / "CelebA-HQ-img" / f"{idx}.jpg"))
    (celeb / "celeba-caption" / "0.txt").write_text("she has blond hair\nshe is smiling\n")
    (celeb / "CelebA-HQ-to-CelebA-mapping.txt").write_text(
        "idx         orig_idx  orig_file\n0 119613 119614.jpg\n1 99094 099095.jpg\n2 200121 200122.jpg\n")
    (celeb / "identity_CelebA.txt").write_text("119614.jpg 7\n099095.jpg 7\n200122.jpg 9\n")
    records = {os.path.basename(r.path): r for r in d.scan_images(str(celeb), layout="celebahq")}
    assert records["0.jpg"].identity == records["1.jpg"].identity == "7" and records["2.jpg"].identity == "9"
    assert records["0.jpg"].captions == ("she has blond hair", "she is smiling")


def test_random_choices_are_deterministic_per_epoch(train_lib, tmp_path):
    d = train_lib["data"]
    records = d.scan_images(write_folder(str(tmp_path / "data"), ("a",), per=3))
    ds = d.ImageDataset(records, resolution=32, crop="random", flip=True, seed=3)
    first = [ds[i]["image"] for i in range(3)]
    assert all(torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))   # same epoch, same item
    changed = False
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        changed |= any(not torch.equal(a, ds[i]["image"]) for i, a in enumerate(first))
    assert changed  # crops and flips are redrawn per epoch
    with pytest.raises(ValueError, match="multiple of 8"):
        d.ImageDataset(records, resolution=30)


def test_load_image_handles_alpha_and_grey(train_lib, tmp_path):
    d = train_lib["data"]
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :4, 3] = 255   # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(str(tmp_path / "a.png"))
    Image.fromarray(np.full((8, 8), 128, np.uint8), "L").save(str(tmp_path / "g.png"))
    img = d.load_image(str(tmp_path / "a.png"))
    assert img.shape == (8, 8, 3) and float(img[0, 0, 0]) == 1.0 and float(img[0, 7].max()) == 0.0
    grey = d.load_image(str(tmp_path / "g.png"))
    assert grey.shape == (8, 8, 3) and torch.allclose(grey, torch.full_like(grey, 128 / 255))


def test_landmarks_follow_the_square_resize_and_mirror(train_lib):
    f = train_lib["faces"]
    pts = np.array([[40.0, 50.0], [60.0, 50.0], [50.0, 60.0], [42.0, 70.0], [58.0, 70.0]], np.float32)
    # a 100 x 120 image: centre square starts at left = 10; resized to 50 -> factor 0.5
    out = f.map_points(pts, (0, 10, 100, False), 50)
    assert np.allclose(out[0], [15.0, 25.0])
    mirrored = f.map_points(pts, (0, 10, 100, True), 50)
    # the image's left eye becomes the mirrored image's right eye: order swapped, x reflected
    assert np.allclose(mirrored[1], [50 - 1 - 15.0, 25.0]) and np.allclose(mirrored[3], [50 - 1 - 24.0, 35.0])


def test_face_crops_through_faces_library_and_cache(train_lib, tmp_path):
    """The astronaut photo through OpenCV's bundled face detector (no download): the 1.3x crop, its mask, and
    the cached result read back identically."""
    pytest.importorskip("cv2")
    from skimage import data as skdata

    d, f = train_lib["data"], train_lib["faces"]
    root = tmp_path / "faces"
    root.mkdir()
    Image.fromarray(skdata.astronaut()).save(str(root / "astronaut.png"))
    Image.fromarray(skdata.coffee()).save(str(root / "coffee.png"))
    base = d.ImageDataset(d.scan_images(str(root)), resolution=64)
    ds = f.face_dataset(base, {"face_backend": "opencv", "mask_source": "ellipse"}, 96, str(tmp_path / "cache"))
    by_name = {os.path.basename(r.path): i for i, r in enumerate(base.records)}
    face = ds[by_name["astronaut.png"]]
    assert face["face_found"] and face["face"].shape == (96, 96, 3) and face["face_mask"].shape == (96, 96)
    assert 0.2 < float(face["face_mask"].mean()) < 0.9      # an ellipse inside the crop
    cup = ds[by_name["coffee.png"]]
    assert not cup["face_found"] and float(cup["face_mask"].mean()) == 1.0  # whole_image policy: full mask
    assert len(os.listdir(tmp_path / "cache")) == 2
    again = f.face_dataset(base, {"face_backend": "opencv", "mask_source": "ellipse"}, 96, str(tmp_path / "cache"))
    assert torch.equal(again[by_name["astronaut.png"]]["face"], face["face"])
