"""MACs, budgets and targets counted at the real input shape (issue 19, "Honest MACs").

Detectors and segmenters are exported with symbolic height and width; their MACs are only
defined at a size. ``compress`` counts them at ``--shape`` or at the calibration data's size,
the report says which, and a MACs budget with neither is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.cli import main
from onnxcompress.graph.input_shapes import count_macs_at, shapes_fixed
from onnxcompress.graph.metrics import macs_per_weight_element, model_metrics
from onnxcompress.graph.model_io import load_model

TARGET = 0.7
TOLERANCE = 0.02  # lrf's default tolerance


def _conv_net(path: Path, spatial: Sequence[int | str], batch: int | str = "N") -> Path:
    """Five 3x3 Convs (two of stride 2) -> global pool -> Gemm: most MACs at full resolution,
    so counting every layer at 1x1 would misjudge which channels cost the most."""
    rng = np.random.default_rng(0)
    nodes, weights = [], []
    x = "input"
    for index, (cin, cout, stride) in enumerate(
        [(3, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1), (64, 128, 2)]
    ):
        name = f"conv{index}"
        scale = np.sqrt(2.0 / (cin * 9))
        weights.append(
            numpy_helper.from_array(
                (rng.standard_normal((cout, cin, 3, 3)) * scale).astype(np.float32), f"{name}.w"
            )
        )
        weights.append(numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b"))
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.w", f"{name}.b"],
                [name],
                name=name,
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [name], [f"{name}.relu"]))
        x = f"{name}.relu"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pooled"]))
    nodes.append(helper.make_node("Flatten", ["pooled"], ["flat"]))
    weights.append(
        numpy_helper.from_array((rng.standard_normal((10, 128)) * 0.1).astype(np.float32), "fc.w")
    )
    weights.append(numpy_helper.from_array(np.zeros(10, np.float32), "fc.b"))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1))
    graph = helper.make_graph(
        nodes,
        "net",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, *spatial])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))
    return path


def _images(path: Path, height: int, width: int) -> str:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((48, 3, height, width)).astype(np.float32)
    np.savez(path, x=x, y=rng.integers(0, 10, 48))
    return f"npz:{path}"


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _inspect_macs(path: Path, shape: str, capsys: pytest.CaptureFixture[str]) -> int:
    code, out, err = _cli(["inspect", str(path), "--json", "--shape", shape], capsys)
    assert code == 0, err
    return int(json.loads(out)["macs"])


def _compress(
    model: Path, tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str, Path, Path]:
    output, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code, out, err = _cli(
        [
            "compress",
            str(model),
            "-o",
            str(output),
            "--pass",
            f"lrf:target_macs={TARGET},round_to=1",
            "--report",
            str(report),
            *extra,
        ],
        capsys,
    )
    return code, out, err, output, report


def _assert_honest(
    model: Path,
    output: Path,
    report_path: Path,
    shape: str,
    capsys: pytest.CaptureFixture[str],
) -> float:
    """The report's MAC ratio and targets_met are what ``inspect --shape`` says of the files."""
    report = json.loads(report_path.read_text())
    reported = report["after"]["macs"] / report["before"]["macs"]
    real = _inspect_macs(output, shape, capsys) / _inspect_macs(model, shape, capsys)
    assert reported == pytest.approx(real, rel=0, abs=1e-6)
    lrf = report["steps"][1]["report"]
    [target] = lrf["targets"]
    assert target["reached"] == pytest.approx(real, rel=0, abs=1e-6)
    met = abs(real - TARGET) <= TOLERANCE
    assert target["met"] is met and lrf["targets_met"] is met and report["targets_met"] is met
    name, dims = shape.split("=")
    expected = {name: [int(d) for d in dims.split("x")]}
    assert report["macs_counted_at"] == expected
    return real


def _input_dims(path: Path) -> list[int | str]:
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param or d.dim_value for d in dims]


def test_shape_flag_counts_macs_at_that_shape(tmp_path: Path, capsys) -> None:
    model = _conv_net(tmp_path / "dynamic.onnx", ["H", "W"])
    code, out, err, output, report = _compress(
        model, tmp_path, ["--shape", "input=1x3x32x32"], capsys
    )
    assert code == 0, err
    real = _assert_honest(model, output, report, "input=1x3x32x32", capsys)
    assert abs(real - TARGET) <= TOLERANCE
    assert "MACs counted at input=1x3x32x32" in out
    # Counting at a shape does not fix it: the written model stays dynamic.
    assert _input_dims(output) == ["N", 3, "H", "W"]


def test_data_size_counts_macs_when_no_shape_is_given(tmp_path: Path, capsys) -> None:
    model = _conv_net(tmp_path / "dynamic.onnx", ["H", "W"])
    data = _images(tmp_path / "images.npz", 24, 20)
    code, out, err, output, report = _compress(model, tmp_path, ["--data", data], capsys)
    assert code == 0, err
    _assert_honest(model, output, report, "input=1x3x24x20", capsys)
    assert "MACs counted at input=1x3x24x20" in out


def test_dynamic_model_prunes_as_its_static_twin(tmp_path: Path, capsys) -> None:
    dynamic = _conv_net(tmp_path / "dynamic.onnx", ["H", "W"])
    static = _conv_net(tmp_path / "static.onnx", [32, 32])
    ratios = []
    for model, extra in ((dynamic, ["--shape", "input=1x3x32x32"]), (static, [])):
        folder = tmp_path / model.stem
        folder.mkdir()
        code, _, err, output, report = _compress(model, folder, extra, capsys)
        assert code == 0, err
        ratios.append(_assert_honest(model, output, report, "input=1x3x32x32", capsys))
    assert ratios[0] == pytest.approx(ratios[1], abs=1e-9)


def test_macs_budget_without_shape_or_data_is_refused(tmp_path: Path, capsys) -> None:
    model = _conv_net(tmp_path / "dynamic.onnx", ["H", "W"])
    code, _, err, output, report = _compress(model, tmp_path, [], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "--shape input=1x3xHxW" in lines[0] and "--data" in lines[0]
    assert "symbolic dims H, W" in lines[0]
    assert not output.exists() and not report.exists()


def test_a_budget_not_in_macs_needs_no_shape(tmp_path: Path, capsys) -> None:
    model = _conv_net(tmp_path / "dynamic.onnx", ["H", "W"])
    output = tmp_path / "out.onnx"
    code, _, err = _cli(
        ["compress", str(model), "-o", str(output), "--pass", "lrf:ratio=0.25", "--shape",
         "input=1x3x16x16"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    output.unlink()
    # Without --shape, the verification gate has no size to draw random inputs at.
    data = _images(tmp_path / "images.npz", 16, 16)
    code, _, err = _cli(
        ["compress", str(model), "-o", str(output), "--pass", "lrf:ratio=0.25", "--data", data],
        capsys,
    )
    assert code == 0, err


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ("nope=1x3x32x32", "not an input"),
        ("input=1x3x32", "has 3 dims"),
        ("input=1x3x64x64", "contradicts the model"),
    ],
)
def test_bad_shape_is_a_user_error(shape: str, fragment: str, tmp_path: Path, capsys) -> None:
    model = _conv_net(tmp_path / "static.onnx", [32, 32])
    code, _, err, output, _ = _compress(model, tmp_path, ["--shape", shape], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], err
    assert not output.exists()


def test_static_model_is_counted_as_before(tmp_path: Path, capsys) -> None:
    """A symbolic batch alone needs no shape: MACs per image, as inspect counts them."""
    model = _conv_net(tmp_path / "static.onnx", [32, 32])
    code, _, err, output, report = _compress(model, tmp_path, [], capsys)
    assert code == 0, err
    _assert_honest(model, output, report, "input=1x3x32x32", capsys)
    code, inspected, _ = _cli(["inspect", str(model), "--json"], capsys)
    first = json.loads(report.read_text())
    assert first["before"]["macs"] == json.loads(inspected)["macs"]
    # Giving the model's own shape changes nothing.
    again = tmp_path / "again"
    again.mkdir()
    code, _, err, _, report_again = _compress(model, again, ["--shape", "input=1x3x32x32"], capsys)
    assert code == 0, err
    second = json.loads(report_again.read_text())
    for key in ("before", "after"):
        assert second[key]["macs"] == first[key]["macs"]
        assert second[key]["params"] == first[key]["params"]
    static = load_model(model)
    count_macs_at(static, {"input": (1, 3, 32, 32)})
    assert macs_per_weight_element(static) == {}


def test_counting_at_a_shape_leaves_the_model_shapes_as_they_were(tmp_path: Path) -> None:
    model = load_model(_conv_net(tmp_path / "dynamic.onnx", ["H", "W"]))
    own = model_metrics(model)
    shapes = {value.name: value.shape for node in model.graph for value in node.outputs}
    fixed = model_metrics(model, input_shapes={"input": (1, 3, 32, 32)})
    assert fixed.macs > own.macs and fixed.input_shapes == {"input": [1, 3, 32, 32]}
    assert own.input_shapes == {"input": [1, 3, 1, 1]}  # what the count without a shape means
    assert {value.name: value.shape for node in model.graph for value in node.outputs} == shapes
    count_macs_at(model, {"input": (1, 3, 32, 32)})
    assert model_metrics(model).macs == fixed.macs
    # Per weight element, a full-resolution 3x3 Conv does one MAC per output pixel.
    factors = {node.name: factor for node, factor in macs_per_weight_element(model).items()}
    assert factors["conv0"] == 32 * 32 and factors["conv4"] == 8 * 8
    with shapes_fixed(model, {"input": (1, 3, 16, 16)}):
        assert list(model.graph.inputs[0].shape) == [1, 3, 16, 16]
    assert str(model.graph.inputs[0].shape) == str(
        load_model(tmp_path / "dynamic.onnx").graph.inputs[0].shape
    )


# -- per-layer MACs of the passes that plan by layer (resect, cheapconv, lct) ----------------


def _residual_net(spatial: Sequence[int | str]) -> Any:
    """Stem, two basic blocks (one strided with a 1x1 shortcut), head; ``spatial`` may be
    symbolic. Counted at 16x16 where it is."""
    from channel_models import Net

    from onnxcompress.graph.input_shapes import count_macs_at

    net = Net(seed=5)
    x = net.input("x", ["N", 3, *spatial])
    stem = net.relu(net.conv(x, 3, 16))
    h = net.conv(net.relu(net.conv(stem, 16, 16)), 16, 16)
    block = net.relu(net.op("Add", [h, stem]))
    h = net.conv(net.relu(net.conv(block, 16, 32, stride=2)), 32, 32)
    shortcut = net.conv(block, 16, 32, k=1, stride=2)
    out = net.relu(net.op("Add", [h, shortcut]))
    model = net.build([net.head(out, 32)])
    if not all(isinstance(d, int) for d in spatial):
        count_macs_at(model, {"x": (1, 3, 16, 16)})
    return model


def test_resection_candidates_cost_what_they_cost_at_the_counted_size() -> None:
    from onnxcompress.graph.resection import find_candidates

    def removed(model: Any) -> dict[str, int]:
        return {c.key: c.macs_removed for c in find_candidates(model).candidates}

    static, dynamic = removed(_residual_net((16, 16))), removed(_residual_net(("H", "W")))
    assert static and dynamic == static
    assert min(static.values()) > 16 * 16 * 9  # not counted at 1x1


def test_cheapconv_layer_macs_at_the_counted_size() -> None:
    from onnxcompress.passes import create_pass

    def layers(model: Any) -> list[tuple[int, int]]:
        compression = create_pass("cheapconv", {"kind": "separable", "epochs": 0})
        compression(model)
        return [(x["macs_before"], x["macs_after"]) for x in compression.report.layers]

    static, dynamic = layers(_residual_net((16, 16))), layers(_residual_net(("H", "W")))
    assert static and dynamic == static


def test_lct_ranks_priced_at_the_counted_size() -> None:
    from onnxcompress.passes.base import PassReport
    from onnxcompress.passes.lct import LctConfig
    from onnxcompress.passes.lct_layers import allocate_ranks, find_candidates

    def sized(model: Any) -> list[tuple[int, int, int]]:
        report = PassReport("lct", {})
        found = find_candidates(model, report, True, ())
        config = LctConfig(subspace="lowrank", target_macs=0.6)
        allocate_ranks(model, found, report, model_metrics(model).macs, config)
        return [(layer.macs, layer.positions, layer.break_even) for layer in found]

    static, dynamic = sized(_residual_net((16, 16))), sized(_residual_net(("H", "W")))
    assert static and dynamic == static
