"""Face crops for training through the pack's faces/ library (the same crop the inference nodes make).

FaceCropDataset wraps an ImageDataset and adds to every item, from the ORIGINAL image (full resolution):
  "face"        (S, S, 3) the papers' square crop around the detected face (factor 1.3 by default)
  "face_mask"   (S, S) the face-region mask of the crop (faces/segmentation.py sources)
  "face_found"  bool; an image without a face follows the no_face policy (whole_image: centre square)
  "image_kps"   (5, 2) the five landmarks in the item image's pixels (after its square resize and flip; NaN
                when the backend gives no landmarks), which PhotoVerse's ArcFace loss warps with
Crops, masks and landmarks are cached per image as safetensors in cache_dir (detection is the slow part).
"""
import hashlib
import logging
import os

import numpy as np
import torch

from ..faces.segmentation import DEFAULT_MASK_SOURCE
from .data import ImageDataset, load_image, square_resize

log = logging.getLogger("likeness.train")

# insightface order: left eye, right eye, nose, mouth left, mouth right (faces/detection.py); a mirror swaps pairs
MIRROR = [1, 0, 2, 4, 3]


class FaceAnalysisFactory:
    """Builds the detector lazily in each process (detector sessions do not cross process boundaries)."""

    def __init__(self, backend: str = "insightface", insightface_pack: str = "antelopev2", provider: str = "CPU",
                 det_size: int = 640, det_thresh: float = 0.5):
        self.args = (backend, insightface_pack, provider, det_size, det_thresh)
        self._analysis = None

    def __call__(self):
        if self._analysis is None:
            from ..faces.loader import load_face_analysis
            self._analysis = load_face_analysis(*self.args)
        return self._analysis

    def __getstate__(self):
        return {"args": self.args, "_analysis": None}


def map_points(points: np.ndarray, transform: tuple, size: int) -> np.ndarray:
    """Source-image pixels -> pixels of the item image made by square_resize (top, left, side, flipped)."""
    top, left, side, flipped = transform
    p = (np.asarray(points, np.float32) - np.float32([left, top])) * np.float32(size / side)
    if flipped:
        p = p[MIRROR].copy()
        p[:, 0] = size - 1 - p[:, 0]
    return p


class FaceCropDataset(torch.utils.data.Dataset):
    def __init__(self, base: ImageDataset, analysis: FaceAnalysisFactory, size: int = 512, factor: float = 1.3,
                 mask_source: str = DEFAULT_MASK_SOURCE, no_face: str = "whole_image", cache_dir: str | None = None):
        from ..faces.crop import NO_FACE_POLICIES

        if no_face not in NO_FACE_POLICIES or no_face == "skip":
            raise ValueError(f"no_face must be one of error, original, whole_image for training (got {no_face!r})")
        self.base, self.analysis, self.size, self.factor = base, analysis, int(size), float(factor)
        self.mask_source, self.no_face, self.cache_dir = mask_source, no_face, cache_dir
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch: int):
        self.base.set_epoch(epoch)

    def _cache_path(self, path: str) -> str | None:
        if not self.cache_dir:
            return None
        st = os.stat(path)
        key = f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}|{self.size}|{self.factor}|{self.mask_source}|" \
              f"{self.analysis.args}"
        return os.path.join(self.cache_dir, hashlib.sha1(key.encode()).hexdigest()[:20] + ".safetensors")

    def face_of(self, path: str, image: torch.Tensor | None = None) -> dict:
        """{'face' uint8 (S,S,3), 'mask' uint8 (S,S), 'kps' (5,2) source pixels (NaN if none), 'found' (1,)}."""
        from safetensors.torch import load_file, save_file

        cache = self._cache_path(path)
        if cache and os.path.isfile(cache):
            return load_file(cache)
        from ..faces.crop import crop_faces

        image = load_image(path) if image is None else image
        crops = crop_faces(image[None], self.analysis(), size=self.size, factor=self.factor, no_face=self.no_face,
                           mask_source=self.mask_source)
        info = crops.infos[0]
        kps = np.full((5, 2), np.nan, np.float32) if info.kps is None else np.asarray(info.kps, np.float32)
        out = {"face": (crops.images[0] * 255).round().to(torch.uint8), "mask": (crops.masks[0] * 255).round().to(torch.uint8),
               "kps": torch.from_numpy(kps), "found": torch.tensor([1 if info.found else 0], dtype=torch.uint8)}
        if cache:
            tmp = f"{cache}.{os.getpid()}.tmp"   # processes may write the same image's file
            save_file({k: v.contiguous() for k, v in out.items()}, tmp)
            os.replace(tmp, cache)
        return out

    def __getitem__(self, index: int) -> dict:
        base = self.base
        rng = base.rng(index)
        record = base.records[index]
        original = load_image(record.path)
        image, transform = square_resize(original, base.resolution, base.crop, rng, base.flip)
        face = self.face_of(record.path, original)
        identity = base.identity_ids.get(record.identity, -1) if record.identity is not None else -1
        return {"image": image, "caption": base.caption_of(index, rng), "identity": identity, "index": index,
                "other": base.other_of(index, rng), "face": face["face"].float() / 255.0,
                "face_mask": face["mask"].float() / 255.0, "face_found": bool(face["found"][0]),
                "image_kps": torch.from_numpy(map_points(face["kps"].numpy(), transform, base.resolution))}


class WholeImageFaces(torch.utils.data.Dataset):
    """For data that is already face crops (aligned FFHQ / CelebA-HQ used as they are): the whole image stands in
    for the face crop, with a full mask and no landmarks."""

    def __init__(self, base: ImageDataset, size: int = 512):
        self.base, self.size = base, int(size)

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch: int):
        self.base.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        face = item["image"]
        if face.shape[0] != self.size:
            face, _ = square_resize(face, self.size)
        return {**item, "face": face, "face_mask": torch.ones(self.size, self.size), "face_found": False,
                "image_kps": torch.full((5, 2), float("nan"))}


def face_dataset(base: ImageDataset, options: dict, size: int, cache_dir: str | None = None):
    """The face-crop view of a dataset from a trainer's options: face_backend ('insightface', 'mediapipe',
    'opencv', or 'none' for data that is already cropped), insightface_pack, face_factor, mask_source (the Face Crop
    node's default, faces/segmentation.py DEFAULT_MASK_SOURCE)."""
    backend = options.get("face_backend", "insightface")
    if backend in ("none", "", None):
        return WholeImageFaces(base, size)
    factory = FaceAnalysisFactory(backend, options.get("insightface_pack", "antelopev2"),
                                  options.get("face_provider", "CPU"), int(options.get("det_size", 640)),
                                  float(options.get("det_thresh", 0.5)))
    return FaceCropDataset(base, factory, size, float(options.get("face_factor", 1.3)),
                           options.get("mask_source", DEFAULT_MASK_SOURCE), options.get("no_face", "whole_image"),
                           options.get("face_cache_dir", cache_dir))
