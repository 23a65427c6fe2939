"""The command line: sub-commands work, user errors give one line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnxcompress.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "digits_resnet.onnx"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def demo_model() -> Path:
    if not DEMO_MODEL.exists():
        pytest.skip("models/digits_resnet.onnx has not been trained yet")
    return DEMO_MODEL


def assert_user_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_console_script_reports_bad_file_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    result = subprocess.run(
        [sys.executable, "-m", "onnxcompress.cli", "inspect", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(bad) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_help_lists_commands_and_passes(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("inspect", "bench", "eval", "verify", "compress", "demo"):
        assert command in out
    code, out, _ = run_cli(["passes"], capsys)
    assert code == 0 and "canonicalize" in out and "options:" in out


@pytest.mark.parametrize("command", ["inspect", "eval", "bench"])
def test_missing_model(command: str, tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "missing.onnx")
    args = [command, missing] + (["--data", "digits"] if command == "eval" else [])
    code, _, err = run_cli(args, capsys)
    assert_user_error(code, err, missing, "no such file")


def test_inspect_resnet20(resnet20_path: Path, capsys) -> None:
    code, out, _ = run_cli(["inspect", str(resnet20_path)], capsys)
    assert code == 0
    assert "Conv" in out and "Gemm" in out
    code, out, _ = run_cli(["inspect", str(resnet20_path), "--json"], capsys)
    data = json.loads(out)
    # the published count for this model: 0.27 M params, 40.55 M MACs
    assert abs(data["params"] - 0.27e6) / 0.27e6 < 0.02
    assert abs(data["macs"] - 40.55e6) / 40.55e6 < 0.005


def test_compress_canonicalize_only_writes_output_and_keeps_input(
    resnet20_path: Path, tmp_path: Path, capsys
) -> None:
    before = resnet20_path.read_bytes()
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    code, stdout, err = run_cli(
        ["compress", str(resnet20_path), "-o", str(out), "--report", str(report)], capsys
    )
    assert code == 0, err
    assert out.exists() and resnet20_path.read_bytes() == before
    payload = json.loads(report.read_text())
    assert payload["steps"][0]["name"] == "canonicalize"
    assert payload["steps"][0]["verification"]["deviation"]["max_rel"] < 1e-4
    assert "params" in stdout
    # a second run without --force refuses to replace the output
    code, _, err = run_cli(["compress", str(resnet20_path), "-o", str(out)], capsys)
    assert_user_error(code, err, "already exists", "--force")
    code, _, err = run_cli(["compress", str(resnet20_path), "-o", str(out), "--force"], capsys)
    assert code == 0, err


def test_compress_refuses_to_write_over_its_input(resnet20_path: Path, capsys) -> None:
    code, _, err = run_cli(["compress", str(resnet20_path), "-o", str(resnet20_path)], capsys)
    assert_user_error(code, err, "input")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("nosuchpass", "unknown pass"),
        ("canonicalize:bogus=1", "no option 'bogus'"),
        ("canonicalize:fold_batchnorm=perhaps", "fold_batchnorm"),
        ("canonicalize:novalue", "key=value"),
    ],
)
def test_bad_pass_specs(
    spec: str, fragment: str, resnet20_path: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(["compress", str(resnet20_path), "-o", str(out), "--pass", spec], capsys)
    assert_user_error(code, err, fragment)
    assert not out.exists()


def test_bench_bad_options(resnet20_path: Path, capsys) -> None:
    code, _, err = run_cli(["bench", str(resnet20_path), "--batch", "0"], capsys)
    assert_user_error(code, err, "--batch")
    code, _, err = run_cli(["bench", str(resnet20_path), "--provider", "warp-drive"], capsys)
    assert_user_error(code, err, "warp-drive")


def test_bench_cuda_unavailable_names_the_package(resnet20_path: Path, capsys) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    code, _, err = run_cli(["bench", str(resnet20_path), "--provider", "cuda"], capsys)
    assert_user_error(code, err, "onnxruntime-gpu")


def test_bench_json_rows(resnet20_path: Path, capsys) -> None:
    code, out, err = run_cli(
        [
            "bench",
            str(resnet20_path),
            str(resnet20_path),
            "--batch",
            "1,2",
            "--runs",
            "3",
            "--warmup",
            "1",
            "--json",
            "-",
        ],
        capsys,
    )
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 4
    assert set(rows[0]) == {
        "model",
        "provider",
        "batch",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "throughput",
        "speedup",
    }


def test_eval_needs_data_for_models_without_metadata(resnet20_path: Path, capsys) -> None:
    code, _, err = run_cli(["eval", str(resnet20_path)], capsys)
    assert_user_error(code, err, "--data")


def test_eval_and_verify_demo_model(demo_model: Path, capsys) -> None:
    code, out, err = run_cli(["eval", str(demo_model), "--data", "digits[1400:]", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["top1"] >= 97.0
    code, out, err = run_cli(
        ["verify", str(demo_model), str(demo_model), "--data", "digits"], capsys
    )
    assert code == 0, err
    assert "agreement 100.00%" in out


def test_eval_wrong_data_shape(demo_model: Path, resnet20_path: Path, capsys) -> None:
    # 8x8 grey digits do not fit a 3x32x32 model: one line that says how to fix it
    code, _, err = run_cli(["eval", str(resnet20_path), "--data", "digits"], capsys)
    assert_user_error(code, err)


def _dynamic_hw_conv(path: Path) -> Path:
    """x[N, 3, H, W] -> Conv 3->8, 3x3, pad 1 -> y: 8 * 3 * 9 MACs per output pixel."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "dynamic_hw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, "H", "W"])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))
    return path


def test_inspect_notes_symbolic_spatial_dims_and_shape_fixes_them(tmp_path: Path, capsys) -> None:
    path = _dynamic_hw_conv(tmp_path / "dynamic.onnx")
    code, out, err = run_cli(["inspect", str(path), "--json"], capsys)
    assert code == 0
    assert "symbolic dims H, W" in err and "--shape x=" in err
    assert json.loads(out)["macs"] == 8 * 3 * 9  # H = W = 1: not a real image size
    code, out, err = run_cli(["inspect", str(path), "--json", "--shape", "x=1x3x32x20"], capsys)
    assert code == 0 and "symbolic" not in err
    assert json.loads(out)["macs"] == 8 * 3 * 9 * 32 * 20
    assert path.read_bytes() == _dynamic_hw_conv(tmp_path / "again.onnx").read_bytes()


@pytest.mark.parametrize(
    ("shape", "fragment"), [("z=1x3x8x8", "not an input"), ("x=1x3x8", "has 3 dims")]
)
def test_inspect_bad_shape_is_a_user_error(
    shape: str, fragment: str, tmp_path: Path, capsys
) -> None:
    path = _dynamic_hw_conv(tmp_path / "dynamic.onnx")
    code, _, err = run_cli(["inspect", str(path), "--shape", shape], capsys)
    assert_user_error(code, err, fragment)


def _conv_model(
    path: Path,
    *,
    weight_in_channels: int = 3,
    declared_out_channels: int = 4,
    custom_op: bool = False,
) -> Path:
    """x[1, 3, 8, 8] -> Conv 3x3 (weight 4 x weight_in_channels) -> Relu or a custom op -> y."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, weight_in_channels, 3, 3), np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    opsets = [helper.make_opsetid("", 17)]
    if custom_op:
        nodes.append(helper.make_node("Fancy", ["c"], ["y"], name="fancy", domain="com.example"))
        opsets.append(helper.make_opsetid("com.example", 1))
    else:
        nodes.append(helper.make_node("Relu", ["c"], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, declared_out_channels, 6, 6])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=10), str(path))
    return path


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_inspect_warns_about_a_conv_weight_that_does_not_fit_its_input(
    tmp_path: Path, capsys
) -> None:
    # onnx.checker (full_check included) passes this model; ONNX Runtime refuses to run it.
    path = _conv_model(tmp_path / "bad_channels.onnx", weight_in_channels=5)
    code, out, err = run_cli(["inspect", str(path)], capsys)
    assert code == 0
    assert "conv" in out and "Conv" in out and "MACs" in out  # the table is still printed
    assert _warnings(err) == [
        f"warning: {path}: Conv 'conv' gets 3 input channels but its weight takes 5 "
        "(ONNX Runtime will refuse to run it); its MACs are counted from the weight"
    ]
    code, out, err = run_cli(["inspect", str(path), "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["layers"][0]["node"] == "conv"
    assert [f"warning: {w}" for w in data["warnings"]] == _warnings(err)


def test_inspect_warns_about_an_op_it_cannot_count(tmp_path: Path) -> None:
    """Through the console entry, in a process of its own: exit code, stdout and stderr."""
    path = _conv_model(tmp_path / "custom.onnx", custom_op=True)
    result = subprocess.run(
        [sys.executable, "-m", "onnxcompress.cli", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "conv" in result.stdout and "MACs" in result.stdout
    assert _warnings(result.stderr) == [
        "warning: Fancy in domain com.example is not counted (1 node, taken as 0 MACs)"
    ]
    assert "Traceback" not in result.stderr


def test_inspect_warns_when_the_full_checker_fails(tmp_path: Path, capsys) -> None:
    # The output is declared with 5 channels; Conv and Relu make 4: strict shape inference objects.
    path = _conv_model(tmp_path / "contradicts.onnx", declared_out_channels=5)
    code, out, err = run_cli(["inspect", str(path), "--json"], capsys)
    assert code == 0
    assert json.loads(out)["layers"][0]["op"] == "Conv"
    (warning,) = _warnings(err)
    assert warning.startswith(f"warning: {path} fails onnx.checker: ")
    assert "node name: relu" in warning and "(4) vs (5)" in warning
    assert "[ShapeInferenceError]" not in warning and "\n" not in warning


def test_inspect_of_a_clean_model_warns_about_nothing(tmp_path: Path, capsys) -> None:
    path = _conv_model(tmp_path / "clean.onnx")
    code, out, err = run_cli(["inspect", str(path)], capsys)
    assert code == 0 and "conv" in out
    assert err == ""
    code, out, err = run_cli(["inspect", str(path), "--json"], capsys)
    assert code == 0 and err == ""
    assert json.loads(out)["warnings"] == []


def test_a_missing_onnx_runtime_is_one_line_naming_both_extras(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import onnx
    from onnx import TensorProto, helper

    model = tmp_path / "m.onnx"
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    # None in sys.modules makes `import onnxruntime` fail as it does where it is not installed.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code, _, err = run_cli(["bench", str(model), "--runs", "2", "--warmup", "1"], capsys)
    assert_user_error(code, err, "onnxcompress[cpu]", "onnxcompress[gpu]")
    assert "Traceback" not in err
