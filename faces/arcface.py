"""A differentiable ArcFace for identity losses (PhotoVerse's L_face = 1 - cos(f(x), f(x')), PhotoVerse §2.5;
docs/methods/faces.md): an IResNet converted from insightface's ONNX recognition model, insightface's input
normalisation, and landmark alignment by grid_sample so gradients reach the generated image.

    arcface = load_arcface(".../models/insightface/models/buffalo_l/w600k_r50.onnx")   # or a converted .safetensors
    loss = arcface.identity_loss(x_ref, x_gen, ref_landmarks)   # images (B, 3, H, W) in [0, 1], landmarks (B, 5, 2)

Weights stay frozen and BatchNorm stays in inference mode whatever .train() says; gradients flow to the inputs."""
import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .alignment import align_faces
from .iresnet import IResNet

log = logging.getLogger("likeness.faces")

FORMAT = "likeness.arcface.iresnet"
FORMAT_VERSION = "1"
RECOGNITION_NAMES = ("w600k_r50.onnx", "glintr100.onnx")   # buffalo_l, antelopev2


class ArcFace(nn.Module):
    def __init__(self, net: IResNet, pixel_scale, pixel_bias, source: str = ""):
        super().__init__()
        self.net = net
        self.register_buffer("pixel_scale", torch.as_tensor(pixel_scale, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("pixel_bias", torch.as_tensor(pixel_bias, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.source = source
        self.requires_grad_(False)
        self.eval()

    @property
    def input_size(self) -> int:
        return self.net.input_size

    def train(self, mode: bool = True):
        return super().train(False)   # frozen BatchNorm statistics: this is a fixed metric, not a trainee

    def forward(self, aligned: torch.Tensor) -> torch.Tensor:
        """Aligned RGB faces (B, 3, 112, 112) in [0, 1] -> L2-normalised embeddings (B, D)."""
        if aligned.ndim != 4 or aligned.shape[1] != 3 or aligned.shape[-1] != self.input_size:
            raise ValueError(f"expected aligned faces (batch, 3, {self.input_size}, {self.input_size}), got {tuple(aligned.shape)}")
        dtype = self.pixel_scale.dtype
        x = aligned.to(dtype) * self.pixel_scale + self.pixel_bias
        return F.normalize(self.net(x), dim=-1)

    def embed(self, images: torch.Tensor, landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """RGB images (B, 3, H, W) in [0, 1]; with landmarks (B, 5, 2) in their pixels they are aligned first."""
        if landmarks is not None:
            images = align_faces(images, landmarks, self.input_size)
        return self(images)

    def identity_loss(self, reference: torch.Tensor, generated: torch.Tensor, landmarks: torch.Tensor | None = None):
        """mean(1 - cos(f(reference), f(generated))). Both images are warped with the *reference* landmarks
        (docs/methods/faces.md), so the loss compares the same face region and stays differentiable."""
        if landmarks is not None and reference.shape[-2:] != generated.shape[-2:]:
            raise ValueError(f"reference {tuple(reference.shape[-2:])} and generated {tuple(generated.shape[-2:])} "
                             "images must have the same size to share the reference landmarks")
        a = self.embed(reference, landmarks)
        b = self.embed(generated, landmarks)
        return (1.0 - (a * b).sum(-1)).mean()


def load_arcface(path: str, device="cpu", dtype=torch.float32) -> ArcFace:
    """An insightface recognition .onnx (converted on the fly; needs the onnx package) or a .safetensors
    written by save_arcface."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ArcFace model not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".onnx":
        from .arcface_onnx import convert_onnx_file
        converted = convert_onnx_file(path)
        model = ArcFace(converted.net, converted.pixel_scale, converted.pixel_bias, os.path.basename(path))
    elif ext in (".safetensors", ".sft"):
        model = _load_safetensors(path)
    else:
        raise ValueError(f"{path}: expected an insightface .onnx recognition model or a converted .safetensors "
                         "(pickled .pth/.pt files are not loaded)")
    return model.to(device=device, dtype=dtype)


def save_arcface(model: ArcFace, path: str):
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(model.net.config()),
            "source": model.source}
    save_file(state, path, metadata=meta)


def _load_safetensors(path: str) -> ArcFace:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a converted ArcFace file (metadata format is {meta.get('format')!r}, "
                         f"expected {FORMAT!r}); convert an insightface .onnx with faces.arcface.save_arcface")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: ArcFace file format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    config = json.loads(meta["config"])
    net = IResNet(config["layers"], config["widths"], config["embedding_size"], config["input_size"])
    model = ArcFace(net, torch.zeros(3), torch.zeros(3), meta.get("source", os.path.basename(path)))
    state = load_file(path)
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(f"{path}: ArcFace weights do not match the stored config (missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]})")
    for key, ref in model.state_dict().items():
        if key in state and state[key].shape != ref.shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
    model.load_state_dict(state, strict=False)
    return model


def find_recognition_onnx(folder: str) -> str:
    """The ArcFace model of an insightface pack folder: a known name, else the one .onnx with a square
    112-multiple input and a single output (insightface's own routing rule)."""
    for name in RECOGNITION_NAMES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    from .arcface_onnx import import_onnx
    onnx, _ = import_onnx()
    for path in sorted(os.listdir(folder)):
        if not path.endswith(".onnx"):
            continue
        full = os.path.join(folder, path)
        graph = onnx.load(full, load_external_data=False).graph
        dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
        if len(graph.output) == 1 and len(dims) == 4 and dims[2] == dims[3] and dims[2] >= 112 and dims[2] % 16 == 0:
            return full
    raise FileNotFoundError(f"no ArcFace recognition model in {folder} (expected {' or '.join(RECOGNITION_NAMES)})")


def arcface_from_pack(pack: str, device="cpu", dtype=torch.float32) -> ArcFace:
    """The differentiable ArcFace of an insightface pack in models/insightface/models/<pack>."""
    from .insightface_models import locate_pack
    return load_arcface(find_recognition_onnx(locate_pack(pack).folder), device, dtype)
