"""The papers' face crop: a square around the detected face, enlarged by a factor (PhotoVerse: 1.3, PhotoVerse
§2.1; Inv-Adapter: a square face box, Inv-Adapter §3.3), resized to the encoder's size (224 CLIP, 512 VAE).

Geometry: side = factor x max(box width, box height), centred on the box. Where the square leaves the image the
border mode decides: 'shift' moves it back inside (and shrinks it to the image's short side if it is larger,
so only real pixels are used), 'constant' fills black, 'replicate' repeats the edge, 'reflect' mirrors it."""
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .detection import pick_detection
from .errors import NoFaceError
from .face_info import CropWindow, FaceInfo, FaceInfoList
from .images import as_mask, as_rgb, to_uint8
from .segmentation import DEFAULT_MASK_SOURCE, MASK_SOURCES, face_region_masks

log = logging.getLogger("likeness.faces")

BORDERS = ("shift", "constant", "replicate", "reflect")
# error: stop; original: the uncropped image, letterboxed to the crop size, empty mask; whole_image: the image's
# centre square stands in for the face, full mask; skip: leave the image out of the output batch.
NO_FACE_POLICIES = ("error", "original", "whole_image", "skip")


def face_window(box, factor: float, width: int, height: int, border: str = "shift") -> CropWindow:
    """The square crop window around a face box (x1, y1, x2, y2) in an image of width x height."""
    if border not in BORDERS:
        raise ValueError(f"border: '{border}' is not one of {', '.join(BORDERS)}")
    if not factor > 0:
        raise ValueError(f"factor: must be above 0, got {factor}")
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = max(1, round(factor * max(x2 - x1, y2 - y1)))
    if border == "shift":
        side = min(side, width, height)
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    if border == "shift":
        x0 = min(max(x0, 0), width - side)
        y0 = min(max(y0, 0), height - side)
    return CropWindow(int(x0), int(y0), int(side))


def whole_image_window(width: int, height: int) -> CropWindow:
    side = min(width, height)
    return CropWindow((width - side) // 2, (height - side) // 2, side)


def letterbox_window(width: int, height: int) -> CropWindow:
    side = max(width, height)
    return CropWindow((width - side) // 2, (height - side) // 2, side)


def _source_indices(start: int, count: int, length: int, border: str):
    """Indices into an axis of `length` for positions start..start+count-1, and which of them are inside."""
    pos = torch.arange(start, start + count)
    inside = (pos >= 0) & (pos < length)
    if border == "reflect" and length > 1:
        period = 2 * (length - 1)
        pos = pos.remainder(period)
        pos = torch.where(pos >= length, period - pos, pos)
        return pos, torch.ones_like(inside)
    if border == "replicate":
        return pos.clamp(0, length - 1), torch.ones_like(inside)
    return pos.clamp(0, length - 1), inside   # constant (and shift, which is always inside)


def cut_window(images: torch.Tensor, window: CropWindow, border: str) -> torch.Tensor:
    """(B, H, W, C) -> (B, side, side, C) at source resolution, filling outside pixels per `border`."""
    _, h, w, _ = images.shape
    rows, rows_in = _source_indices(window.y0, window.side, h, border)
    cols, cols_in = _source_indices(window.x0, window.side, w, border)
    out = images.index_select(1, rows).index_select(2, cols)
    if border in ("constant", "shift"):
        keep = (rows_in[:, None] & cols_in[None, :]).to(images.dtype)
        out = out * keep[None, :, :, None]
    return out


def resize_square(images: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """(B, S, S, C) -> (B, size, size, C), clamped to [0, 1]. antialias=True gives PIL's filters (a = -0.5
    bicubic) in both directions, as CLIP's own preprocessing uses."""
    if images.shape[1] == size and images.shape[2] == size:
        return images.clone()
    x = images.permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
    return x.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


def crop_window(images: torch.Tensor, window: CropWindow, size: int, border: str, mode: str = "bicubic"):
    return resize_square(cut_window(images, window, border), size, mode)


def crop_mask_window(masks: torch.Tensor, window: CropWindow, size: int) -> torch.Tensor:
    """(B, H, W) -> (B, size, size); outside the image counts as 'not face'."""
    return crop_window(masks.unsqueeze(-1), window, size, "constant", mode="bilinear")[..., 0]


@dataclass
class FaceCrops:
    images: torch.Tensor      # (N, size, size, 3)
    masks: torch.Tensor       # (N, size, size), 1 = face region
    infos: FaceInfoList       # one per output image

    @property
    def masked(self) -> torch.Tensor:
        """Non-face pixels set to 0: PhotoVerse's x_m (PhotoVerse §2.1 step 4)."""
        return self.images * self.masks.unsqueeze(-1)


def crop_faces(images, analysis, size: int = 512, factor: float = 1.3, order: str = "largest", index: int = 0,
               border: str = "shift", no_face: str = "error", mask_source: str = DEFAULT_MASK_SOURCE, mask=None,
               progress=None) -> FaceCrops:
    """Detect, choose, crop and segment one face per image of an IMAGE batch.

    analysis: a FaceAnalysis (loader.load_face_analysis). mask: an optional MASK for the source images (another
    pack's face parser, a hand-painted mask); when given it is cropped the same way instead of segmenting.
    mask_source: see segmentation.MASK_SOURCES. progress(i, total) is called after every image."""
    if no_face not in NO_FACE_POLICIES:
        raise ValueError(f"no_face: '{no_face}' is not one of {', '.join(NO_FACE_POLICIES)}")
    if border not in BORDERS:
        raise ValueError(f"border: '{border}' is not one of {', '.join(BORDERS)}")
    if not 8 <= int(size) <= 8192:
        raise ValueError(f"size: {size} must be between 8 and 8192")
    size = int(size)
    if not factor > 0:
        raise ValueError(f"factor: must be above 0, got {factor}")
    if mask is None and mask_source not in MASK_SOURCES:
        raise ValueError(f"mask_source: '{mask_source}' is not one of {', '.join(MASK_SOURCES)}")

    rgb = as_rgb(images, "image")
    batch, height, width, _ = rgb.shape
    external = None if mask is None else as_mask(mask, batch, height, width, "mask")

    crops, infos, kept = [], FaceInfoList(), []
    for b in range(batch):
        detections = analysis.detect(to_uint8(rgb[b]))
        chosen = pick_detection(detections, order, index)
        info = FaceInfo(source_index=b, image_size=(width, height), backend=analysis.name, found=chosen is not None,
                        crop_size=size)
        info.boxes = _stack([d.box for d in detections], (0, 4))
        info.scores = _stack([d.score for d in detections], (0,))
        if chosen is None:
            what = (f"no face found in image {b} of {batch} ({width}x{height}) by {analysis.name}" if not detections
                    else f"image {b} of {batch} has {len(detections)} face(s), so there is no face at index {index}")
            if no_face == "error":
                raise NoFaceError(f"Face Crop: {what}. Set no_face to 'original', 'whole_image' or 'skip' to let "
                                  "the batch continue, or lower det_thresh on the loader.")
            log.warning("Likeness Face Crop: %s -> no_face policy '%s'", what, no_face)
            info.policy = no_face
            if no_face == "skip":
                if progress:
                    progress(b + 1, batch)
                continue
            if no_face == "original":
                info.window, fill = letterbox_window(width, height), "constant"
            else:
                info.window, fill = whole_image_window(width, height), "shift"
            crops.append(crop_window(rgb[b:b + 1], info.window, size, fill))
        else:
            info.box = np.asarray(chosen.box, np.float32)
            info.score = chosen.score
            info.kps = None if chosen.kps is None else np.asarray(chosen.kps, np.float32)
            info.window = face_window(chosen.box, factor, width, height, border)
            crops.append(crop_window(rgb[b:b + 1], info.window, size, border))
        infos.append(info)
        kept.append(b)
        if progress:
            progress(b + 1, batch)
    if not crops:
        raise NoFaceError(f"Face Crop: no face in any of the {batch} image(s) and no_face is 'skip', so nothing is "
                          "left to output. Use 'original' or 'whole_image' to keep them.")
    out = torch.cat(crops, dim=0)
    if external is not None:
        masks = torch.cat([crop_mask_window(external[b:b + 1], info.window, size) for b, info in zip(kept, infos)])
    else:
        masks = face_region_masks(out, infos, mask_source)
    log.info("Likeness Face Crop (%s, factor %.2f, %dpx):\n%s", analysis.name, factor, size, infos.summary())
    return FaceCrops(out, masks, infos)


def _stack(values, empty_shape):
    return np.asarray(values, dtype=np.float32) if values else np.zeros(empty_shape, np.float32)
