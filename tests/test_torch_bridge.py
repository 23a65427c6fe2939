"""Tests for the torch bridge: ONNX graphs run as torch modules match ONNX Runtime, train, and
write their trained weights back into the same graph."""

from __future__ import annotations

import glob
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from zoo import export_torchvision

from onnxcompress.errors import OnnxCompressError, PassConfigError, UnsupportedOpError
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.model_io import clone_model, load_model
from onnxcompress.torch_bridge import OnnxModule, check_supported, write_back

RTOL, ATOL = 1e-4, 1e-5


# ---------------------------------------------------------------------------------------------
# Fixtures and comparison helpers
# ---------------------------------------------------------------------------------------------


def build(
    body: str,
    *,
    opset: int = 17,
    weights: dict[str, Any] | None = None,
    seed: int = 0,
) -> onnx.ModelProto:
    """A model from onnx.parser text; graph inputs named in ``weights`` become initializers.

    ``weights`` maps an input name to an array, or to None for standard-normal values of the
    declared shape. Output shapes are cleared so the text may write ``float y``.
    """
    model = onnx.parser.parse_model(f'<ir_version: 10, opset_import: ["" : {opset}]>\n{body}')
    rng = np.random.default_rng(seed)
    for name, value in (weights or {}).items():
        (inp,) = [i for i in model.graph.input if i.name == name]
        if value is None:
            dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
            value = rng.standard_normal(dims).astype(np.float32)
        model.graph.input.remove(inp)
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    return model


def random_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        tensor_type = inp.type.tensor_type
        dims = [d.dim_value if d.dim_value > 0 else 2 for d in tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, dims).astype(bool)
        else:
            feeds[inp.name] = rng.integers(-3, 4, dims).astype(dtype)
    return feeds


def ort_run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(
        proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def torch_run(module: OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*[torch.from_numpy(feeds[n]) for n in module.input_names])
    outputs = result if isinstance(result, tuple) else (result,)
    return [t.numpy() for t in outputs]


def assert_matches_ort(
    model: onnx.ModelProto | ir.Model,
    feeds: dict[str, np.ndarray] | None = None,
    *,
    rtol: float = RTOL,
    atol: float = ATOL,
    scale_atol: bool = False,
) -> OnnxModule:
    """Run ``model`` in ORT and through the bridge (eval mode) and compare every output.

    Args:
        scale_atol: multiply ``atol`` by the output's largest magnitude (when above 1). Deep
            random-weight nets reach logits in the hundreds, where float32 sums that ORT and
            torch order differently disagree by ~1e-6 of that scale; a real bug is off by a
            large fraction of it.
    """
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    feeds = feeds if feeds is not None else random_feeds(proto)
    expected = ort_run(proto, feeds)
    module = OnnxModule(ir.serde.deserialize_model(proto)).eval()
    actual = torch_run(module, feeds)
    assert len(actual) == len(expected)
    for name, got, want in zip(module.output_names, actual, expected, strict=True):
        if np.issubdtype(want.dtype, np.floating):
            assert np.isfinite(want).all(), f"{name}: the fixture produces non-finite values"
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
        scale = max(1.0, float(np.abs(want).max(initial=0.0))) if scale_atol else 1.0
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=name)
    return module


# ---------------------------------------------------------------------------------------------
# One small graph per op family
# ---------------------------------------------------------------------------------------------

OP_CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "conv_groups_dilation_stride": (
        "g (float[2,4,11,10] x, float[6,2,3,3] w, float[6] b) => (float y)"
        "{ y = Conv<group=2, dilations=[2,1], strides=[2,1], pads=[1,2,1,2]>(x, w, b) }",
        {"w": None, "b": None},
        17,
    ),
    "conv_asymmetric_pads": (
        "g (float[1,3,9,9] x, float[5,3,3,2] w) => (float y)"
        "{ y = Conv<pads=[0,1,2,0], strides=[2,2]>(x, w) }",
        {"w": None},
        17,
    ),
    "conv_same_upper": (
        "g (float[1,3,10,9] x, float[4,3,4,3] w) => (float y)"
        '{ y = Conv<auto_pad="SAME_UPPER", strides=[3,2]>(x, w) }',
        {"w": None},
        17,
    ),
    "conv_same_lower": (
        "g (float[1,3,10,9] x, float[4,3,4,3] w) => (float y)"
        '{ y = Conv<auto_pad="SAME_LOWER", strides=[3,2]>(x, w) }',
        {"w": None},
        17,
    ),
    "conv_valid_depthwise": (
        "g (float[2,6,9,9] x, float[6,1,3,3] w) => (float y)"
        '{ y = Conv<auto_pad="VALID", group=6>(x, w) }',
        {"w": None},
        17,
    ),
    "conv_1d_and_3d": (
        "g (float[2,3,12] x, float[4,3,3] w, float[1,2,5,6,7] v, float[3,2,3,1,3] k)"
        " => (float y, float z)"
        "{ y = Conv<pads=[1,0], strides=[2]>(x, w) z = Conv<pads=[1,0,1,1,0,1]>(v, k) }",
        {"w": None, "k": None},
        17,
    ),
    "conv_transpose": (
        "g (float[2,4,5,6] x, float[4,3,3,3] w, float[6] b) => (float y)"
        "{ y = ConvTranspose<group=2, strides=[2,2], pads=[1,1,1,1],"
        " output_padding=[1,0]>(x, w, b) }",
        {"w": None, "b": None},
        17,
    ),
    "conv_transpose_asymmetric": (
        "g (float[1,3,5,5] x, float[3,2,4,4] w, float[2] b) => (float y)"
        "{ y = ConvTranspose<strides=[2,3], pads=[0,1,2,0], dilations=[1,2]>(x, w, b) }",
        {"w": None, "b": None},
        17,
    ),
    "conv_transpose_output_shape": (
        "g (float[1,3,5,5] x, float[3,2,3,3] w) => (float y)"
        "{ y = ConvTranspose<strides=[2,2], output_shape=[10,11]>(x, w) }",
        {"w": None},
        17,
    ),
    "gemm_transposes_alpha_beta": (
        "g (float[5,3] a, float[4,5] bt, float[1,4] c) => (float y)"
        "{ y = Gemm<alpha=0.5, beta=2.0, transA=1, transB=1>(a, bt, c) }",
        {"bt": None, "c": None},
        17,
    ),
    "gemm_linear_and_no_bias": (
        "g (float[3,5] a, float[4,5] w, float[4] b, float[4,2] w2) => (float y, float z)"
        "{ y = Gemm<transB=1>(a, w, b) z = Gemm(y, w2) }",
        {"w": None, "b": None, "w2": None},
        17,
    ),
    "matmul_batched": (
        "g (float[2,3,4,5] a, float[5,6] w, float[3,6,2] v) => (float y)"
        "{ t = MatMul(a, w) y = MatMul(t, v) }",
        {"w": None},
        17,
    ),
    "batchnorm": (
        "g (float[2,3,4,5] x, float[3] s, float[3] b, float[3] m, float[3] v) => (float y)"
        "{ y = BatchNormalization<epsilon=0.001>(x, s, b, m, v) }",
        {"s": None, "b": None, "m": None, "v": np.array([0.5, 1.0, 2.0], dtype=np.float32)},
        15,
    ),
    "activations": (
        "g (float[2,3,4,5] x, float[3,1,1] slope) => (float a, float b, float c, float d,"
        " float e, float f, float g2, float h, float i, float j, float k, float l, float m)"
        "{ a = Relu(x) b = LeakyRelu<alpha=0.2>(x) c = PRelu(x, slope) d = Sigmoid(x)"
        " e = HardSigmoid<alpha=0.3, beta=0.4>(x) f = HardSwish(x) g2 = Tanh(x)"
        " h = Softplus(x) i = Elu<alpha=0.7>(x) j = Selu(x) k = Erf(x) l = Neg(x) m = Abs(x) }",
        {"slope": None},
        17,
    ),
    "gelu": (
        'g (float[2,7] x) => (float y, float z){ y = Gelu(x) z = Gelu<approximate="tanh">(x) }',
        {},
        20,
    ),
    "positive_math": (
        "g (float[3,4] x, float[4] p) => (float a, float b, float c, float d, float e)"
        "{ ax = Abs(x) one = Constant<value_float=0.5>() pos = Add(ax, one)"
        " a = Sqrt(pos) b = Exp(x) c = Log(pos) d = Reciprocal(pos) e = Pow(pos, p) }",
        {"p": np.array([0.5, 2.0, -1.0, 3.0], dtype=np.float32)},
        17,
    ),
    "clip_inputs": (
        "g (float[3,4] x, float lo, float hi) => (float a, float b, float c)"
        "{ a = Clip(x, lo, hi) b = Clip(x, , hi) c = Clip(x) }",
        {"lo": np.array(-0.5, dtype=np.float32), "hi": np.array(0.7, dtype=np.float32)},
        17,
    ),
    "clip_attrs_opset6": (
        "g (float[3,4] x) => (float a) { a = Clip<min=-0.2, max=0.3>(x) }",
        {},
        6,
    ),
    "arithmetic_broadcast": (
        "g (float[2,3,4] x, float[3,1] y, float[4] z) => (float a, float b, float c, float d)"
        "{ a = Add(x, y) b = Sub(z, x) c = Mul(x, z) ay = Abs(y) d = Div(x, ay) }",
        {},
        17,
    ),
    "variadic": (
        "g (float[2,3,4] x, float[3,1] y, float[4] z) => (float a, float b, float c, float d)"
        "{ a = Max(x, y, z) b = Min(x, y, z) c = Sum(x, y, z) d = Mean(x, y, z) }",
        {},
        17,
    ),
    "logic_and_where": (
        "g (float[3,4] x, float[4] y) => (float w, bool e)"
        "{ lt = Less(x, y) zero = Constant<value_float=0.0>() gt = Greater(x, zero)"
        " ngt = Not(gt) both = And(lt, ngt) w = Where(both, x, y)"
        " xi = Cast<to=7>(x) yi = Cast<to=7>(y) e = Equal(xi, yi) }",
        {},
        17,
    ),
    "max_pool_variants": (
        "g (float[2,3,11,10] x) => (float a, float b, float c, float d, float e)"
        "{ a = MaxPool<kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]>(x)"
        " b = MaxPool<kernel_shape=[3,2], strides=[2,2], ceil_mode=1>(x)"
        " c = MaxPool<kernel_shape=[3,3], pads=[0,2,1,0], strides=[1,2]>(x)"
        " d = MaxPool<kernel_shape=[2,2], dilations=[2,2], strides=[1,1]>(x)"
        ' e = MaxPool<kernel_shape=[3,3], strides=[2,2], auto_pad="SAME_UPPER">(x) }',
        {},
        17,
    ),
    "average_pool_variants": (
        "g (float[2,3,11,10] x) => (float a, float b, float c, float d, float e, float f)"
        "{ a = AveragePool<kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]>(x)"
        " b = AveragePool<kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1],"
        " count_include_pad=1>(x)"
        " c = AveragePool<kernel_shape=[3,2], strides=[2,2], ceil_mode=1>(x)"
        " d = AveragePool<kernel_shape=[3,3], strides=[2,2], ceil_mode=1, pads=[1,1,1,1],"
        " count_include_pad=1>(x)"
        " e = AveragePool<kernel_shape=[3,3], pads=[0,2,1,0], strides=[1,2]>(x)"
        " f = AveragePool<kernel_shape=[3,3], pads=[0,2,1,0], count_include_pad=1>(x) }",
        {},
        17,
    ),
    "global_pools": (
        "g (float[2,3,5,4] x) => (float a, float b) { a = GlobalAveragePool(x)"
        " b = GlobalMaxPool(x) }",
        {},
        17,
    ),
    "flatten_reshape": (
        "g (float[2,3,4,5] x, int64[3] s) => (float a, float b, float c, float d)"
        "{ a = Flatten<axis=0>(x) b = Flatten<axis=-2>(x) c = Reshape(x, s)"
        " zs = Constant<value=int64[2] {0, 4}>() zx = ConstantOfShape(zs)"
        " ts = Constant<value=int64[2] {4, 0}>() d = Reshape<allowzero=1>(zx, ts) }",
        {"s": np.array([0, -1, 5], dtype=np.int64)},
        17,
    ),
    "concat_split": (
        "g (float[2,3,4] x, float[2,5,4] y, int64[2] sp) => (float a, float b, float c,"
        " float d, float e, float f)"
        "{ cat = Concat<axis=-2>(x, y) a, b = Split<axis=1>(cat, sp)"
        " c, d = Split<axis=2, num_outputs=2>(x) e, f = Split<axis=1, num_outputs=2>(y) }",
        {"sp": np.array([5, 3], dtype=np.int64)},
        18,
    ),
    "split_equal_opset13": (
        "g (float[2,6,4] x) => (float a, float b, float c) { a, b, c = Split<axis=1>(x) }",
        {},
        13,
    ),
    "split_attr_opset11": (
        "g (float[2,7,4] x) => (float a, float b, float c)"
        "{ a, b, c = Split<axis=1, split=[2,4,1]>(x) }",
        {},
        11,
    ),
    "slice_steps": (
        "g (float[5,6,7] x, int64[3] st, int64[3] en, int64[3] ax, int64[3] sp,"
        " int64[1] s1, int64[1] e1) => (float a, float b)"
        "{ a = Slice(x, st, en, ax, sp) b = Slice(x, s1, e1) }",
        {
            "st": np.array([-1, 1, 10], dtype=np.int64),
            "en": np.array([-(2**63), 2**62, -9], dtype=np.int64),
            "ax": np.array([0, -1, 1], dtype=np.int64),
            "sp": np.array([-2, 3, -1], dtype=np.int64),
            "s1": np.array([1], dtype=np.int64),
            "e1": np.array([-1], dtype=np.int64),
        },
        17,
    ),
    "slice_opset9": (
        "g (float[5,6] x) => (float a) { a = Slice<starts=[1,-4], ends=[100,-1], axes=[0,1]>(x) }",
        {},
        9,
    ),
    "transpose_squeeze_unsqueeze_13": (
        "g (float[2,1,3,1] x, int64[1] sq, int64[2] us) => (float a, float b, float c)"
        "{ a = Transpose<perm=[3,0,2,1]>(x) b = Squeeze(x, sq) c = Unsqueeze(b, us) }",
        {"sq": np.array([-1], dtype=np.int64), "us": np.array([0, -1], dtype=np.int64)},
        13,
    ),
    "squeeze_unsqueeze_11": (
        "g (float[2,1,3,1] x) => (float a, float b, float c)"
        "{ a = Squeeze<axes=[1]>(x) b = Unsqueeze<axes=[0,3]>(a) c = Squeeze(x) }",
        {},
        11,
    ),
    "pad_modes": (
        "g (float[2,3,5,6] x, int64[8] p, int64[8] q, float v) => (float a, float b, float c,"
        " float d)"
        '{ a = Pad(x, p, v) b = Pad<mode="reflect">(x, q) c = Pad<mode="edge">(x, q)'
        " d = Pad(x, q) }",
        {
            "p": np.array([0, 1, 2, 0, 1, 0, -1, 3], dtype=np.int64),
            "q": np.array([0, 0, 2, 1, 0, 0, 1, 3], dtype=np.int64),
            "v": np.array(1.5, dtype=np.float32),
        },
        17,
    ),
    "pad_axes_opset18": (
        "g (float[2,3,5,6] x, int64[4] p, int64[2] ax) => (float a)"
        '{ a = Pad<mode="reflect">(x, p, , ax) }',
        {"p": np.array([1, 2, 3, 1], dtype=np.int64), "ax": np.array([-1, 2], dtype=np.int64)},
        18,
    ),
    "pad_opset2": (
        "g (float[2,3,4] x) => (float a) { a = Pad<pads=[0,1,0,0,2,1], value=-1.0>(x) }",
        {},
        2,
    ),
    "resize_nearest": (
        "g (float[1,2,5,7] x, float[4] up, int64[4] down, float[0] roi) => (float a, float b,"
        " float c, float d)"
        '{ a = Resize<mode="nearest", coordinate_transformation_mode="asymmetric",'
        ' nearest_mode="floor">(x, roi, up)'
        ' b = Resize<mode="nearest">(x, roi, , down)'
        ' c = Resize<mode="nearest", coordinate_transformation_mode="align_corners",'
        ' nearest_mode="round_prefer_ceil">(x, roi, , down)'
        ' d = Resize<mode="nearest", coordinate_transformation_mode="half_pixel",'
        ' nearest_mode="round_prefer_floor">(x, roi, up) }',
        {
            "up": np.array([1, 1, 2, 3], dtype=np.float32),
            "down": np.array([1, 2, 3, 4], dtype=np.int64),
            "roi": np.zeros(0, dtype=np.float32),
        },
        13,
    ),
    "resize_linear": (
        "g (float[1,2,5,7] x, float[4] up, int64[4] odd, float[0] roi) => (float a, float b,"
        " float c, float d, float e)"
        '{ a = Resize<mode="linear">(x, roi, up)'
        ' b = Resize<mode="linear", coordinate_transformation_mode="align_corners">'
        "(x, roi, , odd)"
        ' c = Resize<mode="linear", coordinate_transformation_mode="pytorch_half_pixel">'
        "(x, roi, , odd)"
        ' d = Resize<mode="linear", coordinate_transformation_mode="asymmetric">(x, roi, up)'
        ' e = Resize<mode="cubic">(x, roi, up) }',
        {
            "up": np.array([1, 1, 2, 1.5], dtype=np.float32),
            "odd": np.array([1, 2, 3, 11], dtype=np.int64),
            "roi": np.zeros(0, dtype=np.float32),
        },
        13,
    ),
    "resize_axes_opset18": (
        "g (float[1,2,5,7] x, float[2] sc) => (float a)"
        '{ a = Resize<mode="linear", axes=[3,2]>(x, , sc) }',
        {"sc": np.array([0.6, 2.0], dtype=np.float32)},
        18,
    ),
    "resize_opset10_upsample_opset9": (
        'g (float[1,2,3,4] x, float[4] sc) => (float a) { a = Upsample<mode="nearest">(x, sc) }',
        {"sc": np.array([1, 1, 2, 2], dtype=np.float32)},
        9,
    ),
    "resize_opset10": (
        "g (float[1,2,3,4] x, float[4] sc) => (float a, float b)"
        '{ a = Resize<mode="nearest">(x, sc) b = Resize<mode="linear">(x, sc) }',
        {"sc": np.array([1, 1, 2, 3], dtype=np.float32)},
        10,
    ),
    "reductions_attr": (
        "g (float[2,3,4] x) => (float a, float b, float c, float d)"
        "{ a = ReduceMean<axes=[1,-1]>(x) b = ReduceSum<keepdims=0>(x, ) c = ReduceMax<axes=[0],"
        " keepdims=0>(x) d = ReduceMin(x) }",
        {},
        13,
    ),
    "reductions_input": (
        "g (float[2,3,4] x, int64[2] ax) => (float a, float b, float c, float d)"
        "{ a = ReduceMean(x, ax) b = ReduceSum<keepdims=0>(x, ax) c = ReduceMax(x, ax)"
        " d = ReduceL2<keepdims=0>(x, ax) }",
        {"ax": np.array([0, 2], dtype=np.int64)},
        18,
    ),
    "softmax_13": (
        "g (float[2,3,4] x) => (float a, float b, float c)"
        "{ a = Softmax(x) b = Softmax<axis=1>(x) c = LogSoftmax<axis=0>(x) }",
        {},
        13,
    ),
    "softmax_11_coerced": (
        "g (float[2,3,4] x) => (float a, float b) { a = Softmax(x) b = LogSoftmax<axis=2>(x) }",
        {},
        11,
    ),
    "dropout_identity": (
        "g (float[2,3] x, float r) => (float a, float b, float c)"
        "{ a = Dropout(x, r) b = Identity(a) c = Dropout(x) }",
        {"r": np.array(0.3, dtype=np.float32)},
        13,
    ),
    "shape_arithmetic": (
        "g (float[3,4,5] x) => (float r, int64 n, float f, float t, float e, int64 rg,"
        " int64 tail)"
        "{ s = Shape(x) i0 = Constant<value=int64[1] {0}>() d0 = Gather<axis=0>(s, i0)"
        " m1 = Constant<value=int64[1] {-1}>() ns = Concat<axis=0>(d0, m1) r = Reshape(x, ns)"
        " n = Size(x) tail = Shape<start=-2>(x)"
        " f = ConstantOfShape<value=float[1] {2.5}>(tail)"
        " reps = Constant<value=int64[2] {2, 1}>() t = Tile(f, reps)"
        " es = Constant<value=int64[3] {2, 1, 5}>() e = Expand(f, es)"
        " zero = Constant<value_int=0>() lim = Constant<value_int=7>()"
        " two = Constant<value_int=2>()"
        " rg = Range(zero, lim, two) }",
        {},
        17,
    ),
    "gather_negative_and_elements": (
        "g (float[4,5] x, int64[2,2] idx, int64 k, int64[4,3] el) => (float a, float b,"
        " float c)"
        "{ a = Gather<axis=1>(x, idx) b = Gather(x, k) c = GatherElements<axis=1>(x, el) }",
        {
            "idx": np.array([[0, -1], [2, -5]], dtype=np.int64),
            "k": np.array(-2, dtype=np.int64),
            "el": np.array([[0, 4, -1], [1, 1, 2], [3, -2, 0], [4, 0, 0]], dtype=np.int64),
        },
        17,
    ),
    "gather_nd": (
        "g (float[3,4,5] x, int64[2,2] i, int64[3,1,1] j, int64[2] k) => (float a, float b,"
        " float c)"
        "{ a = GatherND(x, i) b = GatherND<batch_dims=1>(x, j) c = GatherND(x, k) }",
        {
            "i": np.array([[0, -1], [2, 1]], dtype=np.int64),
            "j": np.array([[[1]], [[3]], [[0]]], dtype=np.int64),
            "k": np.array([1, 2], dtype=np.int64),
        },
        17,
    ),
    "cast_types": (
        "g (float[3,4] x) => (int64 a, float16 b, double c, bool d, float e)"
        "{ a = Cast<to=7>(x) b = Cast<to=10>(x) c = Cast<to=11>(x) d = Cast<to=9>(x)"
        " e = CastLike(a, x) }",
        {},
        17,
    ),
    "normalizations": (
        "g (float[2,6,5,4] x, float[6] s, float[6] b, float[4] ls, float[4] lb, float[5,4] ms)"
        " => (float a, float c, float d, float e, float f)"
        "{ a = LRN<size=5, alpha=0.001, beta=0.75, bias=2.0>(x) c = LRN<size=3>(x)"
        " d = InstanceNormalization<epsilon=0.01>(x, s, b)"
        " e = LayerNormalization<epsilon=0.001>(x, ls, lb)"
        " f = LayerNormalization<axis=-2>(x, ms) }",
        {"s": None, "b": None, "ls": None, "lb": None, "ms": None},
        17,
    ),
    "einsum_depth_space": (
        "g (float[2,3,4] x, float[4,5] w, float[1,8,2,3] d) => (float a, float b, float c,"
        " float e)"
        '{ a = Einsum<equation="bij,jk->bik">(x, w) b = DepthToSpace<blocksize=2>(d)'
        ' c = DepthToSpace<blocksize=2, mode="CRD">(d) e = SpaceToDepth<blocksize=2>(b) }',
        {"w": None},
        17,
    ),
    "argmax_topk_cumsum": (
        "g (float[3,5] x, int64[1] k, int32 ax) => (int64 a, int64 b, float c, int64 d, float e)"
        "{ a = ArgMax<axis=1>(x) b = ArgMin<axis=0, keepdims=0>(x) c, d = TopK<axis=1>(x, k)"
        " e = CumSum<exclusive=1, reverse=1>(x, ax) }",
        {"k": np.array([2], dtype=np.int64), "ax": np.array(1, dtype=np.int32)},
        17,
    ),
}


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# Attribute corners: opset-dependent forms, ceil/asymmetric pooling, rare resize modes.
EDGE_CASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "maxpool_same_lower_1d_3d": (
        "g (float[2,3,11] x, float[1,2,5,6,7] v) => (float a, float b, float c) { a = "
        'MaxPool<kernel_shape=[4], strides=[3], auto_pad="SAME_LOWER">(x) b = '
        "MaxPool<kernel_shape=[2,3,2], strides=[2,2,1], pads=[0,1,1,1,0,0]>(v) c = "
        "AveragePool<kernel_shape=[3], strides=[2], ceil_mode=1, pads=[1,0]>(x) }",
        {},
        17,
    ),
    "avgpool_ceil_asym_include": (
        "g (float[1,2,10,9] x) => (float a, float b) { a = "
        "AveragePool<kernel_shape=[3,3], strides=[3,2], ceil_mode=1, pads=[2,0,0,1], "
        "count_include_pad=1>(x) b = AveragePool<kernel_shape=[3,3], strides=[3,2], "
        "ceil_mode=1, pads=[2,0,0,1]>(x) }",
        {},
        19,
    ),
    "maxpool_ceil_pads": (
        "g (float[1,2,10,9] x) => (float a) { a = MaxPool<kernel_shape=[3,3], "
        "strides=[3,2], ceil_mode=1, pads=[1,1,1,1]>(x) }",
        {},
        12,
    ),
    "resize_more_modes": (
        "g (float[1,2,5,7] x, float[4] sc, float[4] dn) => (float a, float b, float c, float d, "
        'float e) { a = Identity(x) b = Resize<mode="linear", '
        'coordinate_transformation_mode="half_pixel_symmetric">(x, , sc) c = '
        'Resize<mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5>(x, , sc) d = '
        'Resize<mode="linear">(x, , dn) e = Resize<mode="nearest", nearest_mode="ceil">(x, , dn) '
        "}",
        {"sc": f32(1, 1, 1.7, 2.5), "dn": f32(1, 1, 0.5, 0.6)},
        19,
    ),
    "upsample_linear_7": (
        'g (float[1,2,3,4] x) => (float a) { a = Upsample<mode="linear", '
        "scales=[1.0,1.0,2.0,1.5]>(x) }",
        {},
        7,
    ),
    "upsample_linear_9": (
        'g (float[1,2,3,4] x, float[4] s) => (float a) { a = Upsample<mode="linear">(x, s) }',
        {"s": f32(1, 1, 2, 3)},
        9,
    ),
    "pad_wrap_19": (
        'g (float[2,3,5,6] x, int64[8] p) => (float a) { a = Pad<mode="wrap">(x, p) }',
        {"p": i64(0, 0, 2, 1, 0, 0, 1, 3)},
        19,
    ),
    "pad_reflect_3d_lead": (
        'g (float[5,6] x, int64[4] p) => (float a, float b) { a = Pad<mode="reflect">(x, p) b = '
        'Pad<mode="edge">(x, p) }',
        {"p": i64(1, 2, 3, 1)},
        17,
    ),
    "squeeze_all_13": ("g (float[1,3,1,2] x) => (float a) { a = Squeeze(x) }", {}, 13),
    "reduce_sum_13_noop": (
        "g (float[2,3,4] x, int64[0] e, int64[1] ax) => (float a, float b, float c) { a "
        "= ReduceSum<noop_with_empty_axes=1>(x, e) b = ReduceSum(x, e) c = "
        "ReduceSum<keepdims=0>(x, ax) }",
        {"e": np.zeros(0, np.int64), "ax": i64(-1)},
        13,
    ),
    "split_uneven_18": (
        "g (float[2,7] x) => (float a, float b, float c) { a, b, c = Split<axis=1, "
        "num_outputs=3>(x) }",
        {},
        18,
    ),
    "mod_int_float": (
        "g (int64[6] a, int64[6] b, float[6] x, float[6] y) => (int64 c, int64 d, float "
        "e, int64 q) { c = Mod(a, b) d = Mod<fmod=1>(a, b) e = Mod<fmod=1>(x, y) q = "
        "Div(a, b) }",
        {"b": i64(3, -3, 2, -2, 5, 7)},
        17,
    ),
    "einsum_spaces": (
        'g (float[2,3] x, float[3,4] y) => (float a, float b) { a = Einsum<equation="ij, jk -> '
        'ik">(x, y) b = Einsum<equation="ij->">(x) }',
        {},
        17,
    ),
    "bn_2d_and_in_3d": (
        "g (float[4,3] x, float[3] s, float[3] b, float[3] m, float[3] v, "
        "float[2,3,4,5,2] y) => (float a, float c) { a = BatchNormalization(x, s, b, m, "
        "v) c = InstanceNormalization(y, s, b) }",
        {"s": None, "b": None, "m": None, "v": f32(1, 2, 0.5)},
        15,
    ),
    "gemm_scalar_c_prelu_scalar": (
        "g (float[3,5] a, float[5,4] w, float c, float[1] sl) => (float y, float z) { y "
        "= Gemm<beta=0.5>(a, w, c) z = PRelu(y, sl) }",
        {"w": None, "c": f32(0.3).reshape(()), "sl": f32(0.25)},
        17,
    ),
    "cast_trunc": (
        "g (float[8] x) => (int32 a, uint8 b) { t = Mul(x, x) a = Cast<to=6>(x) b = "
        "Cast<to=2>(t) }",
        {},
        17,
    ),
    "softmax_11_axis0": ("g (float[2,3,4] x) => (float a) { a = Softmax<axis=0>(x) }", {}, 11),
    "slice_empty_and_neg_full": (
        "g (float[5,6] x, int64[2] s, int64[2] e, int64[2] st) => (float a, float b) { a "
        "= Slice(x, s, e) b = Slice(x, e, s, , st) }",
        {"s": i64(3, 0), "e": i64(3, 6), "st": i64(-1, -1)},
        17,
    ),
    "where_bcast_expand_ones": (
        "g (float[3,1] x, int64[3] sh) => (float a) { a = Expand(x, sh) }",
        {"sh": i64(2, 1, 4)},
        17,
    ),
    "hardsigmoid_default_mish_celu": (
        "g (float[3,4] x) => (float a, float b, float c, float d, float e) { a = "
        "HardSigmoid(x) b = Mish(x) c = Celu<alpha=0.5>(x) d = "
        "ThresholdedRelu<alpha=0.3>(x) e = Softsign(x) }",
        {},
        18,
    ),
    "resize_opset11_sizes_roi": (
        "g (float[1,2,5,7] x, float[0] roi, float[0] sc, int64[4] sz) => (float a) { a = "
        'Resize<mode="linear", coordinate_transformation_mode="align_corners">(x, roi, sc, sz) }',
        {"roi": np.zeros(0, np.float32), "sc": np.zeros(0, np.float32), "sz": i64(1, 2, 9, 4)},
        11,
    ),
    "argmax_last": (
        "g (float[3,5] x) => (int64 a) { r = Round(x) a = ArgMax<axis=1, select_last_index=1>(r) }",
        {},
        17,
    ),
    "lrn_even_like": (
        "g (float[2,5,3,3] x) => (float a) { a = LRN<size=1, alpha=0.5, beta=0.5, bias=1.5>(x) }",
        {},
        17,
    ),
    "topk_smallest": (
        "g (float[3,6] x, int64[1] k) => (float v, int64 i) { v, i = TopK<largest=0, "
        "axis=-1>(x, k) }",
        {"k": i64(3)},
        17,
    ),
    "constant_floats": (
        "g (float[3] x) => (float a) { c = Constant<value_floats=[1.0, 2.0, 3.0]>() a = "
        "Mul(x, c) }",
        {},
        17,
    ),
    "resize_tf_half_pixel_for_nn": (
        "g (float[1,2,5,7] x, float[0] roi, float[4] sc) => (float a) { a = "
        'Resize<mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn">(x, roi, '
        "sc) }",
        {"roi": np.zeros(0, np.float32), "sc": f32(1, 1, 1.7, 2.5)},
        11,
    ),
    "conv_transpose_auto_pad": (
        "g (float[1,3,5,5] x, float[3,2,4,3] w) => (float a, float b, float c) { a = "
        'ConvTranspose<strides=[2,2], auto_pad="SAME_UPPER">(x, w) b = '
        'ConvTranspose<strides=[2,2], auto_pad="SAME_LOWER", output_shape=[9,10]>(x, w) c = '
        "ConvTranspose<strides=[2,2], output_shape=[9,12]>(x, w) }",
        {"w": None},
        17,
    ),
}
OP_CASES.update(EDGE_CASES)


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_family_matches_onnxruntime(case: str) -> None:
    body, weights, opset = OP_CASES[case]
    model = build(body, opset=opset, weights=weights)
    assert_matches_ort(model)


def test_every_op_in_the_cases_is_registered_and_exercised() -> None:
    from onnxcompress.torch_bridge.ops import OP_HANDLERS

    used = set()
    for body, weights, opset in OP_CASES.values():
        used |= {n.op_type for n in build(body, opset=opset, weights=weights).graph.node}
    required = {
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Clip",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Softplus",
        "Elu",
        "Selu",
        "Gelu",
        "Erf",
        "Sqrt",
        "Exp",
        "Log",
        "Neg",
        "Abs",
        "Reciprocal",
        "Pow",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Max",
        "Min",
        "Sum",
        "Mean",
        "Equal",
        "Less",
        "Greater",
        "Where",
        "Not",
        "And",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Flatten",
        "Reshape",
        "Concat",
        "Split",
        "Slice",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Pad",
        "Resize",
        "Upsample",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "Softmax",
        "LogSoftmax",
        "Dropout",
        "Identity",
        "Constant",
        "ConstantOfShape",
        "Shape",
        "Gather",
        "GatherElements",
        "Cast",
        "Expand",
        "Tile",
        "Range",
        "Size",
        "LRN",
        "InstanceNormalization",
        "LayerNormalization",
        "Einsum",
    }
    assert required <= set(OP_HANDLERS)
    assert required <= used, sorted(required - used)


def test_opset10_resize_and_coordinate_modes_differ() -> None:
    # Guards against a handler that ignores the coordinate mode: the two must differ.
    body = (
        "g (float[1,1,4,4] x, float[4] sc, float[0] roi) => (float a, float b)"
        '{ a = Resize<mode="linear", coordinate_transformation_mode="asymmetric">(x, roi, sc)'
        ' b = Resize<mode="linear">(x, roi, sc) }'
    )
    model = build(
        body,
        opset=13,
        weights={"sc": np.array([1, 1, 2, 2], np.float32), "roi": np.zeros(0, np.float32)},
    )
    module = assert_matches_ort(model)
    a, b = torch_run(module, random_feeds(model))
    assert not np.allclose(a, b)


# ---------------------------------------------------------------------------------------------
# Real models
# ---------------------------------------------------------------------------------------------


def test_resnet20_raw_matches_onnxruntime(resnet20_path: Path) -> None:
    model = load_model(resnet20_path)
    feeds = {"input": np.random.default_rng(1).standard_normal((3, 3, 32, 32), np.float32)}
    module = assert_matches_ort(model, feeds)
    assert len(list(module.onnx_params)) == len(
        [
            v
            for v in model.graph.initializers.values()
            if v.const_value is not None
            and v.const_value.dtype == ir.DataType.FLOAT
            and v.const_value.shape.rank() > 0
        ]
    )


def test_resnet20_canonical_matches_onnxruntime(resnet20_path: Path) -> None:
    model = load_model(resnet20_path)
    canonicalize(model)
    feeds = {"input": np.random.default_rng(2).standard_normal((2, 3, 32, 32), np.float32)}
    assert_matches_ort(model, feeds)


def perturb_batchnorm_stats(model: ir.Model, seed: int = 5) -> None:
    """Give BN running statistics non-trivial values (untrained nets have 0 and 1)."""
    rng = np.random.default_rng(seed)
    for node in model.graph:
        if node.op_type != "BatchNormalization":
            continue
        for index, low, high in ((3, -0.2, 0.2), (4, 0.5, 1.5)):
            value = node.inputs[index]
            if value is not None and value.const_value is not None:
                shape = value.const_value.shape.numpy()
                array = rng.uniform(low, high, shape).astype(value.const_value.numpy().dtype)
                value.const_value = ir.tensor(array, name=value.name)


# torch.export cannot keep the batch dynamic for these (it specializes it); export it static.
STATIC_BATCH_DYNAMO = frozenset({"convnext_tiny"})


def export_static_dynamo(name: str, size: int, folder: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)(weights=None).eval()
    program = torch.onnx.export(net, (torch.randn(1, 3, size, size),), dynamo=True, verbose=False)
    assert program is not None
    path = folder / f"{name}-static.onnx"
    program.save(str(path))
    return path


def check_zoo_model(name: str, exporter: str, size: int, folder: Path) -> None:
    if exporter == "dynamo" and name in STATIC_BATCH_DYNAMO:
        model = load_model(export_static_dynamo(name, size, folder))
    else:
        model = load_model(export_torchvision(name, exporter, size))
    perturb_batchnorm_stats(model)
    feeds = {
        model.graph.inputs[0].name or "input": np.random.default_rng(3).standard_normal(
            (1, 3, size, size), np.float32
        )
    }
    assert_matches_ort(model, feeds, scale_atol=True)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_fast_zoo(name: str, exporter: str, tmp_path: Path) -> None:
    check_zoo_model(name, exporter, 64, tmp_path)


SLOW_ZOO: list[tuple[str, int]] = [
    ("resnet50", 64),
    ("resnext50_32x4d", 64),
    # VGG and AlexNet end in a fixed 7x7 / 6x6 adaptive pool: the TorchScript exporter needs
    # the input to be 224 for it to be a plain pool.
    ("vgg11_bn", 224),
    ("densenet121", 64),
    ("mobilenet_v3_large", 64),
    ("efficientnet_b0", 64),
    ("regnet_x_400mf", 64),
    ("regnet_y_400mf", 64),
    ("shufflenet_v2_x1_0", 64),
    ("squeezenet1_1", 64),
    ("googlenet", 64),
    ("mnasnet1_0", 64),
    ("convnext_tiny", 64),
    ("wide_resnet50_2", 64),
    ("alexnet", 224),
    ("vgg16", 224),
]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name,size", SLOW_ZOO, ids=[z[0] for z in SLOW_ZOO])
def test_torchvision_slow_zoo(name: str, size: int, exporter: str, tmp_path: Path) -> None:
    check_zoo_model(name, exporter, size, tmp_path)


LIGHT_DIR = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
LIGHT_MODELS = sorted(glob.glob(os.path.join(LIGHT_DIR, "*.onnx")))


def light_model_with_weights(path: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A light model with random weights in place of its ConstantOfShape placeholders."""
    proto = onnx.load(path)
    rng = np.random.default_rng(4)
    shapes = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    kept_nodes, initializers = [], {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            dims = [int(d) for d in shapes[node.input[0]]]
            array = rng.standard_normal(dims).astype(np.float32) * 0.1
            initializers[node.output[0]] = numpy_helper.from_array(array, node.output[0])
        else:
            kept_nodes.append(node)
    for node in kept_nodes:
        # Variances must be positive, or both runtimes agree on NaN and the test proves nothing.
        if node.op_type == "BatchNormalization" and node.input[4] in initializers:
            var = numpy_helper.to_array(initializers[node.input[4]])
            initializers[node.input[4]] = numpy_helper.from_array(np.abs(var) + 0.5, node.input[4])
    graph_names = {o for n in kept_nodes for o in n.output}
    feeds = {}
    for inp in proto.graph.input:
        if inp.name in initializers or inp.name in graph_names:
            continue
        dims = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    used = {i for n in kept_nodes for i in n.input}
    inputs = [i for i in proto.graph.input if i.name in feeds]
    graph = onnx.helper.make_graph(
        kept_nodes,
        proto.graph.name,
        inputs,
        list(proto.graph.output),
        [t for name, t in initializers.items() if name in used],
    )
    model = onnx.helper.make_model(graph, opset_imports=list(proto.opset_import), ir_version=10)
    return model, feeds


@pytest.mark.slow
@pytest.mark.parametrize("path", LIGHT_MODELS, ids=[os.path.basename(p) for p in LIGHT_MODELS])
def test_onnx_light_models(path: str) -> None:
    model, feeds = light_model_with_weights(path)
    assert_matches_ort(model, feeds, scale_atol=True)


# ---------------------------------------------------------------------------------------------
# Training, write-back, selection, errors
# ---------------------------------------------------------------------------------------------


def small_cnn() -> onnx.ModelProto:
    return build(
        "g (float[N,3,8,8] x, float[8,3,3,3] w1, float[8] b1, float[8] s, float[8] sb,"
        " float[8] m, float[8] v, float[4,8] fw, float[4] fb) => (float y)"
        "{ c = Conv<pads=[1,1,1,1], strides=[2,2]>(x, w1, b1)"
        " n = BatchNormalization(c, s, sb, m, v) r = Relu(n) p = GlobalAveragePool(r)"
        " f = Flatten(p) y = Gemm<transB=1>(f, fw, fb) }",
        weights={
            "w1": None,
            "b1": None,
            "s": None,
            "sb": None,
            "m": None,
            "v": np.full(8, 1.5, np.float32),
            "fw": None,
            "fb": None,
        },
    )


def test_training_lowers_loss_and_write_back_reproduces_torch() -> None:
    torch.manual_seed(0)
    proto = small_cnn()
    model = ir.serde.deserialize_model(proto)
    module = OnnxModule(model)
    x = torch.randn(16, 3, 8, 8)
    target = torch.randint(0, 4, (16,))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    running_before = module.buffer_for("m").clone()
    losses = []
    module.train()
    for _ in range(8):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
    assert module.param_for("w1").grad is not None
    # Train mode updated the BN running statistics like torch's BatchNorm.
    assert not torch.allclose(module.buffer_for("m"), running_before)

    module.eval()
    with torch.no_grad():
        expected = module(x).numpy()
    trained = write_back(clone_model(model), module)
    got = ort_run(trained, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # Only initializer values changed: same nodes, names, opset.
    assert [n.op_type for n in trained.graph] == [n.op_type for n in model.graph]
    assert trained.opset_imports == model.opset_imports
    assert set(trained.graph.initializers) == set(model.graph.initializers)
    changed = [
        n
        for n, v in trained.graph.initializers.items()
        if not np.array_equal(
            v.const_value.numpy(), model.graph.initializers[n].const_value.numpy()
        )
    ]
    # b1 feeds a train-mode BN, which cancels any shift, so its gradient is (nearly) zero.
    assert {"w1", "s", "sb", "m", "v", "fw", "fb"} <= set(changed)


def test_batchnorm_train_mode_matches_torch_batchnorm() -> None:
    proto = small_cnn()
    module = OnnxModule(ir.serde.deserialize_model(proto)).train()
    bn = torch.nn.BatchNorm2d(8, eps=1e-5, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(module.param_for("s"))
        bn.bias.copy_(module.param_for("sb"))
        bn.running_mean.copy_(module.buffer_for("m"))
        bn.running_var.copy_(module.buffer_for("v"))
    x = torch.randn(5, 3, 8, 8)
    _, captured = module(x, capture=["c", "n"])
    expected = bn.train()(captured["c"])
    torch.testing.assert_close(captured["n"], expected)
    torch.testing.assert_close(module.buffer_for("m"), bn.running_mean)
    torch.testing.assert_close(module.buffer_for("v"), bn.running_var)


def test_dropout_active_only_in_train_mode() -> None:
    model = build("g (float[64,64] x) => (float y) { y = Dropout<ratio=0.5>(x) }", opset=11)
    module = OnnxModule(ir.serde.deserialize_model(model))
    x = torch.ones(64, 64)
    assert torch.equal(module.eval()(x), x)
    y = module.train()(x)
    assert 0.3 < (y == 0).float().mean().item() < 0.7
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 2.0))


def test_untrained_round_trip_is_bitwise_identical(resnet20_path: Path) -> None:
    model = load_model(resnet20_path)
    module = OnnxModule(model)
    copy = write_back(clone_model(model), module)
    for name, value in model.graph.initializers.items():
        before = value.const_value.numpy()
        after = copy.graph.initializers[name].const_value.numpy()
        assert before.dtype == after.dtype, name
        assert before.tobytes() == after.tobytes(), name
    # The serialized graph differs in nothing but initializer storage.
    a, b = ir.serde.serialize_model(model), ir.serde.serialize_model(copy)
    assert [n.SerializeToString() for n in a.graph.node] == [
        n.SerializeToString() for n in b.graph.node
    ]
    assert a.opset_import == b.opset_import


def test_write_back_preserves_float16_dtype() -> None:
    model = build(
        "g (float16[2,3] x, float16[4,3] w) => (float16 y) { y = Gemm<transB=1>(x, w) }",
        weights={"w": np.arange(12, dtype=np.float16).reshape(4, 3) / 8},
    )
    ir_model = ir.serde.deserialize_model(model)
    module = OnnxModule(ir_model)
    assert module.param_for("w").dtype == torch.float16
    with torch.no_grad():
        module.param_for("w").add_(1.0)
    out = write_back(clone_model(ir_model), module)
    array = out.graph.initializers["w"].const_value.numpy()
    assert array.dtype == np.float16
    np.testing.assert_array_equal(array, np.arange(12, dtype=np.float16).reshape(4, 3) / 8 + 1)


def test_write_back_preserves_bfloat16_dtype() -> None:
    values = [0.5, -1.25, 3.0, 0.0078125, 2.0, -0.75]
    weight = onnx.helper.make_tensor("w", onnx.TensorProto.BFLOAT16, [2, 3], values)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "w"], ["y"])],
        "bf16",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, [2, 3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, [2, 3])],
        [weight],
    )
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph, ir_version=10))
    module = OnnxModule(model)
    assert module.param_for("w").dtype == torch.bfloat16
    assert module.param_for("w").float().flatten().tolist() == values
    with torch.no_grad():
        module.param_for("w").mul_(2.0)
    out = write_back(clone_model(model), module)
    tensor = out.graph.initializers["w"].const_value
    assert tensor.dtype == ir.DataType.BFLOAT16
    assert tensor.numpy().astype(np.float32).flatten().tolist() == [2 * v for v in values]


def test_write_back_rejects_another_model() -> None:
    module = OnnxModule(ir.serde.deserialize_model(small_cnn()))
    # w1 fits (and comes first), the other tensors are missing.
    other = build(
        "g (float[8,3,3,3] x, float[8,3,3,3] w1) => (float y) { y = Add(x, w1) }",
        weights={"w1": None},
        seed=1,
    )
    target = ir.serde.deserialize_model(other)
    before = target.graph.initializers["w1"].const_value.numpy().copy()
    with pytest.raises(OnnxCompressError, match=r"shape|no initializer"):
        write_back(target, module)
    # Nothing was half-written.
    np.testing.assert_array_equal(target.graph.initializers["w1"].const_value.numpy(), before)


def test_unsupported_ops_reported_by_name_before_training(resnet20_path: Path) -> None:
    model = build(
        "g (float[1,4,4] boxes, float[1,1,4] scores, float[2,3] x) => (int64 sel, float y)"
        "{ sel = NonMaxSuppression(boxes, scores) y = Relu(x) }",
        opset=17,
    )
    custom = onnx.helper.make_node("FusedThing", ["y"], ["z"], domain="com.example", name="fuse1")
    model.graph.node.append(custom)
    model.graph.output.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None))
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    model.graph.node[0].name = "nms_0"
    ir_model = ir.serde.deserialize_model(model)
    assert check_supported(ir_model) == [
        ("nms_0", "NonMaxSuppression"),
        ("fuse1", "com.example::FusedThing"),
    ]
    with pytest.raises(UnsupportedOpError) as info:
        OnnxModule(ir_model)
    message = str(info.value)
    assert "nms_0" in message and "NonMaxSuppression" in message and "fuse1" in message
    assert "\n" not in message
    assert check_supported(load_model(resnet20_path)) == []


def test_unsupported_attribute_values_are_reported() -> None:
    model = build(
        "g (float[1,1,4,4] x, float[4] sc) => (float y)"
        '{ y = Resize<mode="linear", coordinate_transformation_mode="tf_crop_and_resize">'
        "(x, , sc) }",
        weights={"sc": np.array([1, 1, 2, 2], np.float32)},
        opset=13,
    )
    unsupported = check_supported(ir.serde.deserialize_model(model))
    assert [op for _, op in unsupported] == ["Resize"]


def two_conv_model() -> onnx.ModelProto:
    return build(
        "g (float[1,3,6,6] x, float[4,3,3,3] w1, float[4] b1, float[4,4,1,1] w2, float[4] b2)"
        " => (float y)"
        "{ a = Conv<pads=[1,1,1,1]>(x, w1, b1) r = Relu(a) y = Conv(r, w2, b2) }",
        weights={"w1": None, "b1": None, "w2": None, "b2": None},
    )


def named_two_conv() -> ir.Model:
    proto = two_conv_model()
    for node, name in zip(proto.graph.node, ["stem/conv", "act", "head/conv"], strict=True):
        node.name = name
    return ir.serde.deserialize_model(proto)


def test_trainable_by_node_name_and_regex() -> None:
    module = OnnxModule(named_two_conv(), trainable=["head/conv"])
    assert module.trainable_names == ["b2", "w2"]
    assert not module.param_for("w1").requires_grad
    assert module.param_for("w2").requires_grad
    loss = module(torch.randn(1, 3, 6, 6)).square().sum()
    loss.backward()
    assert module.param_for("w1").grad is None and module.param_for("w2").grad is not None

    module = OnnxModule(named_two_conv(), trainable=r"^stem/")
    assert module.trainable_names == ["b1", "w1"]
    assert OnnxModule(named_two_conv(), trainable="none").trainable_names == []
    with pytest.raises(PassConfigError, match="matches no node"):
        OnnxModule(named_two_conv(), trainable=r"^nothing")
    with pytest.raises(PassConfigError, match="unknown node"):
        OnnxModule(named_two_conv(), trainable=["nope"])


def test_safe_keys_map_back_to_onnx_names(resnet20_path: Path) -> None:
    model = load_model(resnet20_path)
    module = OnnxModule(model)
    names = {v.name for v in model.graph.initializers.values()}
    for key in module.onnx_params:
        assert "." not in key
        assert module.onnx_name_of(key) in names
        assert module.param_for(module.onnx_name_of(key)) is module.onnx_params[key]
    assert module.param_for("linear.weight").shape == (10, 64)
    assert all(k.count(".") == 1 for k in module.state_dict())


def test_capture_returns_named_intermediates_and_inputs_by_name() -> None:
    module = OnnxModule(named_two_conv()).eval()
    x = torch.randn(1, 3, 6, 6)
    y, captured = module.forward_with({"x": x}, capture=["r", "x"])
    assert torch.equal(captured["x"], x)
    assert torch.all(captured["r"] >= 0)
    torch.testing.assert_close(y, module(x))
    with pytest.raises(KeyError, match="no tensor"):
        module(x, capture=["missing"])


def test_intermediates_are_freed_after_last_use(resnet20_path: Path) -> None:
    module = OnnxModule(load_model(resnet20_path))
    outputs = set(module._output_slots)
    freed = {slot for step in module._steps for slot in step.free}
    produced = {slot for step in module._steps for slot in step.outputs if slot >= 0}
    # Every produced intermediate that is not a graph output is dropped at some step.
    assert produced - outputs <= freed
    assert not outputs & freed


def test_topological_order_is_restored() -> None:
    proto = two_conv_model()
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    module = OnnxModule(ir.serde.deserialize_model(proto)).eval()
    feeds = random_feeds(two_conv_model())
    expected = ort_run(two_conv_model(), feeds)[0]
    np.testing.assert_allclose(torch_run(module, feeds)[0], expected, rtol=RTOL, atol=ATOL)


def test_module_round_trips_through_state_dict() -> None:
    module = OnnxModule(named_two_conv())
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    other = OnnxModule(named_two_conv())
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(other.eval()(x), module.eval()(x))


def test_trainable_regex_errors_are_user_errors() -> None:
    with pytest.raises(PassConfigError, match="invalid"):
        OnnxModule(named_two_conv(), trainable="([")
