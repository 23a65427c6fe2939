"""Tiny CNN/MLP graphs for the channel-analysis and surgery tests, built with onnx.helper.

Each builder returns a canonicalized ``ir.Model`` (shapes inferred) with seeded random weights,
covering one coupling pattern: chains, residual Add, option-A shortcuts, Concat, Split, Slice,
depthwise, grouped conv, Squeeze-Excite, Flatten->Gemm, MLPs, ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.runtime.session import make_session


class Net:
    """A graph under construction: nodes, initializers, seeded weights."""

    def __init__(self, seed: int = 0, opset: int = 17) -> None:
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.counter = 0

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}_{self.counter}"

    def input(self, name: str, shape: Sequence[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
        return name

    def const(self, array: np.ndarray, base: str = "c") -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs: Any) -> Any:
        name = self.fresh(op_type.lower())
        outputs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attrs))
        return outputs if n_out > 1 else outputs[0]

    def weight(self, *shape: int, scale: float = 0.3) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def conv(
        self,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        *,
        pad: int | None = None,
        stride: int = 1,
        group: int = 1,
        bias: bool = True,
        edit: Callable[[np.ndarray, np.ndarray], None] | None = None,
    ) -> str:
        """A Conv with random weights; ``edit(w, b)`` may rewrite them in place first."""
        pad = k // 2 if pad is None else pad
        w, b = self.weight(cout, cin // group, k, k), self.weight(cout, scale=0.1)
        if edit is not None:
            edit(w, b)
        inputs = [x, self.const(w, "w")]
        if bias:
            inputs.append(self.const(b, "b"))
        return self.op(
            "Conv", inputs, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride] * 2, group=group
        )

    def gemm(
        self,
        x: str,
        fin: int,
        fout: int,
        *,
        trans_b: int = 1,
        bias: bool = True,
        edit: Callable[[np.ndarray, np.ndarray], None] | None = None,
        **attrs: Any,
    ) -> str:
        """A Gemm; ``edit(w, b)`` gets the weight as ``[fout, fin]`` whatever ``trans_b``."""
        w, b = self.weight(fout, fin), self.weight(fout, scale=0.1)
        if edit is not None:
            edit(w, b)
        inputs = [x, self.const(w if trans_b else np.ascontiguousarray(w.T), "fc")]
        if bias:
            inputs.append(self.const(b, "fcb"))
        return self.op("Gemm", inputs, transB=trans_b, **attrs)

    def relu(self, x: str) -> str:
        return self.op("Relu", [x])

    def flatten(self, x: str) -> str:
        return self.op("Flatten", [x], axis=1)

    def gap(self, x: str) -> str:
        return self.op("GlobalAveragePool", [x])

    def head(self, x: str, channels: int, classes: int = 5) -> str:
        return self.gemm(self.flatten(self.gap(x)), channels, classes)

    def build(self, outputs: Sequence[str]) -> ir.Model:
        graph = helper.make_graph(
            self.nodes,
            "net",
            self.inputs,
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.initializers,
        )
        proto = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=10
        )
        # Declare the outputs with the shapes ONNX infers, as an exporter would.
        inferred = onnx.shape_inference.infer_shapes(proto)
        known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
        for output in proto.graph.output:
            output.type.CopyFrom(known[output.name].type)
        onnx.checker.check_model(proto, full_check=True)
        model = ir.serde.deserialize_model(proto)
        canonicalize(model)
        return model


def image_input(net: Net, channels: int = 3, size: int = 8) -> str:
    return net.input("x", ["N", channels, size, size])


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def chain() -> ir.Model:
    """conv-relu-maxpool-conv-relu-flatten-gemm: two conv groups, the second read in blocks."""
    net = Net()
    x = image_input(net)
    h = net.relu(net.conv(x, 3, 8))
    h = net.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = net.relu(net.conv(h, 8, 6))
    return net.build([net.gemm(net.flatten(h), 6 * 4 * 4, 5)])


def residual() -> ir.Model:
    """A stem and one basic block: the stem and the block's second conv share one group."""
    net = Net(1)
    x = image_input(net)
    stem = net.relu(net.conv(x, 3, 8))
    h = net.relu(net.conv(stem, 8, 12))
    h = net.conv(h, 12, 8)
    out = net.relu(net.op("Add", [h, stem]))
    out = net.relu(net.conv(out, 8, 10))
    return net.build([net.head(out, 10)])


def random_convnet(size: int = 8) -> ir.Model:
    """Three conv-relu layers (24, 32, 32 channels) with a MaxPool: wide enough for budgets."""
    net = Net(43)
    x = image_input(net, size=size)
    h = net.relu(net.conv(x, 3, 24))
    h = net.relu(net.conv(h, 24, 32))
    h = net.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = net.relu(net.conv(h, 32, 32))
    return net.build([net.head(h, 32)])


def option_a() -> ir.Model:
    """ResNet option-A shortcut: stride-2 Slice + channel Pad with zeros, like ResNet-20."""
    net = Net(2)
    x = image_input(net)
    stem = net.relu(net.conv(x, 3, 4))
    h = net.relu(net.conv(stem, 4, 8, stride=2))
    h = net.conv(h, 8, 8)
    sub = net.op(
        "Slice",
        [
            stem,
            net.const(np.array([0, 0], np.int64)),
            net.const(np.array([8, 8], np.int64)),
            net.const(np.array([2, 3], np.int64)),
            net.const(np.array([2, 2], np.int64)),
        ],
    )
    padded = net.op(
        "Pad",
        [sub, net.const(np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64)), net.const(np.float32(0))],
        mode="constant",
    )
    out = net.relu(net.op("Add", [h, padded]))
    return net.build([net.head(out, 8)])


def concat_dense() -> ir.Model:
    """DenseNet-style: each layer's output is concatenated; BN+Relu before each conv."""
    net = Net(3)
    x = image_input(net)
    h0 = net.conv(x, 3, 6)
    h1 = net.conv(net.relu(h0), 6, 4)
    cat1 = net.op("Concat", [h0, h1], axis=1)
    bn = net.op(
        "BatchNormalization",
        [
            cat1,
            net.const(np.abs(net.weight(10)) + 0.5),
            net.const(net.weight(10)),
            net.const(net.weight(10)),
            net.const(np.abs(net.weight(10)) + 0.5),
        ],
    )
    h2 = net.conv(net.relu(bn), 10, 4)
    cat2 = net.op("Concat", [cat1, h2], axis=1)
    return net.build([net.head(net.relu(cat2), 14)])


def inception() -> ir.Model:
    """Three branches (1x1, 3x3, pool+1x1) concatenated on channels, then a conv."""
    net = Net(4)
    x = image_input(net, 4)
    a = net.relu(net.conv(x, 4, 3, 1))
    b = net.relu(net.conv(net.relu(net.conv(x, 4, 5, 1)), 5, 6))
    pooled = net.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    c = net.relu(net.conv(pooled, 4, 2, 1))
    cat = net.op("Concat", [a, b, c], axis=1)
    return net.build([net.head(net.relu(net.conv(cat, 11, 7)), 7)])


def inverted_residual(multiplier: int = 1) -> ir.Model:
    """MobileNetV2 block: expand 1x1, Clip, depthwise 3x3, Clip, project 1x1, residual Add."""
    net = Net(5)
    x = image_input(net, 4)
    stem = net.conv(x, 4, 6)
    e = net.op(
        "Clip", [net.conv(stem, 6, 12, 1), net.const(np.float32(0)), net.const(np.float32(6))]
    )
    d = net.conv(e, 12, 12 * multiplier, group=12)
    d = net.op("Clip", [d, net.const(np.float32(0)), net.const(np.float32(6))])
    p = net.conv(d, 12 * multiplier, 6, 1)
    out = net.op("Add", [p, stem])
    return net.build([net.head(out, 6)])


def grouped() -> ir.Model:
    """ResNeXt-style grouped 3x3 conv (group=2) between 1x1 convs."""
    net = Net(6)
    x = image_input(net)
    h = net.relu(net.conv(x, 3, 8, 1))
    h = net.relu(net.conv(h, 8, 8, group=2))
    h = net.relu(net.conv(h, 8, 6, 1))
    return net.build([net.head(h, 6)])


def squeeze_excite() -> ir.Model:
    """x * sigmoid(fc2(relu(fc1(gap(x))))): the gate's channels join x's."""
    net = Net(7)
    x = image_input(net)
    feat = net.relu(net.conv(x, 3, 8))
    s = net.relu(net.conv(net.gap(feat), 8, 3, 1))
    gate = net.op("Sigmoid", [net.conv(s, 3, 8, 1)])
    scaled = net.op("Mul", [feat, gate])
    return net.build([net.head(net.relu(net.conv(scaled, 8, 6)), 6)])


def flatten_gemm() -> ir.Model:
    """conv -> Reshape [0, -1] (flatten) -> Gemm -> Relu -> Gemm: channel k owns 16 columns."""
    net = Net(8)
    x = image_input(net, 3, 4)
    h = net.relu(net.conv(x, 3, 5))
    flat = net.op("Reshape", [h, net.const(np.array([0, -1], np.int64))])
    hidden = net.relu(net.gemm(flat, 5 * 16, 7))
    return net.build([net.gemm(hidden, 7, 3, trans_b=0)])


def mlp() -> ir.Model:
    """Gemm-Relu-MatMul+Add-Relu-Gemm on [N, 6] features."""
    net = Net(9)
    x = net.input("x", ["N", 6])
    h = net.relu(net.gemm(x, 6, 10))
    h = net.op("MatMul", [h, net.const(net.weight(10, 9))])
    h = net.relu(net.op("Add", [h, net.const(net.weight(9, scale=0.1))]))
    return net.build([net.gemm(h, 9, 4)])


def split_slice() -> ir.Model:
    """Split and Slice on the channel axis, a Gather shuffle, Resize and a channel Reshape."""
    net = Net(10)
    x = image_input(net)
    h = net.relu(net.conv(x, 3, 12))
    a, b = net.op("Split", [h, net.const(np.array([5, 7], np.int64))], n_out=2, axis=1)
    a = net.relu(net.conv(a, 5, 4))
    b = net.op(
        "Slice",
        [
            b,
            net.const(np.array([1], np.int64)),
            net.const(np.array([6], np.int64)),
            net.const(np.array([1], np.int64)),
        ],
    )
    b = net.relu(net.conv(b, 5, 4))
    cat = net.op("Concat", [a, b], axis=1)
    shuffled = net.op(
        "Gather", [cat, net.const(np.array([4, 0, 5, 1, 6, 2, 7, 3], np.int64))], axis=1
    )
    up = net.op(
        "Resize", [shuffled, "", "", net.const(np.array([1, 8, 16, 16], np.int64))], mode="nearest"
    )
    folded = net.op("Reshape", [up, net.const(np.array([0, 8, -1], np.int64))])
    back = net.op("Reshape", [folded, net.const(np.array([-1, 8, 16, 16], np.int64))])
    return net.build([net.head(net.relu(net.conv(back, 8, 6)), 6)])


def transposed() -> ir.Model:
    """ConvTranspose (upsampling decoder layer) between convs; PRelu with per-channel slopes."""
    net = Net(11)
    x = image_input(net)
    h = net.relu(net.conv(x, 3, 6, stride=2))
    w = net.const(net.weight(6, 5, 2, 2))
    up = net.op(
        "ConvTranspose", [h, w, net.const(net.weight(5))], kernel_shape=[2, 2], strides=[2, 2]
    )
    act = net.op("PRelu", [up, net.const(np.abs(net.weight(5, 1, 1)))])
    return net.build([net.head(net.relu(net.conv(act, 5, 4)), 4)])


def multi_output() -> ir.Model:
    """An intermediate feature map is also a graph output: its channels must stay."""
    net = Net(12)
    x = image_input(net)
    feat = net.relu(net.conv(x, 3, 6))
    inner = net.relu(net.conv(feat, 6, 4))
    return net.build([net.head(inner, 4), feat])


def unknown_op() -> ir.Model:
    """A TopK over channels (unknown channel semantics) freezes what feeds it."""
    net = Net(13)
    x = image_input(net)
    feat = net.relu(net.conv(x, 3, 6))
    values, _ = net.op("TopK", [feat, net.const(np.array([3], np.int64))], n_out=2, axis=1)
    other = net.relu(net.conv(x, 3, 4))
    return net.build([net.head(values, 3), net.head(other, 4)])


def odd_reshape() -> ir.Model:
    """A Reshape that splits channels into groups (a channel shuffle) is not understood."""
    net = Net(14)
    x = image_input(net)
    feat = net.relu(net.conv(x, 3, 8))
    split = net.op("Reshape", [feat, net.const(np.array([0, 2, 4, 8, 8], np.int64))])
    swapped = net.op("Transpose", [split], perm=[0, 2, 1, 3, 4])
    back = net.op("Reshape", [swapped, net.const(np.array([0, 8, 8, 8], np.int64))])
    return net.build([net.head(net.relu(net.conv(back, 8, 4)), 4)])


def shared_weights() -> ir.Model:
    """Two branches whose second convs read the same weight initializer (tied weights)."""
    net = Net(15)
    x = image_input(net)
    w = net.const(net.weight(6, 6, 3, 3), "tied")
    heads = []
    for _ in range(2):
        h = net.relu(net.conv(x, 3, 6))
        h = net.relu(net.op("Conv", [h, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        heads.append(net.head(h, 6))
    return net.build(heads)


# ---------------------------------------------------------------------------------------------
# Graphs that move the channel axis (Transpose to channels-last and back)
# ---------------------------------------------------------------------------------------------


def channels_last() -> ir.Model:
    """conv -> Transpose to NHWC -> per-channel Mul/Add on the last axis -> Relu -> back -> conv."""
    net = Net(16)
    x = image_input(net)
    h = net.conv(x, 3, 6)
    nhwc = net.op("Transpose", [h], perm=[0, 2, 3, 1])
    h = net.op("Mul", [nhwc, net.const(np.abs(net.weight(6)) + 0.5)])
    h = net.relu(net.op("Add", [h, net.const(net.weight(6, scale=0.1))]))
    nchw = net.op("Transpose", [h], perm=[0, 3, 1, 2])
    return net.build([net.head(net.relu(net.conv(nchw, 6, 4)), 4)])


def channels_last_head() -> ir.Model:
    """A tf2onnx-style head: NHWC features averaged over H and W by ReduceMean, then a Gemm."""
    net = Net(17)
    x = image_input(net)
    h = net.relu(net.conv(x, 3, 6))
    nhwc = net.op("Transpose", [h], perm=[0, 2, 3, 1])
    pooled = net.op("ReduceMean", [nhwc], axes=[1, 2], keepdims=0)
    return net.build([net.gemm(pooled, 6, 5)])


def channels_last_misread() -> ir.Model:
    """A Conv and a MaxPool read an NHWC tensor as NCHW (they take its H axis for channels)."""
    net = Net(18)
    x = image_input(net, 3, 8)
    feat = net.relu(net.conv(x, 3, 8))
    nhwc = net.op("Transpose", [feat], perm=[0, 2, 3, 1])
    conv = net.relu(net.conv(nhwc, 8, 4))
    pooled = net.op("MaxPool", [nhwc], kernel_shape=[2, 2], strides=[2, 2])
    return net.build([net.head(conv, 4), net.head(pooled, 8)])


def channels_last_se() -> ir.Model:
    """tf2onnx's squeeze-excite: the block's mean and its gate are taken in NHWC between
    Transpose pairs (ReduceMean over axes 1, 2; the gate multiplies the NHWC features)."""
    net = Net(20)
    x = image_input(net)
    h = net.relu(net.conv(x, 3, 8))
    nhwc = net.op("Transpose", [h], perm=[0, 2, 3, 1])
    pooled = net.op("ReduceMean", [nhwc], axes=[1, 2], keepdims=1)
    squeezed = net.relu(net.conv(net.op("Transpose", [pooled], perm=[0, 3, 1, 2]), 8, 4, k=1))
    gate = net.op("HardSigmoid", [net.conv(squeezed, 4, 8, k=1)])
    scaled = net.op("Mul", [nhwc, net.op("Transpose", [gate], perm=[0, 2, 3, 1])])
    back = net.op("Transpose", [scaled], perm=[0, 3, 1, 2])
    return net.build([net.head(net.relu(net.conv(back, 8, 6)), 6)])


def channels_last_concat() -> ir.Model:
    """Two NHWC tensors concatenated on their channel axis (3): Concat's layout constants
    assume axis 1, so both groups stay frozen."""
    net = Net(21)
    x = image_input(net)
    a = net.op("Transpose", [net.relu(net.conv(x, 3, 4))], perm=[0, 2, 3, 1])
    b = net.op("Transpose", [net.relu(net.conv(x, 3, 6))], perm=[0, 2, 3, 1])
    joined = net.op("Concat", [a, b], axis=3)
    back = net.op("Transpose", [joined], perm=[0, 3, 1, 2])
    return net.build([net.head(net.relu(net.conv(back, 10, 4)), 4)])


def channels_last_matmul() -> ir.Model:
    """A MatMul on an NHWC tensor contracts its channel axis (a Dense layer in channels-last
    layout): not cut yet, so the group feeding it stays frozen."""
    net = Net(22)
    x = image_input(net)
    nhwc = net.op("Transpose", [net.relu(net.conv(x, 3, 6))], perm=[0, 2, 3, 1])
    dense = net.op("MatMul", [nhwc, net.const(net.weight(6, 4))])
    back = net.op("Transpose", [dense], perm=[0, 3, 1, 2])
    return net.build([net.head(net.relu(back), 4)])


def spatial_transpose() -> ir.Model:
    """A Transpose that swaps H and W leaves the channels on axis 1."""
    net = Net(19)
    x = image_input(net)
    h = net.relu(net.conv(x, 3, 6))
    h = net.op("Transpose", [h], perm=[0, 1, 3, 2])
    return net.build([net.head(net.relu(net.conv(h, 6, 4)), 4)])


# ---------------------------------------------------------------------------------------------
# Models with one exactly replaceable channel (for compensation tests)
# ---------------------------------------------------------------------------------------------

REPLACED = 4
KEEP = (0, 2)
COEFFS = (0.7, -1.3)


def make_replaceable(beta: float) -> Callable[[np.ndarray, np.ndarray], None]:
    """Rewrite filter REPLACED as COEFFS . filters KEEP, its bias likewise plus ``beta``."""

    def edit(w: np.ndarray, b: np.ndarray) -> None:
        w[REPLACED] = sum(c * w[k] for c, k in zip(COEFFS, KEEP, strict=True))
        b[REPLACED] = sum(c * b[k] for c, k in zip(COEFFS, KEEP, strict=True)) + beta

    return edit


def linear_conv_pool_conv(beta: float, consumer_pad: int = 0) -> ir.Model:
    """conv A -> AveragePool -> conv B: only channel-uniform linear ops between A and B."""
    net = Net(20)
    x = image_input(net)
    a = net.conv(x, 3, 6, edit=make_replaceable(beta))
    pooled = net.op("AveragePool", [a], kernel_shape=[2, 2], strides=[2, 2])
    b = net.relu(net.conv(pooled, 6, 5, pad=consumer_pad, bias=False))
    return net.build([net.head(b, 5)])


def linear_flatten_gemm(beta: float) -> ir.Model:
    """conv A -> Flatten -> Gemm: each channel's relation holds column by column."""
    net = Net(21)
    x = image_input(net, 3, 4)
    a = net.conv(x, 3, 6, edit=make_replaceable(beta))
    hidden = net.relu(net.gemm(net.flatten(a), 6 * 16, 7))
    return net.build([net.gemm(hidden, 7, 3)])


def linear_mlp(beta: float) -> ir.Model:
    """Gemm (transB=0) -> MatMul without bias -> Relu -> Gemm(alpha, beta) on features."""
    net = Net(22)
    x = net.input("x", ["N", 6])
    h = net.gemm(x, 6, 8, trans_b=0, edit=make_replaceable(beta))
    h = net.relu(net.op("MatMul", [h, net.const(net.weight(8, 9))]))
    g = net.gemm(h, 9, 6, edit=make_replaceable(beta))
    return net.build([net.gemm(g, 6, 4, alpha=0.5, beta=2.0)])


def linear_residual(beta: float) -> ir.Model:
    """Two convs summed by Add (no activation) then read by a conv: one joint group."""
    net = Net(23)
    x = image_input(net)
    a = net.conv(x, 3, 6, edit=make_replaceable(beta))
    b = net.conv(x, 3, 6, k=1, edit=make_replaceable(0.0))
    summed = net.op("Add", [a, b])
    c = net.relu(net.conv(summed, 6, 5, pad=0))
    return net.build([net.head(c, 5)])


BUILDERS: dict[str, Callable[[], ir.Model]] = {
    "chain": chain,
    "residual": residual,
    "option_a": option_a,
    "concat_dense": concat_dense,
    "inception": inception,
    "inverted_residual": inverted_residual,
    "depthwise_multiplier": lambda: inverted_residual(2),
    "grouped": grouped,
    "squeeze_excite": squeeze_excite,
    "flatten_gemm": flatten_gemm,
    "mlp": mlp,
    "split_slice": split_slice,
    "transposed": transposed,
    "multi_output": multi_output,
    "unknown_op": unknown_op,
    "odd_reshape": odd_reshape,
    "shared_weights": shared_weights,
    "channels_last_se": channels_last_se,
}

# Kept apart from BUILDERS (which every pass's generic tests run on): the channel analysis and
# surgery cover these.
CHANNEL_AXIS_BUILDERS: dict[str, Callable[[], ir.Model]] = {
    "channels_last": channels_last,
    "channels_last_head": channels_last_head,
    "channels_last_misread": channels_last_misread,
    "channels_last_concat": channels_last_concat,
    "channels_last_matmul": channels_last_matmul,
    "spatial_transpose": spatial_transpose,
}

# The structures every channel pass must shrink while keeping the model valid.
PRUNABLE = [
    "chain",
    "residual",
    "option_a",
    "concat_dense",
    "inception",
    "inverted_residual",
    "grouped",
    "squeeze_excite",
    "flatten_gemm",
    "mlp",
    "split_slice",
    "channels_last_se",
]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def feeds_for(model: ir.Model, batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.inputs:
        assert value.shape is not None
        shape = [batch if not isinstance(d, int) else d for d in value.shape.dims]
        feeds[value.name] = rng.standard_normal(shape).astype(np.float32)  # type: ignore[arg-type]
    return feeds


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = make_session(model, provider="cpu", optimize=False)
    return [np.asarray(o) for o in session.run(None, feeds)]
