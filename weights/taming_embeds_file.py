"""Object embeddings of the Taming Encoder saved for reuse (safetensors, models/likeness_identities).

Keys: features (images, tokens, hidden) float32 (the CLIP vision tower's penultimate hidden states of the masked
subject), subject (images, size, size, 3) uint8 (what the tower saw; for previews).
Metadata: likeness_format "likeness.object_embeds", version 1, method, vision {hidden_size, tokens, layers,
image_size}, info (background, crop, margin, masked).
Features stay float32 (about 1 MB per ViT-L image), so a loaded embedding gives exactly the image the encoded one gave.
"""
import os

import torch

from ..encoders.taming_encoder import VisionSpec
from ..encoders.taming_object import ObjectEmbedding
from .safetensors_file import WeightFileError, load_file, register_format, save_file

FORMAT = "likeness.object_embeds"
VERSION = 1
WHAT = "Taming Encoder object embedding file"
register_format(FORMAT, WHAT)


def save_object_embeds(path: str, embedding: ObjectEmbedding, dtype=torch.float32):
    tensors = {"features": embedding.features.to(dtype)}
    if embedding.subject is not None:
        tensors["subject"] = (embedding.subject.clamp(0, 1) * 255.0).round().to(torch.uint8)
    info = {k: v for k, v in embedding.info.items() if k != "windows"}
    meta = {"method": "taming_encoder", "vision": embedding.vision.to_dict(), "info": info}
    return save_file(path, tensors, FORMAT, VERSION, meta)


def load_object_embeds(path: str) -> ObjectEmbedding:
    name = os.path.basename(path)
    tensors, meta = load_file(path, FORMAT, (VERSION,), WHAT)
    features = tensors.get("features")
    if features is None or features.ndim != 3:
        raise WeightFileError(f"'{name}' has no (images, tokens, width) 'features' tensor; it is damaged")
    extra = sorted(set(tensors) - {"features", "subject"})
    if extra:
        raise WeightFileError(f"'{name}' holds tensors an object embedding does not have ({', '.join(extra[:3])}); "
                              "it is damaged or was edited by hand")
    try:
        vision = VisionSpec.from_dict(meta["vision"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise WeightFileError(f"'{name}' has unreadable CLIP vision metadata ({e}); it is damaged") from e
    if (vision.tokens, vision.hidden_size) != tuple(features.shape[1:]):
        raise WeightFileError(f"'{name}' says its features are {vision.tokens}x{vision.hidden_size} but they are "
                              f"{features.shape[1]}x{features.shape[2]}; it is damaged")
    subject = tensors.get("subject")
    if subject is not None:
        if subject.ndim != 4 or subject.shape[0] != features.shape[0] or subject.shape[-1] != 3:
            raise WeightFileError(f"'{name}' has a 'subject' preview of shape {list(subject.shape)} for "
                                  f"{features.shape[0]} images; it is damaged")
        subject = subject.float() / 255.0
    info = meta.get("info") if isinstance(meta.get("info"), dict) else {}
    return ObjectEmbedding(features=features.float(), vision=vision, subject=subject, info=info)
