"""The Taming Encoder's object embedding: o = f_o(x * m), a frozen CLIP image encoder on the background-removed
subject (Taming Encoder §3.1, §3.3; docs/methods/taming-encoder.md).

The subject image is composited over a flat background with its mask (1 = subject), cut to a square around the
subject (or letterboxed / centre-cropped), resized to the tower's input size, and encoded by the host's CLIP
vision model. The embedding keeps the tower's penultimate hidden states (all tokens, before the post-LayerNorm),
which is what the adapter's projection reads; it does not depend on any adapter, so one embedding serves every
adapter trained on the same CLIP vision model.
"""
import logging
from dataclasses import dataclass, field

import torch

from .taming_encoder import VisionSpec

log = logging.getLogger("likeness")

BACKGROUNDS = {"black": 0.0, "white": 1.0, "gray": 0.5}
CROPS = ("subject box", "pad to square", "center")
MIN_SIDE = 16


@dataclass
class ObjectEmbedding:
    """CLIP-vision tokens of one or more images of a subject (the LIKENESS_OBJECT_EMBEDS type)."""
    features: torch.Tensor          # (images, tokens, hidden) float32, CPU
    vision: VisionSpec
    subject: torch.Tensor | None = None   # (images, size, size, 3) the pixels the encoder saw, for previews
    info: dict = field(default_factory=dict)

    @property
    def images(self) -> int:
        return int(self.features.shape[0])

    def describe(self) -> str:
        return f"{self.images} image(s) encoded with {self.vision.describe()}"

    def appended(self, other: "ObjectEmbedding", name: str = "add_to") -> "ObjectEmbedding":
        """This embedding's photos followed by other's (photos of different sizes, encoded one by one)."""
        if not self.vision.matches(other.vision):
            raise ValueError(f"{name} was encoded with {self.vision.describe()} but this clip_vision is "
                             f"{other.vision.describe()}: photos of one subject must be encoded with one CLIP vision model")
        subject = other.subject
        if self.subject is not None and other.subject is not None and self.subject.shape[1:] == other.subject.shape[1:]:
            subject = torch.cat([self.subject, other.subject])   # one tower, one input size: the previews stack
        per_photo = list(self.info.get("photos", [self.info])) + list(other.info.get("photos", [other.info]))
        return ObjectEmbedding(features=torch.cat([self.features, other.features]), vision=self.vision,
                               subject=subject, info={**other.info, "photos": per_photo})


def rgb_images(image, name="image") -> torch.Tensor:
    """IMAGE (B, H, W, C) with 1, 3 or 4 channels -> float RGB in [0, 1]."""
    if not torch.is_tensor(image) or image.ndim != 4:
        raise ValueError(f"{name} must be an IMAGE batch (batch, height, width, channels); got "
                         f"{tuple(image.shape) if torch.is_tensor(image) else type(image).__name__}")
    b, h, w, c = image.shape
    if b == 0:
        raise ValueError(f"{name} is an empty batch")
    if c == 1:
        image = image.repeat(1, 1, 1, 3)
    elif c == 4:
        image = image[..., :3]
    elif c != 3:
        raise ValueError(f"{name} has {c} channels; expected RGB (3), RGBA (4) or greyscale (1)")
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"{name} is only {w}x{h} pixels; the subject needs at least {MIN_SIDE}x{MIN_SIDE}")
    return image.float().clamp(0.0, 1.0)


def subject_masks(mask, batch: int, height: int, width: int, name="mask") -> torch.Tensor:
    """MASK (H, W) or (B|1, H, W) -> (batch, height, width) in [0, 1], resized to the image if needed."""
    if not torch.is_tensor(mask) or mask.ndim not in (2, 3):
        raise ValueError(f"{name} must be a MASK (height, width) or (batch, height, width)")
    mask = (mask[None] if mask.ndim == 2 else mask).float()
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"{name} has {mask.shape[0]} masks for {batch} images; give one mask, or one per image")
    if tuple(mask.shape[1:]) != (height, width):
        log.info("Likeness Taming Encoder: resizing the %dx%d mask to the %dx%d image", mask.shape[2], mask.shape[1],
                 width, height)
        mask = torch.nn.functional.interpolate(mask[:, None], size=(height, width), mode="bilinear",
                                               align_corners=False)[:, 0]
    mask = mask.clamp(0.0, 1.0).expand(batch, -1, -1)
    for i in range(batch):
        if float(mask[i].max()) <= 1e-3:
            raise ValueError(
                f"{name} {i} is empty (no subject pixels). White marks the subject: paint it in the mask editor "
                "(Load Image > Open in MaskEditor), take the mask of Face Crop, or leave the mask unconnected to "
                "encode the whole image")
    return mask


def subject_box(mask: torch.Tensor) -> tuple:
    """(top, left, bottom, right) of the pixels where the mask is at least half on (else where it is non-zero)."""
    on = mask >= 0.5
    if not bool(on.any()):
        on = mask > 1e-3
    rows = torch.nonzero(on.any(dim=1)).reshape(-1)
    cols = torch.nonzero(on.any(dim=0)).reshape(-1)
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def square_window(box: tuple, margin: float) -> tuple:
    """A square (top, left, side) centred on box, side = the box's longer side * (1 + 2 * margin)."""
    top, left, bottom, right = box
    side = max(bottom - top, right - left)
    side = max(1, int(round(side * (1.0 + 2.0 * margin))))
    cy, cx = (top + bottom) / 2.0, (left + right) / 2.0
    return int(round(cy - side / 2.0)), int(round(cx - side / 2.0)), side


def cut_square(image: torch.Tensor, top: int, left: int, side: int, fill: float) -> torch.Tensor:
    """(H, W, 3) -> (side, side, 3); the part outside the image is the background colour."""
    h, w = image.shape[:2]
    out = torch.full((side, side, image.shape[2]), fill, dtype=image.dtype)
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(h, top + side), min(w, left + side)
    if y1 > y0 and x1 > x0:
        out[y0 - top:y1 - top, x0 - left:x1 - left] = image[y0:y1, x0:x1]
    return out


def resize_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(S, S, 3) -> (size, size, 3), bicubic with antialiasing (as the host's CLIP preprocessing)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    x = image.movedim(-1, 0)[None]
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x[0].movedim(0, -1).clamp(0.0, 1.0)


def prepare_subject(image, mask=None, size: int = 224, background: str = "black", crop: str = "subject box",
                    margin: float = 0.1) -> tuple:
    """x * m over a flat background, squared and resized: (pixels (B, size, size, 3), windows [(top, left, side)])."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {', '.join(BACKGROUNDS)} (got {background!r})")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)} (got {crop!r})")
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must be between 0 and 1 (got {margin})")
    image = rgb_images(image)
    b, h, w, _ = image.shape
    fill = BACKGROUNDS[background]
    masks = None
    if mask is not None:
        masks = subject_masks(mask, b, h, w)
        image = image * masks[..., None] + fill * (1.0 - masks[..., None])
    elif crop == "subject box":
        log.info("Likeness Taming Encoder: no mask connected; encoding the whole image (letterboxed)")
        crop = "pad to square"
    pixels, windows = [], []
    for i in range(b):
        if crop == "subject box":
            window = square_window(subject_box(masks[i]), margin)
        elif crop == "pad to square":
            side = max(h, w)
            window = ((h - side) // 2, (w - side) // 2, side)
        else:
            side = min(h, w)
            window = ((h - side) // 2, (w - side) // 2, side)
        pixels.append(resize_square(cut_square(image[i], *window, fill), size))
        windows.append(window)
    return torch.stack(pixels), windows


def encode_object(clip_vision, image, mask=None, background: str = "black", crop: str = "subject box",
                  margin: float = 0.1) -> ObjectEmbedding:
    """o = f_o(x * m): the host's CLIP vision model on the prepared subject; keeps the penultimate hidden states."""
    if clip_vision is None or not hasattr(clip_vision, "encode_image"):
        raise ValueError("clip_vision must be a CLIP_VISION model (Load CLIP Vision)")
    vision = VisionSpec.of_clip_vision(clip_vision)
    pixels, windows = prepare_subject(image, mask, vision.image_size, background, crop, margin)
    out = clip_vision.encode_image(pixels, crop=False)
    features = out["penultimate_hidden_states"]
    if features is None or features.ndim != 3:
        raise ValueError("clip_vision gave no per-token hidden states; the Taming Encoder needs a CLIP vision "
                         "transformer (ViT-L/14, ViT-H/14, ...)")
    features = features.float().cpu()
    if tuple(features.shape[1:]) != (vision.tokens, vision.hidden_size):
        vision = VisionSpec(int(features.shape[-1]), int(features.shape[1]), vision.layers, vision.image_size)
    info = {"background": background, "crop": crop, "margin": float(margin), "masked": mask is not None,
            "windows": [list(w) for w in windows]}
    return ObjectEmbedding(features=features, vision=vision, subject=pixels.float().cpu(), info=info)
