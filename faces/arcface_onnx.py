"""Convert insightface's ONNX recognition models (buffalo_l w600k_r50.onnx, antelopev2 glintr100.onnx, any
IResNet-family ArcFace export) into the torch IResNet of iresnet.py.

The graph is walked structurally from its input: optional in-graph input normalisation (Sub/Add/Mul/Div by
constants) -> stem Conv [+BN] -> PRelu -> blocks (BN -> Conv [+BN] -> PRelu -> Conv [+BN], shortcut identity or
1x1 Conv [+BN], Add) -> BN -> Flatten/Reshape -> Gemm or MatMul[+Add] [-> BN] -> output. Exporters fold a BN
that follows a Conv into the Conv's weight and bias; such a bias becomes the bias of an identity BN here, so
the torch module computes the same function. Every node must be accounted for, or conversion fails."""
import logging
from dataclasses import dataclass

import numpy as np
import torch

from .iresnet import BN_EPS, IResNet

log = logging.getLogger("likeness.faces")

PASSTHROUGH = {"Identity", "Dropout"}


class ArcFaceConversionError(ValueError):
    pass


def import_onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except Exception as e:
        from .errors import FaceBackendMissing
        raise FaceBackendMissing(f"the onnx package is needed to read insightface models into PyTorch [{e}]. "
                                 "Install it with: python -m pip install onnx") from e
    return onnx, numpy_helper


@dataclass
class _BN:
    weight: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    @staticmethod
    def identity(channels: int, bias=None):
        # (x - 0) / sqrt((1 - eps) + eps) * 1 + bias == x + bias
        b = np.zeros(channels, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(channels)
        return _BN(np.ones(channels, np.float32), b, np.zeros(channels, np.float32),
                   np.full(channels, 1.0 - BN_EPS, np.float32))

    def put(self, state: dict, prefix: str):
        state[prefix + "weight"] = self.weight
        state[prefix + "bias"] = self.bias
        state[prefix + "running_mean"] = self.mean
        state[prefix + "running_var"] = self.var


@dataclass
class _Block:
    bn1: _BN
    conv1: np.ndarray
    bn2: _BN
    prelu: np.ndarray
    conv2: np.ndarray
    bn3: _BN
    stride: int
    downsample: tuple | None = None   # (conv weight, _BN)


@dataclass
class ConvertedArcFace:
    net: IResNet
    pixel_scale: torch.Tensor          # x_net = x01 * pixel_scale + pixel_bias, per RGB channel
    pixel_bias: torch.Tensor
    input_mean: float                  # what insightface's ArcFaceONNX applies outside the graph
    input_std: float
    source: str = ""


class _Graph:
    def __init__(self, model, source: str):
        onnx, numpy_helper = import_onnx()
        self.source = source
        self._attr = onnx.helper.get_attribute_value
        g = model.graph
        self.consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        self.nodes = []
        for node in g.node:
            if node.op_type == "Constant":
                for a in node.attribute:
                    if a.name == "value":
                        self.consts[node.output[0]] = numpy_helper.to_array(a.t)
                continue
            if node.op_type == "Identity" and node.input[0] in self.consts:
                self.consts[node.output[0]] = self.consts[node.input[0]]
                continue
            self.nodes.append(node)
        self.consumers = {}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1 or len(g.output) != 1:
            self.fail(f"expected one image input and one embedding output, found {len(inputs)} inputs and "
                      f"{len(g.output)} outputs (a detector or another kind of model?)")
        self.input, self.output = inputs[0], g.output[0].name
        self.used = set()

    def fail(self, why: str):
        raise ArcFaceConversionError(f"{self.source}: not an IResNet ArcFace recognition model this converter can "
                                     f"read: {why}")

    def attrs(self, node) -> dict:
        return {a.name: self._attr(a) for a in node.attribute}

    def const(self, name: str, node) -> np.ndarray:
        if name not in self.consts:
            self.fail(f"{node.op_type} node '{node.name}' takes '{name}' as a computed value where a constant "
                      "weight was expected")
        return np.asarray(self.consts[name], dtype=np.float32)

    def take(self, node):
        self.used.add(id(node))
        return node

    def consumers_of(self, tensor: str) -> list:
        out = []
        for node in self.consumers.get(tensor, []):
            if node.op_type in PASSTHROUGH:
                self.take(node)
                out.extend(self.consumers_of(node.output[0]))
            else:
                out.append(node)
        return out

    def one(self, tensor: str, *ops):
        nodes = self.consumers_of(tensor)
        if len(nodes) != 1 or nodes[0].op_type not in ops:
            found = ", ".join(n.op_type for n in nodes) or "nothing (graph output)"
            self.fail(f"after '{tensor}' expected {' or '.join(ops)}, found {found}")
        return self.take(nodes[0])

    def reaches_output(self, tensor: str) -> bool:
        if tensor == self.output:
            return True
        return any(n.op_type in PASSTHROUGH and self.reaches_output(n.output[0]) for n in self.consumers.get(tensor, []))

    # --- building blocks -------------------------------------------------------------------------------
    def bn(self, node) -> _BN:
        if node.op_type != "BatchNormalization":
            self.fail(f"expected BatchNormalization, found {node.op_type} ('{node.name}')")
        w, b, mean, var = (self.const(n, node) for n in node.input[1:5])
        eps = float(self.attrs(node).get("epsilon", 1e-5))
        # the module uses eps 1e-5; moving the difference into the variance keeps (var + eps) unchanged
        return _BN(w, b, mean, (var + eps - BN_EPS).astype(np.float32))

    def conv(self, node, kernel: int, strides=(1, 2)):
        a = self.attrs(node)
        weight = self.const(node.input[1], node)
        k = list(a.get("kernel_shape", weight.shape[2:]))
        stride = list(a.get("strides", [1, 1]))
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if k != [kernel, kernel] or a.get("group", 1) != 1 or list(a.get("dilations", [1, 1])) != [1, 1]:
            self.fail(f"Conv '{node.name}' is {k} (group {a.get('group', 1)}), expected a plain {kernel}x{kernel}")
        if stride[0] != stride[1] or stride[0] not in strides or pads != [kernel // 2] * 4:
            self.fail(f"Conv '{node.name}' has strides {stride} and pads {pads}, which IResNet does not use")
        bias = self.const(node.input[2], node) if len(node.input) > 2 and node.input[2] else None
        return weight, bias, stride[0]

    def conv_bn(self, node, kernel: int, strides=(1, 2)):
        """A Conv and the BN after it (or its folded bias as an identity BN): (weight, _BN, stride, output)."""
        weight, bias, stride = self.conv(node, kernel, strides)
        out = node.output[0]
        after = self.consumers_of(out)
        if len(after) == 1 and after[0].op_type == "BatchNormalization":
            bn = self.bn(self.take(after[0]))
            if bias is not None:   # BN(x + b) == BN'(x) with mean' = mean - b
                bn.mean = (bn.mean - bias).astype(np.float32)
            return weight, bn, stride, after[0].output[0]
        return weight, _BN.identity(weight.shape[0], bias), stride, out

    def prelu(self, node, channels: int) -> np.ndarray:
        slope = self.const(node.input[1], node).reshape(-1)
        if slope.size == 1:
            slope = np.full(channels, slope[0], np.float32)
        if slope.size != channels:
            self.fail(f"PRelu '{node.name}' has {slope.size} slopes for {channels} channels")
        return slope


def _input_normalisation(g: _Graph, tensor: str):
    """Constant Sub/Add/Mul/Div on the input (mxnet-era exports) -> x_model = (x - shift) * scale, per channel."""
    shift, scale = np.zeros(3, np.float64), np.ones(3, np.float64)
    while True:
        nodes = g.consumers_of(tensor)
        if len(nodes) != 1 or nodes[0].op_type not in ("Sub", "Add", "Mul", "Div"):
            return tensor, shift, scale
        node = nodes[0]
        other = [n for n in node.input if n != tensor]
        if len(other) != 1 or other[0] not in g.consts:
            return tensor, shift, scale
        if node.op_type in ("Sub", "Div") and node.input[0] != tensor:   # c - x, c / x: not a normalisation
            return tensor, shift, scale
        c = np.broadcast_to(np.asarray(g.consts[other[0]], np.float64).reshape(-1), (3,))
        if node.op_type == "Sub":
            shift = shift + c / scale
        elif node.op_type == "Add":
            shift = shift - c / scale
        elif node.op_type == "Mul":
            scale = scale * c
        else:
            scale = scale / c
        g.take(node)
        tensor = node.output[0]


def _insightface_input_stats(model) -> tuple:
    """insightface's ArcFaceONNX rule ([AF] arcface_onnx.py): a Sub and a Mul node among the first eight nodes
    mean the graph normalises itself (mean 0, std 1); otherwise it applies mean 127.5, std 127.5."""
    names = [n.name for n in model.graph.node[:8]]
    has_sub = any(n.startswith("Sub") or n.startswith("_minus") for n in names)
    has_mul = any(n.startswith("Mul") or n.startswith("_mul") for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def convert_model(model, source: str = "model.onnx") -> ConvertedArcFace:
    """An onnx.ModelProto of an IResNet ArcFace -> ConvertedArcFace (torch module in eval mode)."""
    g = _Graph(model, source)
    t, shift, scale = _input_normalisation(g, g.input.name)

    stem = g.one(t, "Conv")
    stem_w, stem_bn, _, t = g.conv_bn(stem, 3, strides=(1,))
    stem_pr = g.one(t, "PRelu")
    stem_prelu = g.prelu(stem_pr, stem_w.shape[0])
    t = stem_pr.output[0]

    blocks = []
    while True:
        nodes = g.consumers_of(t)
        if len(nodes) == 1 and nodes[0].op_type == "BatchNormalization":
            break   # the head's BN
        if len(nodes) != 2:
            g.fail(f"after '{t}' expected a residual block (BN + shortcut), found "
                   f"{', '.join(n.op_type for n in nodes) or 'nothing'}")
        main = [n for n in nodes if n.op_type == "BatchNormalization"]
        if len(main) != 1:
            g.fail(f"the block at '{t}' does not start with BatchNormalization")
        main = g.take(main[0])
        side = [n for n in nodes if n is not main][0]
        bn1 = g.bn(main)
        c1 = g.one(main.output[0], "Conv")
        w1, bn2, _, x = g.conv_bn(c1, 3, strides=(1,))
        pr = g.one(x, "PRelu")
        slope = g.prelu(pr, w1.shape[0])
        c2 = g.one(pr.output[0], "Conv")
        w2, bn3, stride, x = g.conv_bn(c2, 3)
        add = g.one(x, "Add")
        block = _Block(bn1, w1, bn2, slope, w2, bn3, stride)
        if side.op_type == "Conv":
            g.take(side)
            wd, bnd, ds_stride, y = g.conv_bn(side, 1)
            if ds_stride != stride or g.one(y, "Add") is not add:
                g.fail(f"the shortcut of the block at '{t}' does not join its main path")
            block.downsample = (wd, bnd)
        elif side is not add:
            g.fail(f"the shortcut of the block at '{t}' goes to {side.op_type}, not to the block's Add")
        elif stride != 1:
            g.fail(f"the block at '{t}' has stride {stride} but an identity shortcut")
        blocks.append(block)
        t = add.output[0]

    head_bn_node = g.take(g.consumers_of(t)[0])
    head_bn = g.bn(head_bn_node)
    flat = g.one(head_bn_node.output[0], "Flatten", "Reshape")
    if flat.op_type == "Flatten" and int(g.attrs(flat).get("axis", 1)) != 1:
        g.fail("Flatten must keep the batch axis (axis 1)")
    t = flat.output[0]
    fc_node = g.one(t, "Gemm", "MatMul")
    if fc_node.op_type == "Gemm":
        a = g.attrs(fc_node)
        if a.get("transA", 0):
            g.fail("Gemm with transA is not the embedding layer")
        b = g.const(fc_node.input[1], fc_node)
        fc_w = (b if a.get("transB", 0) else b.T) * float(a.get("alpha", 1.0))
        fc_b = (g.const(fc_node.input[2], fc_node).reshape(-1) * float(a.get("beta", 1.0))
                if len(fc_node.input) > 2 and fc_node.input[2] else np.zeros(fc_w.shape[0], np.float32))
        t = fc_node.output[0]
    else:
        fc_w = g.const(fc_node.input[1], fc_node).T
        t = fc_node.output[0]
        nxt = g.consumers_of(t)
        if len(nxt) == 1 and nxt[0].op_type == "Add" and any(n in g.consts for n in nxt[0].input):
            g.take(nxt[0])
            fc_b = g.const([n for n in nxt[0].input if n != t][0], nxt[0]).reshape(-1)
            t = nxt[0].output[0]
        else:
            fc_b = np.zeros(fc_w.shape[0], np.float32)
    embedding = fc_w.shape[0]
    if g.reaches_output(t):
        features = _BN.identity(embedding)
    else:
        feat_node = g.one(t, "BatchNormalization")
        features = g.bn(feat_node)
        t = feat_node.output[0]
        if not g.reaches_output(t):
            g.fail(f"after the embedding's BatchNormalization the graph goes on ({', '.join(n.op_type for n in g.consumers_of(t))})")

    leftover = [n for n in g.nodes if id(n) not in g.used and n.op_type not in PASSTHROUGH]
    if leftover:
        g.fail(f"{len(leftover)} node(s) the IResNet layout has no place for: "
               f"{', '.join(sorted({n.op_type for n in leftover}))}")

    # stages: a block with stride 2 starts one
    stages = []
    for block in blocks:
        if block.stride == 2 or not stages:
            if block.stride != 2:
                g.fail("the first block does not downsample")
            stages.append([])
        stages[-1].append(block)
    if len(stages) != 4:
        g.fail(f"{len(stages)} stages found; IResNet has 4")
    widths = [stage[0].conv2.shape[0] for stage in stages]
    last = widths[-1]
    side2 = fc_w.shape[1] // last
    side = int(round(side2 ** 0.5))
    if side * side * last != fc_w.shape[1]:
        g.fail(f"the embedding layer takes {fc_w.shape[1]} values, not {last} x side x side")

    net = IResNet([len(s) for s in stages], widths, embedding, input_size=side * 16)
    state = {"conv1.weight": stem_w, "prelu.weight": stem_prelu, "fc.weight": fc_w, "fc.bias": fc_b}
    stem_bn.put(state, "bn1.")
    head_bn.put(state, "bn2.")
    features.put(state, "features.")
    for s, stage in enumerate(stages):
        for k, block in enumerate(stage):
            p = f"layer{s + 1}.{k}."
            block.bn1.put(state, p + "bn1.")
            state[p + "conv1.weight"] = block.conv1
            block.bn2.put(state, p + "bn2.")
            state[p + "prelu.weight"] = block.prelu
            state[p + "conv2.weight"] = block.conv2
            block.bn3.put(state, p + "bn3.")
            if k == 0:
                if block.downsample is None:
                    g.fail(f"the first block of stage {s + 1} has no 1x1 shortcut conv")
                state[p + "downsample.0.weight"] = block.downsample[0]
                block.downsample[1].put(state, p + "downsample.1.")
            elif block.downsample is not None:
                g.fail(f"block {k} of stage {s + 1} has a shortcut conv but IResNet only has one per stage")
    expected = net.state_dict()
    tensors = {}
    for key, ref in expected.items():
        if key.endswith("num_batches_tracked"):
            tensors[key] = ref
            continue
        if key not in state:
            g.fail(f"no weights found for {key}")
        value = torch.from_numpy(np.array(state[key], dtype=np.float32)).reshape(ref.shape)
        tensors[key] = value
    net.load_state_dict(tensors, strict=True)
    net.eval().requires_grad_(False)

    mean, std = _insightface_input_stats(model)
    # x01 -> x255 -> (x255 - mean) / std -> (. - shift) * scale
    pixel_scale = torch.tensor(255.0 / std * scale, dtype=torch.float32)
    pixel_bias = torch.tensor((-mean / std - shift) * scale, dtype=torch.float32)
    return ConvertedArcFace(net, pixel_scale, pixel_bias, mean, std, source)


def convert_onnx_file(path: str) -> ConvertedArcFace:
    onnx, _ = import_onnx()
    import os
    try:
        model = onnx.load(path)
    except Exception as e:
        raise ArcFaceConversionError(f"{path}: cannot be read as ONNX ({type(e).__name__}: {e}); is it truncated?") from e
    return convert_model(model, os.path.basename(path))
