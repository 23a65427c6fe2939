"""The cheapconv pass: exact when the kernel allows it, valid graphs for every conv style.

The rewritten graph is checked against the original graph run with the *approximated* kernel
(the one its factors compose to): that pins the wiring (pads, auto_pad, strides, dilations,
shifts, shuffles) to 1e-4 independently of how good the approximation is.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcompress.passes.cheapconv as cheapconv_module
import onnxcompress.passes.cheapconv_init as cheapconv_init_module
from onnxcompress.deadline import BudgetTooShortError, ManualClock
from onnxcompress.errors import PassConfigError
from onnxcompress.fitting import cheap_kernels
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import clone_model, load_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.cheapconv import CheapConvConfig
from onnxcompress.runtime.session import make_session

VARIANTS = {
    "separable": {"kind": "separable"},
    "group": {"kind": "group", "groups": 2},
    "shuffle": {"kind": "group", "groups": 2, "mix": "shuffle"},
    "shift": {"kind": "shift"},
    "shift_conv": {"kind": "shift", "shift_op": "conv"},
}

# (conv attributes, kernel (kh, kw), input size): the styles exporters write.
STYLES = {
    "pads": ({"pads": [1, 1, 1, 1]}, (3, 3), 9),
    "asymmetric_pads": ({"pads": [0, 2, 1, 0]}, (3, 3), 9),
    "no_pads": ({}, (3, 3), 9),
    "same_upper_stride2": ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (3, 3), 9),
    "same_lower": ({"auto_pad": "SAME_LOWER"}, (4, 4), 9),
    "valid": ({"auto_pad": "VALID"}, (3, 3), 9),
    "dilation2": ({"pads": [2, 2, 2, 2], "dilations": [2, 2]}, (3, 3), 9),
    "stride2": ({"pads": [1, 1, 1, 1], "strides": [2, 2]}, (3, 3), 10),
    "rect_5x3": ({"pads": [2, 1, 2, 1], "strides": [1, 2]}, (5, 3), 9),
}


def build(
    attrs: dict,
    kernel: tuple[int, int],
    size: int | str,
    *,
    cin: int = 8,
    cout: int = 12,
    weight: np.ndarray | None = None,
    bias: bool = True,
    seed: int = 0,
) -> ir.Model:
    """input -> stem conv (3->cin) -> Relu -> conv under test (cin->cout) -> Relu -> output."""
    rng = np.random.default_rng(seed)
    stem = rng.standard_normal((cin, 3, 3, 3)).astype(np.float32) * 0.3
    if weight is None:
        weight = rng.standard_normal((cout, cin, *kernel)).astype(np.float32) * 0.2
    inits = [numpy_helper.from_array(stem, "stem.w"), numpy_helper.from_array(weight, "conv.w")]
    conv_inputs = ["a", "conv.w"]
    if bias:
        b = rng.standard_normal(weight.shape[0]).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(b, "conv.b"))
        conv_inputs.append("conv.b")
    nodes = [
        helper.make_node("Conv", ["input", "stem.w"], ["s"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["a"], name="relu0"),
        helper.make_node("Conv", conv_inputs, ["c"], name="conv", **attrs),
        helper.make_node("Relu", ["c"], ["output"], name="relu1"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    return model


def run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = make_session(model, optimize=False)
    return np.asarray(session.run(None, {"input": x})[0])


def cheapconv(model: ir.Model, **options) -> dict:
    options.setdefault("epochs", 0)
    options.setdefault("min_channels", 1)
    compression = create_pass("cheapconv", options, PassContext())
    compression(model)
    return compression.report.as_dict()


def equivalent_kernel(weight: np.ndarray, options: dict) -> np.ndarray:
    """The standard kernel the pass's factors compose to (what the new graph must compute)."""
    kind = options["kind"]
    cout, cin = weight.shape[:2]
    if kind == "separable":
        f = cheap_kernels.separable(weight)
        return f.pointwise.reshape(cout, cin, 1, 1) * f.depthwise.reshape(1, cin, *weight.shape[2:])
    if kind == "shift":
        s = cheap_kernels.shift(weight)
        one_hot = s.one_hot(tuple(weight.shape[2:]), weight.dtype)
        return s.pointwise.reshape(cout, cin, 1, 1) * one_hot.reshape(1, cin, *weight.shape[2:])
    groups = options["groups"]
    width_in, width_out = cin // groups, cout // groups
    full = np.zeros_like(weight)
    if options.get("mix") == "shuffle":
        sh = cheap_kernels.shuffled(weight, groups)
        for row, channel in enumerate(sh.order):
            block = row // width_out
            full[channel, block * width_in : (block + 1) * width_in] = sh.grouped[row]
        return full
    g = cheap_kernels.grouped(weight, groups, CheapConvConfig().refine)
    for j in range(groups):
        rows = slice(j * width_out, (j + 1) * width_out)
        full[rows, j * width_in : (j + 1) * width_in] = g.grouped[rows]
    return np.einsum("om,mchw->ochw", g.mixing[:, :, 0, 0], full)


def with_kernel(model: ir.Model, kernel: np.ndarray) -> ir.Model:
    reference = clone_model(model)
    value = reference.graph.initializers["conv.w"]
    value.const_value = ir.tensor(kernel.astype(np.float32), name="conv.w")
    return reference


def ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def check_valid(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


# ---------------------------------------------------------------------------------------------
# Exactness and wiring
# ---------------------------------------------------------------------------------------------


def test_exactly_separable_conv_is_replaced_without_output_change():
    rng = np.random.default_rng(3)
    depthwise = rng.standard_normal((8, 3, 3)).astype(np.float32)
    pointwise = rng.standard_normal((12, 8)).astype(np.float32) * 0.3
    weight = pointwise[:, :, None, None] * depthwise[None]
    model = build({"pads": [1, 1, 1, 1]}, (3, 3), 10, weight=weight)
    original = clone_model(model)
    report = cheapconv(model, kind="separable")
    check_valid(model)
    assert [layer["node"] for layer in report["layers"]] == ["conv"]
    assert report["layers"][0]["rel_error"] < 1e-6
    convs = [n for n in model.graph if n.op_type == "Conv"]
    groups = [n.attributes["group"].as_int() if "group" in n.attributes else 1 for n in convs]
    assert groups == [1, 8, 1]
    x = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), run(original, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rewrite_computes_the_approximated_kernel(style: str, variant: str):
    attrs, kernel, size = STYLES[style]
    options = VARIANTS[variant]
    model = build(attrs, kernel, size)
    weight = model.graph.initializers["conv.w"].const_value.numpy().copy()  # type: ignore[union-attr]
    reference = with_kernel(model, equivalent_kernel(weight, options))
    report = cheapconv(model, **options)
    check_valid(model)
    assert len(report["layers"]) == 1, report["declined"]
    assert "conv.w" not in model.graph.initializers  # the original kernel is gone
    x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    got, want = run(model, x), run(reference, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    if variant == "shift":
        assert "Slice" in ops(model) and ops(model).count("Conv") == 2  # stem + pointwise
    if variant == "shuffle":
        assert "Gather" in ops(model) and ops(model).count("Conv") == 2


def test_shift_slices_work_for_any_input_size():
    """Explicit pads: the Slice ends count from the end, so dynamic spatial dims work."""
    model = build({"pads": [1, 1, 1, 1], "strides": [2, 2]}, (3, 3), "S")
    weight = model.graph.initializers["conv.w"].const_value.numpy().copy()  # type: ignore[union-attr]
    reference = with_kernel(model, equivalent_kernel(weight, {"kind": "shift"}))
    report = cheapconv(model, kind="shift")
    assert report["layers"][0].get("shift_op") is None  # Slice, no fallback
    check_valid(model)
    for size in (7, 12):
        x = np.random.default_rng(size).standard_normal((1, 3, size, size)).astype(np.float32)
        np.testing.assert_allclose(run(model, x), run(reference, x), rtol=1e-4, atol=1e-5)


def test_same_padding_with_dynamic_size_falls_back_to_fixed_conv():
    model = build({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (3, 3), "S")
    report = cheapconv(model, kind="shift")
    assert report["layers"][0]["shift_op"] == "conv"
    check_valid(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 11, 11)).astype(np.float32)
    assert run(model, x).shape == (1, 12, 6, 6)


def test_closed_form_errors_are_least_squares():
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 8, 3, 3))
    sep = cheap_kernels.separable(weight)
    # Eckart-Young: the rank-1 residual is the energy beyond the first singular value.
    residual = sum(
        (np.linalg.svd(weight[:, c].reshape(16, 9), compute_uv=False)[1:] ** 2).sum()
        for c in range(8)
    )
    assert sep.rel_error == pytest.approx(np.sqrt(residual / (weight**2).sum()), rel=1e-9)
    plain = cheap_kernels.grouped(weight, 4, iterations=0)
    refined = cheap_kernels.grouped(weight, 4, iterations=10)
    block_only = np.sqrt(1 - 1 / 4)  # random kernel: 1/4 of the energy is block-diagonal
    assert refined.rel_error < plain.rel_error < block_only + 0.05
    energy = cheap_kernels.shuffled(weight, 4, "energy").rel_error
    assert energy < cheap_kernels.shuffled(weight, 4, "interleave").rel_error
    shift = cheap_kernels.shift(weight)
    peak = (weight.reshape(16, 8, 9) ** 2).sum(0).max(axis=1).sum()
    assert shift.rel_error == pytest.approx(np.sqrt(1 - peak / (weight**2).sum()), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "factor"),
    [
        ({"kind": "separable"}, 1 / 9 + 1 / 32),
        ({"kind": "shift"}, 1 / 9),
        ({"kind": "group", "groups": 4}, 1 / 4 + 1 / 9),
        ({"kind": "group", "groups": 4, "mix": "shuffle"}, 1 / 4),
    ],
)
def test_macs_of_replaced_layers_fall_by_the_expected_factor(options: dict, factor: float):
    model = build({"pads": [1, 1, 1, 1]}, (3, 3), 8, cin=32, cout=32)
    before = model_metrics(model).layers[1].macs
    report = cheapconv(model, **options)
    layer = report["layers"][0]
    assert layer["macs_before"] == before
    assert layer["macs_after"] / layer["macs_before"] == pytest.approx(factor, rel=1e-9)
    assert report["summary"]["replaced_macs_ratio"] == pytest.approx(factor, rel=1e-9)
    assert model_metrics(model).macs == model_metrics(model).layers[0].macs + layer["macs_after"]


# ---------------------------------------------------------------------------------------------
# What is left alone
# ---------------------------------------------------------------------------------------------


def test_first_grouped_pointwise_and_excluded_convs_are_untouched():
    rng = np.random.default_rng(0)

    def w(*shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.2)

    inits = {
        "w0": w(8, 3, 3, 3), "w1": w(8, 1, 3, 3), "w2": w(8, 4, 3, 3),
        "w3": w(16, 8, 1, 1), "w4": w(16, 16, 3, 3), "w5": w(16, 16, 3, 3),
    }  # fmt: skip
    for name, tensor in inits.items():
        tensor.name = name
    chain = [
        ("first", "w0", {}),
        ("depthwise", "w1", {"group": 8}),
        ("grouped", "w2", {"group": 2}),
        ("pointwise", "w3", {}),
        ("kept", "w4", {}),
        ("replaced", "w5", {}),
    ]
    nodes, source = [], "input"
    for name, weight, attrs in chain:
        pads = [0] * 4 if name == "pointwise" else [1] * 4
        nodes.append(
            helper.make_node("Conv", [source, weight], [name], name=name, pads=pads, **attrs)
        )
        source = name
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 6, 6])],
        [helper.make_tensor_value_info(source, TensorProto.FLOAT, None)],
        list(inits.values()),
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    report = cheapconv(model, kind="separable", exclude=("nothing", "kep*"))
    assert [layer["node"] for layer in report["layers"]] == ["replaced"]
    reasons = {d["node"]: d["reason"] for d in report["declined"]}
    assert set(reasons) == {"first", "depthwise", "grouped", "pointwise", "kept"}
    assert "first convolution" in reasons["first"]
    assert "group=8" in reasons["depthwise"] and "group=2" in reasons["grouped"]
    assert "1x1" in reasons["pointwise"]
    assert "exclude=kep*" in reasons["kept"]
    names = {n.name for n in model.graph}
    assert {"first", "depthwise", "grouped", "pointwise", "kept"} <= names
    assert "replaced" not in names
    check_valid(model)
    assert [v.name for v in model.graph.outputs] == ["replaced"]  # the output keeps its name
    run(model, np.ones((1, 3, 6, 6), np.float32))


def test_min_channels_and_indivisible_groups_are_declined():
    model = build({"pads": [1, 1, 1, 1]}, (3, 3), 8, cin=6, cout=10)
    report = create_pass("cheapconv", {"epochs": 0}, PassContext())
    report(model)
    assert not report.report.layers
    assert "min_channels=8" in report.report.declined[-1].reason
    declined = cheapconv(model, kind="group", groups=4)["declined"]
    assert "does not divide" in declined[-1]["reason"]
    assert not create_pass("cheapconv", {"epochs": 0}, PassContext()).report.modified


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "pointwise"},
        {"kind": "group", "groups": 1},
        {"mix": "mixer"},
        {"shift_op": "roll"},
        {"distill": "online", "students": 1},
        {"smoothness": 1.0},
        {"epochs": -1},
        {"init": "data"},
        {"ridge": -1.0},
        {"rounds": -1},
    ],
)
def test_bad_options_raise_pass_config_error(options: dict):
    with pytest.raises(PassConfigError):
        create_pass("cheapconv", options)


# ---------------------------------------------------------------------------------------------
# Data-driven initialization
# ---------------------------------------------------------------------------------------------


def two_conv_net(seed: int) -> ir.Model:
    """input -> stem -> Relu -> conv1 (8->12) -> Relu -> conv2 (12->8, stride 2) -> Relu."""
    rng = np.random.default_rng(seed)
    shapes = {"stem.w": (8, 3, 3, 3), "c1.w": (12, 8, 3, 3), "c2.w": (8, 12, 3, 3)}
    inits = [
        numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
        for name, shape in shapes.items()
    ]
    inits += [
        numpy_helper.from_array((rng.standard_normal(c) * 0.1).astype(np.float32), f"{n}.b")
        for n, c in (("c1", 12), ("c2", 8))
    ]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["input", "stem.w"], ["s"], name="stem", pads=pads),
        helper.make_node("Relu", ["s"], ["a"], name="r0"),
        helper.make_node("Conv", ["a", "c1.w", "c1.b"], ["y1"], name="conv1", pads=pads),
        helper.make_node("Relu", ["y1"], ["b"], name="r1"),
        helper.make_node(
            "Conv", ["b", "c2.w", "c2.b"], ["y2"], name="conv2", pads=pads, strides=[2, 2]
        ),
        helper.make_node("Relu", ["y2"], ["output"], name="r2"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    return model


def smooth_images(count: int, seed: int) -> np.ndarray:
    """Spatially correlated inputs (a box blur of noise), unlike the white noise the
    data-free fit implicitly assumes: here the data fit has something to gain."""
    noise = np.random.default_rng(seed).standard_normal((count, 3, 14, 14))
    blurred = sum(noise[:, :, i : i + 12, j : j + 12] for i in range(3) for j in range(3))
    return (blurred / 3.0 + 0.2).astype(np.float32)


def activation_errors(model: ir.Model, original: ir.Model, x: np.ndarray) -> list[float]:
    """Relative error of the replaced convs' outputs (names kept) against the original's."""
    from onnxcompress.runtime.capture import capture_tensors

    got = capture_tensors(model, ["y1", "y2"], x)
    want = capture_tensors(original, ["y1", "y2"], x)
    return [
        float(np.linalg.norm(got[n] - want[n]) / np.linalg.norm(want[n] - want[n].mean()))
        for n in ("y1", "y2")
    ]


@pytest.mark.parametrize("kind", ["separable", "shift", "group"])
@pytest.mark.parametrize("seed", [0, 1])
def test_data_fit_beats_weight_fit_on_held_out_activations(kind: str, seed: int):
    original = two_conv_net(seed)
    calibration, held_out = smooth_images(48, seed), smooth_images(32, seed + 100)
    options = {"kind": kind, "groups": 2, "epochs": 0, "min_channels": 1}
    results = {}
    for init in ("weights", "activations"):
        model = clone_model(original)
        context = PassContext(calibration=calibration if init == "activations" else None)
        compression = create_pass("cheapconv", {**options, "init": init}, context)
        compression(model)
        check_valid(model)
        report = compression.report.as_dict()
        assert report["summary"]["init"] == init
        results[init] = activation_errors(model, original, held_out)
    # Both layers improve on unseen inputs, and the drift correction shows at the second.
    weights, activations = results["weights"], results["activations"]
    assert all(a < w for a, w in zip(activations, weights, strict=True)), results
    layers = report["layers"]
    assert [layer["node"] for layer in layers] == ["conv1", "conv2"]
    assert all(layer["act_rel_error"] <= layer["act_rel_error_weights"] + 1e-12 for layer in layers)


def test_separable_alternation_refits_the_depthwise_taps():
    original = two_conv_net(2)
    calibration, held_out = smooth_images(48, 2), smooth_images(32, 102)
    errors = {}
    for rounds in (0, 6):
        model = clone_model(original)
        options = {"kind": "separable", "epochs": 0, "min_channels": 1, "rounds": rounds}
        create_pass("cheapconv", options, PassContext(calibration=calibration))(model)
        taps = [
            model.graph.initializers[v.name].const_value.numpy().copy()  # type: ignore[union-attr]
            for n in model.graph
            if n.name.endswith("/depthwise")
            for v in n.inputs[1:2]
            if v is not None and v.name
        ]
        errors[rounds] = (activation_errors(model, original, held_out), taps)
    closed_form = cheap_kernels.separable(
        original.graph.initializers["c1.w"].const_value.numpy()  # type: ignore[union-attr]
    ).depthwise
    np.testing.assert_allclose(errors[0][1][0], closed_form)  # rounds=0: taps untouched
    assert not np.allclose(errors[6][1][0], closed_form)
    assert errors[6][0][0] < errors[0][0][0]


def test_data_fit_keeps_exactly_separable_conv_exact():
    rng = np.random.default_rng(4)
    depthwise = rng.standard_normal((8, 3, 3)).astype(np.float32)
    pointwise = rng.standard_normal((12, 8)).astype(np.float32) * 0.3
    weight = pointwise[:, :, None, None] * depthwise[None]
    model = build({"pads": [1, 1, 1, 1]}, (3, 3), 10, weight=weight)
    original = clone_model(model)
    calibration = rng.standard_normal((16, 3, 10, 10)).astype(np.float32)
    options = {"kind": "separable", "epochs": 0, "min_channels": 1, "init": "activations"}
    compression = create_pass("cheapconv", options, PassContext(calibration=calibration))
    compression(model)
    check_valid(model)
    assert compression.report.layers[0]["act_rel_error"] < 1e-3
    x = rng.standard_normal((2, 3, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), run(original, x), rtol=1e-4, atol=1e-4)


def test_activation_init_without_data_is_a_config_error():
    model = build({"pads": [1, 1, 1, 1]}, (3, 3), 9)
    compression = create_pass("cheapconv", {"init": "activations", "min_channels": 1})
    with pytest.raises(PassConfigError, match="calibration"):
        compression(model)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def digits_model() -> ir.Model:
    rng = np.random.default_rng(0)
    shapes = {"w0": (8, 1, 3, 3), "w1": (8, 8, 3, 3), "fc": (10, 8)}
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.4, n)
        for n, s in shapes.items()
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w0"], ["a"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["b"], name="r0"),
        helper.make_node("Conv", ["b", "w1"], ["c"], name="body", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["d"], name="r1"),
        helper.make_node("GlobalAveragePool", ["d"], ["e"], name="gap"),
        helper.make_node("Flatten", ["e"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["output"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    return model


@pytest.mark.parametrize(
    ("distill", "batchnorm"), [("online", False), ("offline", False), ("offline", True)]
)
def test_training_updates_the_cheap_convs_but_never_the_fixed_shift(distill: str, batchnorm: bool):
    model = digits_model()
    options = {
        "kind": "shift",
        "shift_op": "conv",
        "epochs": 1,
        "distill": distill,
        "students": 2,
        "batch_size": 32,
        "batchnorm": batchnorm,
    }
    compression = create_pass("cheapconv", options, PassContext(train_spec="digits[:256]"))
    untrained = clone_model(model)
    cheapconv(untrained, kind="shift", shift_op="conv")
    compression(model)
    training = compression.report.summary["training"]
    assert training["ran"] and training["distill"] == distill
    assert len(training["history"]) == 2
    inits = model.graph.initializers
    before = untrained.graph.initializers
    fixed = [n for n in inits if n.endswith(".shift.weight")]
    trained = [n for n in inits if n.endswith(".pointwise.weight")] + ["fc"]
    assert fixed and trained
    for name in fixed:  # one-hot kernels are constants of the architecture
        np.testing.assert_array_equal(
            inits[name].const_value.numpy(), before[name].const_value.numpy()
        )  # type: ignore[union-attr]
    for name in trained:
        assert not np.allclose(inits[name].const_value.numpy(), before[name].const_value.numpy())  # type: ignore[union-attr]
    # BatchNorms put back for the training (after the trained convs only) are folded away.
    assert [n.op_type for n in model.graph] == [n.op_type for n in untrained.graph]
    check_valid(model)


def test_separable_training_with_batchnorm_only_where_a_nonlinearity_follows(
    batchnorm_insertions,
):
    inserted = batchnorm_insertions
    model = digits_model()
    options = {
        "kind": "separable",
        "epochs": 1,
        "batch_size": 32,
        "batchnorm": True,
        "batchnorm_between_convs": False,
    }
    compression = create_pass("cheapconv", options, PassContext(train_spec="digits[:256]"))
    untrained = clone_model(model)
    cheapconv(untrained, kind="separable")
    compression(model)
    assert compression.report.summary["training"]["ran"]
    # A BN after every conv but the depthwise halves (each feeds only its 1x1 conv).
    convs = [n.name or "" for n in untrained.graph if n.op_type == "Conv"]
    not_depthwise = [name for name in convs if not name.endswith("/depthwise")]
    assert len(inserted) == 1 and len(inserted[0]) == len(not_depthwise) < len(convs)
    inits, before = model.graph.initializers, untrained.graph.initializers
    depthwise = [n for n in inits if n.endswith(".depthwise.weight")]
    assert depthwise
    for name in depthwise:  # trained, though no BatchNorm followed them
        assert not np.allclose(inits[name].const_value.numpy(), before[name].const_value.numpy())  # type: ignore[union-attr]
    assert [n.op_type for n in model.graph] == [n.op_type for n in untrained.graph]
    check_valid(model)


@pytest.mark.parametrize(
    ("options", "hints"),
    [
        # Default: the last feature map of the conv's shape both networks compute (the ReLU
        # after the replaced conv), found on the graph.
        ({}, ["d"]),
        ({"hints": "convs"}, ["c"]),  # the replaced conv's output, kept by its 1x1
        ({"hint_weight": 0.0}, []),
    ],
)
def test_offline_distillation_hints_at_the_stage_outputs_by_default(options: dict, hints: list):
    model = digits_model()
    options = {"kind": "separable", "epochs": 1, "batch_size": 32, **options}
    compression = create_pass("cheapconv", options, PassContext(train_spec="digits[:128]"))
    compression(model)
    training = compression.report.summary["training"]
    assert training["ran"] and training["hints"] == hints


def test_no_training_without_data():
    model = digits_model()
    compression = create_pass("cheapconv", {"epochs": 3}, PassContext())
    compression(model)
    assert compression.report.summary["training"] == {
        "ran": False,
        "reason": "no training data (give --data)",
    }


# ---------------------------------------------------------------------------------------------
# Time budget: on a clock that moves per unit of work, never the wall clock
# ---------------------------------------------------------------------------------------------


def digits_chain(bodies: int = 4) -> ir.Model:
    """``digits_model`` with ``bodies`` 8->8 3x3 convs after the stem: one fit each."""
    rng = np.random.default_rng(0)
    shapes = {"w0": (8, 1, 3, 3), **{f"w{i}": (8, 8, 3, 3) for i in range(1, bodies + 1)}}
    shapes["fc"] = (10, 8)
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.4, n)
        for n, s in shapes.items()
    ]
    nodes = [helper.make_node("Conv", ["input", "w0"], ["a0"], name="stem", pads=[1] * 4)]
    for i in range(1, bodies + 1):
        nodes.append(helper.make_node("Relu", [f"a{i - 1}"], [f"r{i}"], name=f"relu{i}"))
        nodes.append(
            helper.make_node("Conv", [f"r{i}", f"w{i}"], [f"a{i}"], name=f"body{i}", pads=[1] * 4)
        )
    nodes += [
        helper.make_node("GlobalAveragePool", [f"a{bodies}"], ["e"], name="gap"),
        helper.make_node("Flatten", ["e"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc"], ["output"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    return model


def digits_images(count: int) -> np.ndarray:
    from onnxcompress.runtime.evaluate import dataset_for_model

    return dataset_for_model(digits_chain(), f"digits[:{count}]").x


@pytest.fixture
def fit_clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """A clock that moves 0.01 s per calibration image a layer's init fit reads."""
    clock = ManualClock()
    real = cheapconv_init_module.pair_statistics

    def timed(source: ir.Model, target: ir.Model, x: np.ndarray, batch: int) -> object:
        clock.advance(0.01 * len(x))
        return real(source, target, x, batch)

    monkeypatch.setattr(cheapconv_init_module, "pair_statistics", timed)
    return clock


def budgeted(options: dict, context: PassContext, clock: ManualClock) -> object:
    compression = create_pass("cheapconv", options, context)
    compression.clock = clock  # type: ignore[attr-defined]
    return compression


@pytest.mark.parametrize(
    ("budget", "images", "closed_form"),
    [
        # Unhurried: every layer fits on all 64 images.
        (100.0, [64, 64, 64, 64], 0),
        # 0.64 s for the first fit (untimed: all images), then an even share of what is left
        # for each of the others (0.86 s / 3, 0.58 s / 2, ...), at the 0.01 s per image the
        # first one measured (rounded down).
        (1.5, [64, 28, 28, 29], 0),
        # 0.16 s left after the first: a third or half of it holds fewer than MIN_FIT_IMAGES
        # (16), the closed form stays; the last layer has it all, 16 images.
        (0.8, [64, 0, 0, 16], 2),
    ],
)
def test_the_init_fits_on_fewer_images_when_its_share_of_the_budget_runs_out(
    fit_clock: ManualClock, budget: float, images: list[int], closed_form: int
) -> None:
    model = digits_chain(4)
    options = {"epochs": 0, "init": "activations", "time_budget_s": budget}
    compression = budgeted(options, PassContext(calibration=digits_images(64)), fit_clock)
    compression(model)  # type: ignore[operator]
    report = compression.report  # type: ignore[attr-defined]
    assert [layer["init_images"] for layer in report.layers] == images
    assert report.summary["time"]["spent_s"] <= budget
    shortened = report.summary.get("init_shortened")
    if images == [64] * 4:
        assert shortened is None
    else:
        assert len(shortened["fewer_images"]) + len(shortened["closed_form"]) == 3
        assert len(shortened["closed_form"]) == closed_form
    # A layer that kept the closed form has no activation error; the others improved on it.
    for layer in report.layers:
        assert ("act_rel_error" in layer) == (layer["init_images"] > 0)
    check_valid(model)


def test_the_whole_pass_with_training_ends_within_its_budget(
    fit_clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading the data (1 s a set), the init fits and the training steps (0.05 s each) all
    draw from the one deadline; the init takes half of what the training's minimum leaves."""
    from onnxcompress.torch_bridge import finetune_trainer as trainer_module

    real_load, real_step = PassContext.load, trainer_module.Trainer._step

    def load(model: ir.Model, spec: str | None) -> object:
        fit_clock.advance(1.0)
        return real_load(model, spec)

    def step(self: object, *args: object) -> float:
        fit_clock.advance(0.05)
        return real_step(self, *args)

    monkeypatch.setattr(PassContext, "load", staticmethod(load))
    monkeypatch.setattr(trainer_module.Trainer, "_step", step)
    budget = 6.0
    # No ``epochs``: under a budget the default trains until the clock ends the run.
    options = {"batch_size": 32, "time_budget_s": budget, "init": "activations"}
    context = PassContext(calibration=digits_images(64), train_spec="digits[:256]")
    compression = budgeted(options, context, fit_clock)
    model = digits_chain(4)
    compression(model)  # type: ignore[operator]
    summary = compression.report.summary  # type: ignore[attr-defined]
    phases = summary["time"]["phases_s"]
    assert phases["data"] == 2.0  # training and validation sets, loaded inside the budget
    assert phases["init"] <= (budget - 2.0) / 2 + 0.01
    assert summary["training"]["ran"] and summary["training"]["out_of_time"]
    assert summary["time"]["spent_s"] <= budget + 0.05 + 1e-9  # at most one step past it
    check_valid(model)


def test_a_budget_that_cannot_hold_the_training_is_refused_before_the_init(
    fit_clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_load = PassContext.load
    fits: list[str] = []

    def load(model: ir.Model, spec: str | None) -> object:
        fit_clock.advance(2.5)
        return real_load(model, spec)

    from onnxcompress.torch_bridge.module import OnnxModule

    real_forward = OnnxModule.forward

    def forward(self: OnnxModule, *args: object, **kwargs: object) -> object:
        fit_clock.advance(0.1)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(PassContext, "load", staticmethod(load))
    monkeypatch.setattr(OnnxModule, "forward", forward)
    monkeypatch.setattr(
        cheapconv_module.CheapConvolutions,
        "_fit_layer",
        lambda self, model, original, layer, *rest: fits.append(layer["node"]),
    )
    # Loading the training data and (no) validation data: 5 s of a 4 s budget.
    options = {"epochs": 5, "time_budget_s": 4.0, "init": "activations"}
    context = PassContext(calibration=digits_images(64), train_spec="digits[:256]")
    compression = budgeted(options, context, fit_clock)
    with pytest.raises(BudgetTooShortError) as caught:
        compression(digits_chain(2))  # type: ignore[operator]
    message = str(caught.value)
    assert message.startswith("cheapconv: time_budget_s=4 cannot hold the minimum work")
    assert "after loading the data (5.0 s), training: " in message
    assert fits == []  # refused before the init spent anything


# ---------------------------------------------------------------------------------------------
# Zoo
# ---------------------------------------------------------------------------------------------


ZOO_CASES = [
    pytest.param("resnet18", "torchscript", 64, id="resnet18-torchscript"),
    pytest.param("resnet18", "dynamo", 64, id="resnet18-dynamo", marks=pytest.mark.slow),
    pytest.param("vgg11_bn", "torchscript", 224, id="vgg11_bn-torchscript", marks=pytest.mark.slow),
    pytest.param("vgg11_bn", "dynamo", 224, id="vgg11_bn-dynamo", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "exporter", "size"), ZOO_CASES)
def test_zoo_models_stay_valid_and_cheaper(name: str, exporter: str, size: int):
    from zoo import export_torchvision

    path = export_torchvision(name, exporter, size)
    original = load_model(path)
    canonicalize(original)
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    expected_shape = run(original, x).shape
    convs = sum(1 for n in original.graph if n.op_type == "Conv")
    for options in ({"kind": "separable"}, {"kind": "group", "groups": 4}, {"kind": "shift"}):
        model = clone_model(original)
        report = cheapconv(model, **options, min_channels=8)
        # Every 3x3 conv but the stem is replaced (resnet18's stem is 7x7, vgg's is 3x3).
        assert 0 < len(report["layers"]) < convs
        assert all(layer["macs_after"] < layer["macs_before"] / 2 for layer in report["layers"])
        check_valid(model)
        out = run(model, x)
        assert out.shape == expected_shape and np.all(np.isfinite(out))
        assert model_metrics(model).macs < model_metrics(original).macs


def test_epochs_default_to_the_budget_with_one_and_to_three_without() -> None:
    with_budget = create_pass("cheapconv", {"time_budget_s": 900}, PassContext())
    assert with_budget.cfg.epoch_count == cheapconv_module.CLOCK_EPOCHS  # type: ignore[attr-defined]
    without = create_pass("cheapconv", {}, PassContext())
    assert without.cfg.epoch_count == cheapconv_module.DEFAULT_EPOCHS == 3  # type: ignore[attr-defined]
    given = create_pass("cheapconv", {"epochs": 5, "time_budget_s": 900}, PassContext())
    assert given.cfg.epoch_count == 5  # type: ignore[attr-defined]


def _chain_macs(model: ir.Model) -> int:
    from onnxcompress.graph.input_shapes import at_counted_shapes

    with at_counted_shapes(model):
        return model_metrics(model).macs


def test_target_macs_keeps_the_worst_fits_per_mac_dense_and_lands_under_it() -> None:
    """Body convs with an exactly separable kernel fit at no error; the random ones are the
    worst per MAC saved and stay dense while the target holds without them."""
    model = digits_chain(bodies=4)
    for name in ("w1", "w3"):  # exactly separable: rank-1 spatial kernel per channel pair
        rng = np.random.default_rng(int(name[1:]))
        depth = rng.standard_normal((8, 3, 3))
        mix = rng.standard_normal((8, 8))
        kernel = (mix[:, :, None, None] * depth[None]).astype(np.float32)
        model.graph.initializers[name].const_value = ir.tensor(kernel, name=name)
    before = _chain_macs(model)
    every_conv_replaced = clone_model(model)
    cheapconv(every_conv_replaced)
    all_replaced = _chain_macs(every_conv_replaced) / before
    # A target halfway between "replace all" and "replace none" keeps some layers dense.
    goal = (1.0 + all_replaced) / 2.0
    report = cheapconv(model, target_macs=goal)
    reached = _chain_macs(model) / before
    assert all_replaced < reached <= goal + 1e-9
    plan = report["summary"]["target_plan"]
    assert plan["kept_dense"] and set(plan["kept_dense"]) <= {"body2", "body4"}
    declined = {d["node"]: d["reason"] for d in report["declined"]}
    assert all("kept dense: target_macs" in declined[name] for name in plan["kept_dense"])
    replaced = {layer["node"] for layer in report["layers"]}
    assert {"body1", "body3"} <= replaced
    assert all(t["met"] for t in report["targets"])


def test_a_target_macs_beyond_reach_is_reported_missed_with_why() -> None:
    model = digits_chain(bodies=2)
    report = cheapconv(model, target_macs=0.01)
    (target,) = report["targets"]
    assert not target["met"] and "replacing every eligible Conv leaves" in target["reason"]
    assert report["summary"]["target_plan"]["kept_dense"] == []
