"""``--static-shape``: fix a dynamic model's inputs, fold its shape arithmetic, prune (issue 19).

The model sizes a Resize from *another* tensor's shape, so while height and width are symbolic
the channel rules cannot tell the size follows the cut and freeze both groups (the negative
test of ``test_dynamic_shapes``). Fixed at one size, the sizes fold to a constant the rules
rewrite, and the group with duplicated filters is cut exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_dynamic_shapes import upsampling_net

from onnxcompress.cli import EXIT_USER, main
from onnxcompress.errors import PassConfigError
from onnxcompress.pipeline.run import compress

SIZE = (1, 3, 8, 8)


@pytest.fixture
def dynamic_model(tmp_path: Path) -> Path:
    path = tmp_path / "dynamic.onnx"
    ir.save(upsampling_net(sizes_from_other=True), path)
    return path


@pytest.fixture
def data(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((32, *SIZE[1:])).astype(np.float32))
    return f"npz:{path}"


def lrf_on_the_duplicated_group(model_path: Path) -> list[tuple[str, dict[str, object]]]:
    """lrf on the first conv's group only (its second half repeats its first: exact)."""
    convs = [n.name for n in onnx.load(model_path).graph.node if n.op_type in ("Conv", "Gemm")]
    options = {"ratio": 0.5, "round_to": 1, "criterion": "weights", "exclude": convs[1:]}
    return [("lrf", options)]


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_static_shape_cuts_a_group_the_dynamic_graph_freezes_and_stays_exact(
    dynamic_model: Path, data: str, tmp_path: Path
) -> None:
    passes = lrf_on_the_duplicated_group(dynamic_model)
    dynamic_out, static_out = tmp_path / "dynamic_out.onnx", tmp_path / "static_out.onnx"
    kept_dynamic = compress(dynamic_model, dynamic_out, passes, data=data)
    fixed = compress(
        dynamic_model, static_out, passes, data=data, input_shapes={"x": SIZE}, static_shape=True
    )
    # Dynamic: the group is frozen (a Resize sized from another tensor's shape): nothing cut.
    declined = kept_dynamic.steps[1].report["declined"]
    assert any("computed output sizes" in d["reason"] for d in declined), declined
    assert kept_dynamic.after["macs"] == kept_dynamic.before["macs"]
    # Static: the group is cut, the MACs drop, and the output is static at the given size.
    assert fixed.after["macs"] < fixed.before["macs"]
    assert fixed.static_shape == {"x": list(SIZE)}
    assert fixed.macs_counted_at == {"x": list(SIZE)}
    written = onnx.load(static_out)
    dims = [d.dim_value for d in written.graph.input[0].type.tensor_type.shape.dim]
    assert dims == list(SIZE)
    assert not [n for n in written.graph.node if n.op_type == "Shape"]  # the arithmetic folded
    x = np.random.default_rng(1).standard_normal(SIZE).astype(np.float32)
    expected, got = run(dynamic_model, x), run(static_out, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # The input file is left as it was: still dynamic.
    assert onnx.load(dynamic_model).graph.input[0].type.tensor_type.shape.dim[2].dim_param


def test_static_shape_needs_the_shape_it_fixes(dynamic_model: Path, tmp_path: Path) -> None:
    with pytest.raises(PassConfigError, match="--shape"):
        compress(dynamic_model, tmp_path / "out.onnx", [("lrf", {"ratio": 0.5})], static_shape=True)


def test_static_shape_other_than_the_data_is_one_line_and_exit_2(
    dynamic_model: Path, data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.onnx"
    args = ["compress", str(dynamic_model), "-o", str(out), "--pass", "lrf:ratio=0.5"]
    args += ["--data", data, "--shape", "x=1x3x16x16", "--static-shape"]
    assert main(args) == EXIT_USER
    err = capsys.readouterr().err
    assert "does not match the data, whose samples are 3x8x8" in err
    assert "Traceback" not in err and not out.exists()
