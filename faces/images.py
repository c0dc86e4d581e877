"""ComfyUI IMAGE / MASK tensors in, the forms the detectors want out.

IMAGE is (B, H, W, C) float in [0, 1]; C is usually 3, but loaders and other packs also hand over RGBA (4),
grayscale (1) and gray+alpha (2). Everything here returns RGB; alpha is dropped (the crop is an RGB IMAGE
like every core node expects)."""
import numpy as np
import torch


def as_rgb(images, name: str = "image") -> torch.Tensor:
    """A (B, H, W, 3) float32 copy in [0, 1]; raises ValueError naming `name` for anything else."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: expected an IMAGE tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise ValueError(f"{name}: expected an IMAGE of shape (batch, height, width, channels), got {tuple(images.shape)}")
    b, h, w, c = images.shape
    if b == 0:
        raise ValueError(f"{name}: the image batch is empty")
    if h < 1 or w < 1:
        raise ValueError(f"{name}: the image has no pixels ({h}x{w})")
    if c not in (1, 2, 3, 4):
        raise ValueError(f"{name}: {c} channels is not an image (expected 1, 2, 3 or 4; is this a latent or a mask?)")
    images = images.detach().to(device="cpu", dtype=torch.float32)
    if c in (1, 2):       # gray or gray+alpha
        images = images[..., :1].expand(b, h, w, 3)
    elif c == 4:          # RGBA: drop alpha
        images = images[..., :3]
    images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
    return images.clamp(0.0, 1.0).contiguous()


def to_uint8(image_hw3: torch.Tensor) -> np.ndarray:
    """One RGB image (H, W, 3) in [0, 1] -> contiguous uint8 numpy array (what OpenCV/mediapipe take)."""
    return np.ascontiguousarray((image_hw3.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy())


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(torch.float32) / 255.0


def as_mask(mask, batch: int, height: int, width: int, name: str = "mask") -> torch.Tensor:
    """A MASK input checked against the image it belongs to: (B, H, W) float in [0, 1] on the CPU.

    A single mask is used for every image of the batch; any other batch size or a different resolution is an
    error (a mask made for another image would silently cut out the wrong region)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name}: expected a MASK tensor, got {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3:
        raise ValueError(f"{name}: expected a MASK of shape (batch, height, width), got {tuple(mask.shape)}")
    if tuple(mask.shape[1:]) != (height, width):
        raise ValueError(f"{name}: the mask is {mask.shape[2]}x{mask.shape[1]} but the image is {width}x{height}; "
                         "connect a mask made for this image")
    if mask.shape[0] not in (1, batch):
        raise ValueError(f"{name}: {mask.shape[0]} masks for {batch} images; give one mask or one per image")
    mask = mask.detach().to(device="cpu", dtype=torch.float32)
    return torch.nan_to_num(mask).clamp(0, 1).expand(batch, height, width).contiguous()
