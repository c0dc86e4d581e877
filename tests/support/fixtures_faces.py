"""Test-time face models and fixtures: tiny insightface packs written as ONNX files, the astronaut photo.

Nothing here is downloaded. The packs go through insightface's real code (FaceAnalysis routing, SCRFD
post-processing, ArcFaceONNX); only their weights are random:
- a "centre" SCRFD-shaped detector (fixed 640 input, like an exported static SCRFD): random conv heads plus a
  constant prior that makes exactly one anchor, at the canvas centre, fire with a plausible box and five
  landmarks, so at det_thresh 0.5 it "finds" one centred face in any image whose centre is not dark (its score
  grows with the brightness of the centre cell; a black image has no face);
- a "random" SCRFD-shaped detector with a dynamic input size (as the real det_10g has) and no prior;
- an ArcFace recognizer: a tiny random IResNet (written below from docs/methods/faces.md, independently of the
  pack's faces/iresnet.py) exported with torch.onnx.export, or the same weights written node by node with
  onnx.helper in the mxnet-era layout (in-graph Sub/Mul normalisation, unfolded BN, MatMul + Add).
"""
import os

import numpy as np
import pytest
import torch
from torch import nn

DET_SIZE = 640
STRIDES = (8, 16, 32)
HEADS = {"score": 1, "bbox": 4, "kps": 10}     # values per anchor; 2 anchors per location
# the face the centre detector reports, in 640-canvas pixels
CENTRE = (320.0, 320.0)
CENTRE_BOX = (224.0, 200.0, 416.0, 440.0)
CENTRE_KPS = ((285.0, 300.0), (355.0, 300.0), (320.0, 340.0), (290.0, 385.0), (350.0, 385.0))
BRIGHTNESS = 4.0


# --- detectors ---------------------------------------------------------------------------------------
def write_tiny_scrfd(path: str, mode: str = "centre", seed: int = 0):
    """An SCRFD-shaped ONNX detector: 9 outputs (score/bbox/kps for strides 8/16/32, 2 anchors each)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    dynamic = mode == "random"
    side = DET_SIZE
    nodes, inits, outputs = [], [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))

    for kind, k in HEADS.items():
        for s in STRIDES:
            n = f"{kind}_{s}"
            std = 0.01 if kind == "score" else 0.002
            weight = rng.normal(0, std, (2 * k, 3, s, s))
            if kind == "score" and s == 32 and mode == "centre":
                weight += BRIGHTNESS / (3 * s * s)   # + mean brightness of the cell, in [-4, 4]
            const(n + "_w", weight.astype(np.float32))
            const(n + "_b", np.full(2 * k, -6.0 if kind == "score" else 0.0, np.float32))
            const(n + "_shape", np.array([-1, k], np.int64))
            nodes += [helper.make_node("Conv", ["input.1", n + "_w", n + "_b"], [n + "_c"], strides=[s, s], kernel_shape=[s, s]),
                      helper.make_node("Transpose", [n + "_c"], [n + "_t"], perm=[0, 2, 3, 1]),
                      helper.make_node("Reshape", [n + "_t", n + "_shape"], [n + "_r"])]
            last = n + "_r"
            if mode == "centre":
                cells = side // s
                prior = np.zeros(((cells * cells) * 2, k), np.float32)
                if s == 32:
                    row = col = cells // 2
                    i = (row * cells + col) * 2        # anchor 0 of the centre cell (insightface's anchor order)
                    cx, cy = col * s, row * s
                    if kind == "score":
                        prior[i] = 9.0   # -6 + 9 + brightness: a face unless the centre cell is dark
                    elif kind == "bbox":
                        x1, y1, x2, y2 = CENTRE_BOX
                        prior[i] = [(cx - x1) / s, (cy - y1) / s, (x2 - cx) / s, (y2 - cy) / s]
                    else:
                        prior[i] = [v for x, y in CENTRE_KPS for v in ((x - cx) / s, (y - cy) / s)]
                const(n + "_prior", prior)
                nodes.append(helper.make_node("Add", [last, n + "_prior"], [n + "_p"]))
                last = n + "_p"
            if kind == "score":
                nodes.append(helper.make_node("Sigmoid", [last], [n]))
            else:
                nodes.append(helper.make_node("Identity", [last], [n]))
            rows = "anchors" if dynamic else (side // s) ** 2 * 2
            outputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, [rows, k]))
    dims = [1, 3, "height", "width"] if dynamic else [1, 3, side, side]
    graph = helper.make_graph(nodes, f"tiny_scrfd_{mode}", [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, dims)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


# --- recognizer: an IResNet written from the spec, independent of faces/iresnet.py --------------------
class _RefBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2, self.prelu = nn.BatchNorm2d(cout), nn.PReLU(cout)
        self.conv2, self.bn3 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.down is None else self.down(x))


class RefIResNet(nn.Module):
    def __init__(self, layers=(1, 2, 1, 1), widths=(8, 8, 16, 16), embedding=512):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
        blocks, cin = [], widths[0]
        for n, w in zip(layers, widths):
            for j in range(n):
                blocks.append(_RefBlock(cin, w, 2 if j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head_bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin * 7 * 7, embedding)
        self.features = nn.BatchNorm1d(embedding)

    def forward(self, x):
        return self.features(self.fc(torch.flatten(self.head_bn(self.blocks(self.stem(x))), 1)))


def random_ref_iresnet(seed=0, **kw) -> RefIResNet:
    g = torch.Generator().manual_seed(seed)
    net = RefIResNet(**kw)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (m.weight[0].numel() ** -0.5))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.05)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.1 + 0.2 * torch.rand(m.weight.shape, generator=g))
    return net.eval()


def write_tiny_arcface(path: str, seed: int = 0, **kw) -> RefIResNet:
    """Export a random tiny IResNet the way arcface_torch models are exported (torch.onnx, eval mode, constant
    folding: BN after a Conv is folded into it). Returns the torch reference."""
    import warnings

    net = random_ref_iresnet(seed, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), path, input_names=["input.1"], output_names=["embedding"],
                          dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=11,
                          do_constant_folding=True, dynamo=False)
    return net


def write_mxnet_style_arcface(path: str, net: RefIResNet, conv_bias: bool = False):
    """The same network as one graph in the mxnet-era layout: it normalises its own input (so insightface feeds
    it raw 0..255 pixels), keeps every BN separate and uses MatMul + Add for the embedding layer.
    conv_bias: give every Conv a random bias as well (then the graph no longer equals `net`)."""
    rng = np.random.default_rng(99)
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    count = [0]

    def const(arr):
        count[0] += 1
        name = f"c{count[0]}"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name))
        return name

    def op(kind, inputs, name=None, **attrs):
        count[0] += 1
        out = f"t{count[0]}"
        nodes.append(helper.make_node(kind, inputs, [out], name=name or f"{kind.lower()}{count[0]}", **attrs))
        return out

    def bn(x, m):
        return op("BatchNormalization", [x, const(m.weight.detach()), const(m.bias.detach()), const(m.running_mean),
                                         const(m.running_var)], epsilon=m.eps)

    def conv(x, m):
        k, s = m.kernel_size[0], m.stride[0]
        inputs = [x, const(m.weight.detach())]
        if conv_bias:
            inputs.append(const(rng.normal(0, 0.1, m.weight.shape[0])))
        return op("Conv", inputs, kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4)

    x = op("Sub", ["data", const(np.full((1, 3, 1, 1), 127.5))], name="_minusscalar0")
    x = op("Mul", [x, const(np.full((1, 3, 1, 1), 1 / 127.5))], name="_mulscalar0")
    conv0, bn0, pr0 = net.stem
    x = op("PRelu", [bn(conv(x, conv0), bn0), const(pr0.weight.detach().reshape(-1, 1, 1))])
    for b in net.blocks:
        y = bn(conv(op("PRelu", [bn(conv(bn(x, b.bn1), b.conv1), b.bn2), const(b.prelu.weight.detach().reshape(-1, 1, 1))]),
                    b.conv2), b.bn3)
        short = x if b.down is None else bn(conv(x, b.down[0]), b.down[1])
        x = op("Add", [y, short])
    x = op("Flatten", [bn(x, net.head_bn)], axis=1)
    x = op("Add", [op("MatMul", [x, const(net.fc.weight.detach().T)]), const(net.fc.bias.detach())])
    out = bn(x, net.features)
    nodes.append(helper.make_node("Identity", [out], ["fc1"]))
    graph = helper.make_graph(nodes, "mxnet_style_arcface",
                              [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])],
                              [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def write_pack(folder: str, detector: str | None = "centre", recognizer: str | None = "torch", seed: int = 0):
    """A tiny insightface pack in `folder` (created). Returns the torch reference of the recognizer, if any."""
    os.makedirs(folder, exist_ok=True)
    if detector:
        write_tiny_scrfd(os.path.join(folder, "det_10g.onnx"), detector, seed)
    net = None
    if recognizer == "torch":
        net = write_tiny_arcface(os.path.join(folder, "w600k_r50.onnx"), seed)
    elif recognizer == "mxnet":
        net = random_ref_iresnet(seed)
        write_mxnet_style_arcface(os.path.join(folder, "glintr100.onnx"), net)
    return net


def insightface_root(base_dir: str) -> str:
    return os.path.join(base_dir, "models", "insightface")


# --- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_packs(base_dir):
    """Packs under the host's models/insightface: name -> torch reference recognizer (or None)."""
    models = os.path.join(insightface_root(base_dir), "models")
    refs = {
        "likeness_centre": write_pack(os.path.join(models, "likeness_centre"), "centre", "torch", seed=1),
        "likeness_random": write_pack(os.path.join(models, "likeness_random"), "random", "torch", seed=2),
        "likeness_mxnet": write_pack(os.path.join(models, "likeness_mxnet"), "centre", "mxnet", seed=3),
        "likeness_detonly": write_pack(os.path.join(models, "likeness_detonly"), "centre", None, seed=4),
        # the antelopev2-zip mistake: files one folder too deep
        "likeness_nested": write_pack(os.path.join(models, "likeness_nested", "likeness_nested"), "centre", None, seed=5),
    }
    os.makedirs(os.path.join(models, "likeness_empty"), exist_ok=True)
    return refs


@pytest.fixture(scope="session")
def astronaut():
    """scikit-image's astronaut (NASA, public domain) as a ComfyUI IMAGE (1, 512, 512, 3)."""
    from skimage import data
    return torch.from_numpy(np.asarray(data.astronaut())).float().div(255.0)[None]


@pytest.fixture(scope="session")
def coffee():
    """A photo without a face (scikit-image's coffee cup, CC0)."""
    from skimage import data
    return torch.from_numpy(np.asarray(data.coffee())).float().div(255.0)[None]
