"""Training data: a folder of images with optional captions and identity ids.

Layouts (scan_images(root, layout=...)):
  folder     every image under root (recursive). Captions: a sidecar file with the same stem and '.txt' (one
             caption per line; a random line is used per sample). Identities: the first-level sub-folder
             (root/<identity>/*.jpg), or a CSV (columns file,identity; file relative to root) given with
             identities=..., which overrides the folders. Images directly in root have no identity.
  ffhq       FFHQ as distributed (images1024x1024/00000/00000.png ..., or thumbnails128x128/...; also a flat
             folder such as ProFusion's pre-processed 512 copy). The 1000-image sub-folders are NOT identities:
             every image is its own identity. FFHQ has no captions unless sidecar .txt files are added.
  celebahq   CelebA-HQ as distributed with CelebAMask-HQ: root/CelebA-HQ-img/<idx>.jpg (or root itself holding
             0.jpg ... 29999.jpg). Identities come from CelebA: root/CelebA-HQ-to-CelebA-mapping.txt (columns
             idx orig_idx orig_file) joined with CelebA's identity_CelebA.txt (lines '<orig_file> <identity>'),
             when both are there. Captions: root/celeba-caption/<idx>.txt (MM-CelebA-HQ / Multi-Modal-CelebA-HQ:
             ten captions per image, one per line) or sidecar .txt files.
Items are dicts: "image" (H, W, 3) float in [0, 1] (ComfyUI's IMAGE layout, one image), "caption" (str),
"identity" (int, -1 when unknown), "index" (int), and "other" (the index of another image of the same identity,
or -1): the Taming Encoder's cross-reference needs it. Random choices (crop, flip, caption line, other image)
come from a generator seeded by (seed, epoch, index), so a resumed run sees the same data.
"""
import csv
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger("likeness.train")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LAYOUTS = ("folder", "ffhq", "celebahq")
CROPS = ("center", "random")


@dataclass(frozen=True)
class Record:
    path: str
    captions: tuple = ()
    identity: str | None = None


def _images_under(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTS) and not name.startswith("."):
                out.append(os.path.join(dirpath, name))
    return out


def _read_captions(path: str) -> tuple:
    if not os.path.isfile(path):
        return ()
    with open(path, encoding="utf-8") as f:
        return tuple(line.strip() for line in f if line.strip())


def _sidecar_captions(image_path: str) -> tuple:
    return _read_captions(os.path.splitext(image_path)[0] + ".txt")


def read_identity_csv(path: str, root: str) -> dict:
    """{absolute image path: identity} from a CSV with columns file,identity (a header row is optional)."""
    out = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "identity"]:
        rows = rows[1:]
    for i, row in enumerate(rows):
        if not row or not row[0].strip():
            continue
        if len(row) < 2:
            raise ValueError(f"identities CSV '{path}', row {i + 1}: expected 'file,identity', got {row}")
        out[os.path.normpath(os.path.join(root, row[0].strip()))] = row[1].strip()
    return out


def _scan_folder(root: str, identities_csv: str | None) -> list[Record]:
    paths = _images_under(root)
    by_csv = read_identity_csv(identities_csv, root) if identities_csv else None
    records = []
    for p in paths:
        rel = os.path.relpath(p, root)
        if by_csv is not None:
            identity = by_csv.get(os.path.normpath(p))
        else:
            parts = rel.split(os.sep)
            identity = parts[0] if len(parts) > 1 else None
        records.append(Record(p, _sidecar_captions(p), identity))
    return records


def _scan_ffhq(root: str) -> list[Record]:
    return [Record(p, _sidecar_captions(p), os.path.splitext(os.path.relpath(p, root))[0]) for p in _images_under(root)]


def _celebahq_identities(root: str) -> dict:
    mapping = os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt")
    ids = os.path.join(root, "identity_CelebA.txt")
    if not (os.path.isfile(mapping) and os.path.isfile(ids)):
        return {}
    identity_of = {}
    with open(ids, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2:
                identity_of[parts[0]] = parts[1]
    out = {}
    with open(mapping, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3 or not parts[0].isdigit():
                continue  # header
            if parts[2] in identity_of:
                out[parts[0]] = identity_of[parts[2]]
    return out


def _scan_celebahq(root: str) -> list[Record]:
    folder = next((os.path.join(root, d) for d in ("CelebA-HQ-img", os.path.join("CelebAMask-HQ", "CelebA-HQ-img"))
                   if os.path.isdir(os.path.join(root, d))), root)
    identities = _celebahq_identities(root)
    captions_dir = os.path.join(root, "celeba-caption")
    records = []
    for p in _images_under(folder):
        stem = os.path.splitext(os.path.basename(p))[0]
        captions = _read_captions(os.path.join(captions_dir, stem + ".txt")) or _sidecar_captions(p)
        records.append(Record(p, captions, identities.get(stem)))
    return records


def scan_images(root: str, layout: str = "folder", identities: str | None = None) -> list[Record]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data: '{root}' is not a folder")
    if identities and not os.path.isfile(identities):
        raise FileNotFoundError(f"identities: '{identities}' does not exist")
    if layout == "ffhq":
        records = _scan_ffhq(root)
    elif layout == "celebahq":
        records = _scan_celebahq(root)
    else:
        records = _scan_folder(root, identities)
    if not records:
        raise ValueError(f"data: no images ({', '.join(IMAGE_EXTS)}) under '{root}'")
    log.info("Likeness trainer: %d images in %s (%s layout, %d with captions, %d identities)", len(records), root,
             layout, sum(1 for r in records if r.captions), len({r.identity for r in records if r.identity}))
    return records


def load_image(path: str) -> torch.Tensor:
    """(H, W, 3) float in [0, 1]; alpha is composited over black, grey is repeated, EXIF rotation applied."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (0, 0, 0, 255))
            im = Image.alpha_composite(background, im)
        im = im.convert("RGB")
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def square_resize(image: torch.Tensor, size: int, crop: str = "center", generator: random.Random | None = None,
                   flip: bool = False) -> tuple[torch.Tensor, tuple]:
    """(H, W, 3) -> (size, size, 3): a square cut (centred or random) resized with antialiasing, optionally
    mirrored. Returns the image and (top, left, side, flipped) so points can follow it."""
    h, w = image.shape[:2]
    side = min(h, w)
    if crop == "random" and generator is not None:
        top, left = generator.randint(0, h - side), generator.randint(0, w - side)
    else:
        top, left = (h - side) // 2, (w - side) // 2
    x = image[top:top + side, left:left + side].permute(2, 0, 1)[None]
    if side != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x[0].permute(1, 2, 0).clamp(0, 1)
    flipped = bool(flip and generator is not None and generator.random() < 0.5)
    if flipped:
        x = x.flip(1)
    return x.contiguous(), (top, left, side, flipped)


class ImageDataset(torch.utils.data.Dataset):
    """Records -> training items (see the module docstring)."""

    def __init__(self, records: list[Record], resolution: int = 512, crop: str = "center", flip: bool = False,
                 default_caption: str = "", seed: int = 0):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)} (got {crop!r})")
        if resolution < 8 or resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 (got {resolution})")
        self.records, self.resolution, self.crop, self.flip = list(records), int(resolution), crop, flip
        self.default_caption, self.seed, self.epoch = default_caption, int(seed), 0
        names = sorted({r.identity for r in self.records if r.identity is not None})
        self.identity_ids = {name: i for i, name in enumerate(names)}
        self.members = {}
        for i, r in enumerate(self.records):
            if r.identity is not None:
                self.members.setdefault(self.identity_ids[r.identity], []).append(i)

    def __len__(self):
        return len(self.records)

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def rng(self, index: int) -> random.Random:
        return random.Random(hash((self.seed, self.epoch, int(index))) & 0xFFFFFFFF)

    def other_of(self, index: int, rng: random.Random) -> int:
        r = self.records[index]
        if r.identity is None:
            return -1
        others = [i for i in self.members[self.identity_ids[r.identity]] if i != index]
        return rng.choice(others) if others else -1

    def caption_of(self, index: int, rng: random.Random) -> str:
        captions = self.records[index].captions
        return rng.choice(captions) if captions else self.default_caption

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        r = self.records[index]
        image, _ = square_resize(load_image(r.path), self.resolution, self.crop, rng, self.flip)
        identity = self.identity_ids.get(r.identity, -1) if r.identity is not None else -1
        return {"image": image, "caption": self.caption_of(index, rng), "identity": identity, "index": index,
                "other": self.other_of(index, rng)}


def collate(items: list[dict]) -> dict:
    """Tensors are stacked, numbers become tensors, everything else becomes a list."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if torch.is_tensor(values[0]):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (int, float, bool)) and not isinstance(values[0], str):
            out[key] = torch.tensor(values)
        else:
            out[key] = values
    return out
