"""Passes leave no initializer that nothing reads: ONNX Runtime warns about each one whenever
it loads the model. The gate after every pass (``CompressionPass.ensures``) removes and reports
any that a pass leaves, and the passes themselves leave none.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.edits import unused_initializers
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import CompressionPass, PassConfig, PassContext, PassReport


def biased_convnet() -> ir.Model:
    """Three 3x3 convs with biases (as exporters leave them after folding BatchNorm)."""
    rng = np.random.default_rng(3)
    shapes = {
        "w0": (16, 3, 3, 3),
        "b0": (16,),
        "w1": (16, 16, 3, 3),
        "b1": (16,),
        "w2": (16, 16, 3, 3),
        "b2": (16,),
        "fc": (10, 16),
    }
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
        for n, s in shapes.items()
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w0", "b0"], ["a"], name="stem", pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["ar"]),
        helper.make_node("Conv", ["ar", "w1", "b1"], ["c"], name="conv1", pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["cr"]),
        helper.make_node("Conv", ["cr", "w2", "b2"], ["d"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["d"], ["dr"]),
        helper.make_node("GlobalAveragePool", ["dr"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc"], ["output"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "biased",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    canonicalize(model)
    return model


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "separable"},
        {"kind": "group", "groups": 4},
        {"kind": "group", "groups": 4, "mix": "shuffle"},
        {"kind": "shift"},
        {"kind": "shift", "shift_op": "conv"},
    ],
)
def test_cheapconv_takes_the_replaced_convs_weights_and_biases_away(options: dict) -> None:
    """The replaced convs' biases used to stay behind (18 on ResNet-20)."""
    model = biased_convnet()
    # With calibration data the fit gives the replacement a bias of its own.
    images = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    context = PassContext(calibration=images)
    compression = create_pass("cheapconv", {**options, "epochs": 0}, context)
    compression(model)
    assert compression.report.modified
    assert compression.report.leftover_initializers == []
    assert unused_initializers(model.graph) == []
    assert "w1" not in model.graph.initializers and "w2" not in model.graph.initializers


class _LeavesAnInitializer(CompressionPass[PassConfig]):
    """A pass with the bug the gate is for: it adds an initializer nothing reads."""

    name = "leaves-one"
    compresses = False

    def run(self, model: ir.Model, report: PassReport) -> None:
        stray = ir.Value(name="stray", const_value=ir.tensor(np.zeros(4, np.float32)))
        model.graph.register_initializer(stray)
        report.modified = True


def test_the_gate_after_a_pass_removes_what_it_left_and_says_so() -> None:
    model = biased_convnet()
    assert unused_initializers(model.graph) == []
    compression = _LeavesAnInitializer()
    compression(model)
    assert "stray" not in model.graph.initializers
    assert compression.report.leftover_initializers == ["stray"]
    (note,) = compression.report.notes
    assert "leaves-one left 1 initializer(s) nothing reads (stray)" in note
    assert compression.report.as_dict()["leftover_initializers"] == ["stray"]


def test_a_clean_pass_reports_no_leftovers() -> None:
    model = biased_convnet()
    compression = create_pass("lrf", {"ratio": 0.5})
    compression(model)
    assert compression.report.modified
    assert compression.report.leftover_initializers == [] and compression.report.notes == []
