"""IResNet, the ArcFace backbone (docs/methods/faces.md, after deepinsight/insightface arcface_torch's iresnet.py
as described there): written here from that description, with the same module names so its state dict keys
are conv1, bn1, prelu, layer1-4.k.{bn1, conv1, bn2, prelu, conv2, bn3, downsample.0/1}, bn2, fc, features.

widths may be narrower than (64, 128, 256, 512); tests use that for tiny random models."""
import torch
from torch import nn

DEPTHS = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3), "r200": (6, 26, 60, 6)}
WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the identity or a 1x1 conv + BN shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + shortcut


class IResNet(nn.Module):
    """(B, 3, input_size, input_size) normalised to [-1, 1] -> (B, embedding_size) un-normalised embedding."""

    def __init__(self, layers=DEPTHS["r50"], widths=WIDTHS, embedding_size: int = 512, input_size: int = 112):
        super().__init__()
        layers, widths = tuple(int(v) for v in layers), tuple(int(v) for v in widths)
        if len(layers) != 4 or len(widths) != 4 or min(layers) < 1 or min(widths) < 1:
            raise ValueError(f"IResNet has 4 stages: got layers {layers}, widths {widths}")
        if input_size % 16:
            raise ValueError(f"input_size {input_size} must be a multiple of 16 (four stride-2 stages)")
        self.layers, self.widths = layers, widths
        self.embedding_size, self.input_size = int(embedding_size), int(input_size)
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for i, (count, planes) in enumerate(zip(layers, widths)):
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=BN_EPS))
            blocks = [IBasicBlock(inplanes, planes, 2, downsample)] + [IBasicBlock(planes, planes) for _ in range(count - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        side = input_size // 16
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(widths[-1] * side * side, self.embedding_size)
        self.features = nn.BatchNorm1d(self.embedding_size, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False   # frozen at 1 in arcface_torch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))

    def config(self) -> dict:
        return {"layers": list(self.layers), "widths": list(self.widths), "embedding_size": self.embedding_size,
                "input_size": self.input_size}
