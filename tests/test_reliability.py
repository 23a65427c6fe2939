"""Bad input gets one clear line and exit code 2, and no file is ever lost or half-written.

A corpus of broken models, options and data, generated here, goes through every sub-command
it applies to (in process, through ``cli.main``). A refusal must be exit code 2 with exactly one
line on stderr naming the file (or option, or data spec) and the problem, no traceback, every
input byte unchanged and nothing left in the output folder. Valid but unusual models (control
flow, float16, bfloat16, int8 QDQ, external data, dynamic spatial dims) must work instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.cli import main

COMMANDS = ("inspect", "compress", "bench", "eval", "verify", "finetune")
DATA = "digits[:32]"


# ---------------------------------------------------------------------------------------------
# The base model: a small CNN that digits (1x8x8 grey images, 10 classes) fits
# ---------------------------------------------------------------------------------------------


def cnn(
    dtype: type = np.float32, input_dims: tuple[int | str, ...] = ("N", 1, 8, 8)
) -> onnx.ModelProto:
    """conv1 -> relu -> conv2 -> relu -> global pool -> flatten -> fc (10 classes)."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = {
        "w1": rng.standard_normal((8, 1, 3, 3)),
        "b1": rng.standard_normal(8),
        "w2": rng.standard_normal((8, 8, 3, 3)) * 0.3,
        "b2": rng.standard_normal(8),
        "fw": rng.standard_normal((10, 8)),
        "fb": rng.standard_normal(10),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1] * 4, name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 4, name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["output"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("input", elem, list(input_dims))],
        [helper.make_tensor_value_info("output", elem, ["N", 10])],
        [numpy_helper.from_array(a.astype(dtype), name) for name, a in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def initializer_index(model: onnx.ModelProto, name: str) -> int:
    return next(i for i, t in enumerate(model.graph.initializer) if t.name == name)


def with_external_w2(folder: Path, location: str, *, data: bytes | None = None) -> Path:
    """The CNN with conv2's weight in an external file at ``location`` (written when given)."""
    model = cnn()
    tensor = model.graph.initializer[initializer_index(model, "w2")]
    array = numpy_helper.to_array(tensor)
    if data is not None:
        (folder / location).write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entries = {"location": location, "offset": "0", "length": str(array.nbytes)}
    for key, value in entries.items():
        if value:
            tensor.external_data.add(key=key, value=value)
    return save(model, folder / "model.onnx")


W2_BYTES = (np.random.default_rng(0).standard_normal(576) * 0.3).astype(np.float32).tobytes()


# ---------------------------------------------------------------------------------------------
# The corpus of bad models
# ---------------------------------------------------------------------------------------------


def _truncated(folder: Path) -> Path:
    data = cnn().SerializeToString()
    path = folder / "model.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


def _bytes(content: bytes) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        path = folder / "model.onnx"
        path.write_bytes(content)
        return path

    return build


def _edited(edit: Callable[[onnx.ModelProto], None]) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        model = cnn()
        edit(model)
        return save(model, folder / "model.onnx")

    return build


def _drop_w2(model: onnx.ModelProto) -> None:
    del model.graph.initializer[initializer_index(model, "w2")]


def _dangling(model: onnx.ModelProto) -> None:
    node(model, "conv2").input[0] = "ghost"


def _cycle(model: onnx.ModelProto) -> None:
    node(model, "conv1").input[0] = "r2"


def _unproduced_output(model: onnx.ModelProto) -> None:
    model.graph.output[0].name = "nowhere"


def _duplicate_output(model: onnx.ModelProto) -> None:
    node(model, "relu2").output[0] = "r1"
    node(model, "gap").input[0] = "r1"


def _opset(version: int) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        model.opset_import[0].version = version

    return edit


def _ir(version: int) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        model.ir_version = version

    return edit


def _only_custom_opset(model: onnx.ModelProto) -> None:
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.mystery", 1))


def _undeclared_domain(model: onnx.ModelProto) -> None:
    node(model, "relu1").domain = "com.undeclared"


def _unknown_op(model: onnx.ModelProto) -> None:
    relu = node(model, "relu1")
    relu.domain, relu.op_type = "com.mystery", "Frobnicate"
    model.opset_import.append(helper.make_opsetid("com.mystery", 1))


def _conv_shape_mismatch(model: onnx.ModelProto) -> None:
    index = initializer_index(model, "w2")
    model.graph.initializer[index].CopyFrom(
        numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w2")
    )


def _directory(folder: Path) -> Path:
    path = folder / "model.onnx"
    path.mkdir()
    return path


def _external(location: str, data: bytes | None = None) -> Callable[[Path], Path]:
    return lambda folder: with_external_w2(folder, location, data=data)


def _external_symlink(folder: Path) -> Path:
    outside = folder / "outside"
    outside.mkdir()
    (outside / "w2.bin").write_bytes(W2_BYTES)
    inside = folder / "model"
    inside.mkdir()
    os.symlink(outside / "w2.bin", inside / "w2.bin")
    return with_external_w2(inside, "w2.bin")


def _external_hardlink(folder: Path) -> Path:
    (folder / "secret.bin").write_bytes(W2_BYTES)
    inside = folder / "model"
    inside.mkdir()
    os.link(folder / "secret.bin", inside / "w2.bin")
    return with_external_w2(inside, "w2.bin")


def _external_without_location(folder: Path) -> Path:
    path = with_external_w2(folder, "w2.bin", data=W2_BYTES)
    model = onnx.load(str(path), load_external_data=False)
    tensor = model.graph.initializer[initializer_index(model, "w2")]
    kept = [e for e in tensor.external_data if e.key != "location"]
    del tensor.external_data[:]
    tensor.external_data.extend(kept)
    return save(model, path)


@dataclasses.dataclass(frozen=True)
class BadModel:
    """A model file every sub-command must refuse; ``fragment`` is in the one-line message."""

    name: str
    build: Callable[[Path], Path]
    fragment: str
    # Commands for which the file is a valid model that they handle (exit 0).
    valid_for: tuple[str, ...] = ()


BAD_MODELS = [
    BadModel("empty", _bytes(b""), "empty"),
    BadModel("truncated", _truncated, "not a readable ONNX model"),
    BadModel("random-bytes", _bytes(np.random.default_rng(1).bytes(4096)), "not a readable"),
    BadModel("json-text", _bytes(b'{"model": "resnet", "weights": [1, 2]}\n'), "not a readable"),
    BadModel(
        "tensor-proto",
        _bytes(numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString()),
        "not",
    ),
    BadModel("directory", _directory, "not a regular file"),
    BadModel("missing-file", lambda folder: folder / "model.onnx", "no such file"),
    BadModel("missing-initializer", _edited(_drop_w2), "'w2'"),
    BadModel("dangling-input", _edited(_dangling), "'ghost'"),
    BadModel("cycle", _edited(_cycle), "conv1"),
    BadModel("unproduced-output", _edited(_unproduced_output), "nowhere"),
    BadModel("duplicate-output", _edited(_duplicate_output), "r1"),
    BadModel("opset-too-new", _edited(_opset(99)), "opset 99"),
    BadModel("opset-too-old", _edited(_opset(3)), "opset 3"),
    BadModel("no-default-opset", _edited(_only_custom_opset), "opset"),
    BadModel("ir-too-new", _edited(_ir(99)), "IR version 99"),
    BadModel("ir-too-old", _edited(_ir(2)), "IR version"),
    BadModel("undeclared-domain", _edited(_undeclared_domain), "com.undeclared"),
    # Valid ONNX: inspect counts it; nothing can run it.
    BadModel("unknown-domain-op", _edited(_unknown_op), "Frobnicate", valid_for=("inspect",)),
    # The checker (even with full_check) accepts a Conv whose weight has the wrong input
    # channels; inspect counts it, and everything that runs it refuses it.
    BadModel(
        "conv-shape-mismatch", _edited(_conv_shape_mismatch), "channels", valid_for=("inspect",)
    ),
    BadModel("external-missing", _external("w2.bin"), "missing"),
    BadModel("external-parent", _external("../../etc/passwd"), "outside the model's folder"),
    BadModel("external-absolute", _external("/etc/passwd"), "absolute path"),
    BadModel("external-symlink-out", _external_symlink, "outside the model's folder"),
    BadModel("external-hardlink", _external_hardlink, "hard link"),
    BadModel("external-too-short", _external("w2.bin", W2_BYTES[:100]), "past the end"),
    BadModel("external-no-location", _external_without_location, "without a location"),
]


# ---------------------------------------------------------------------------------------------
# Running the CLI and checking a refusal
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    code: int
    stdout: str
    stderr_lines: list[str]


def run_cli(args: list[str | Path], capfd: pytest.CaptureFixture[str], caplog) -> Outcome:
    """``main(args)`` in process; stderr at the file-descriptor level (ONNX Runtime's C++ logs
    included) plus log records of WARNING and above, which the console script prints there."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    lines += [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records]
    return Outcome(code, out, lines)


def assert_refused(outcome: Outcome, command: str, *fragments: str) -> None:
    assert outcome.code == 2, (outcome.code, outcome.stderr_lines, outcome.stdout[-500:])
    assert len(outcome.stderr_lines) == 1, outcome.stderr_lines
    line = outcome.stderr_lines[0]
    assert "Traceback" not in line
    assert line.startswith(f"onnxcompress {command}: error: ") or line.startswith(
        "onnxcompress: error: "
    ), line
    for fragment in fragments:
        assert fragment.lower() in line.lower(), (fragment, line)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) and a hash of its bytes."""
    files: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            files[str(path.relative_to(folder))] = f"-> {os.readlink(path)}"
        elif path.is_file():
            files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            files[str(path.relative_to(folder))] = "dir"
    return files


def command_args(command: str, model: Path, good: Path, out: Path) -> list[str | Path]:
    return {
        "inspect": ["inspect", model],
        "compress": ["compress", model, "-o", out, "--pass", "lrf:ratio=0.5", "--quiet"],
        "bench": ["bench", model, "--runs", "1", "--warmup", "0"],
        "eval": ["eval", model, "--data", DATA],
        "verify": ["verify", good, model, "--data", DATA],
        "finetune": ["finetune", model, "--data", DATA, "-o", out, "--epochs", "1", "--quiet"],
    }[command]


@pytest.fixture(scope="module")
def good_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(cnn(), tmp_path_factory.mktemp("good") / "good.onnx")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", BAD_MODELS, ids=lambda case: case.name)
def test_bad_model_is_refused_in_one_line(
    case: BadModel,
    command: str,
    good_model: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog,
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    model = case.build(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot(source)
    outcome = run_cli(command_args(command, model, good_model, out_dir / "out.onnx"), capfd, caplog)
    if command in case.valid_for:
        assert outcome.code == 0, outcome.stderr_lines
    else:
        # The message names the file (or, for a directory given as a model, its path).
        assert_refused(outcome, command, case.fragment, str(model.name))
    assert snapshot(source) == before
    assert list(out_dir.iterdir()) == []


def test_console_script_refusals_are_one_line(tmp_path: Path, good_model: Path) -> None:
    """The installed entry point, logging and warnings included, for a few representative
    failures: a garbage file, external data escaping its folder, a bad pass option."""
    garbage = _bytes(b"\x00garbage" * 10)(tmp_path)
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    escaping_model = with_external_w2(escaping, "../../etc/passwd")
    cases = [
        (["inspect", str(garbage)], str(garbage)),
        (["eval", str(escaping_model), "--data", DATA], "outside"),
        (
            ["compress", str(good_model), "-o", str(tmp_path / "o.onnx"), "--pass", "lrf:ratio=7"],
            "ratio",
        ),
        (["bench", str(good_model), "--runs", "zero"], "--runs"),
    ]
    for args, fragment in cases:
        result = subprocess.run(
            [sys.executable, "-m", "onnxcompress.cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, result.stderr
        assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "o.onnx").exists()


# ---------------------------------------------------------------------------------------------
# Bad options
# ---------------------------------------------------------------------------------------------


BAD_OPTIONS: list[tuple[str, list[str], str]] = [
    ("unknown-pass", ["compress", "{good}", "-o", "{out}", "--pass", "prune"], "unknown pass"),
    ("unknown-option", ["compress", "{good}", "-o", "{out}", "--pass", "lrf:bogus=1"], "bogus"),
    ("ratio-above-one", ["compress", "{good}", "-o", "{out}", "--pass", "lrf:ratio=1.5"], "ratio"),
    (
        "ratio-negative",
        ["compress", "{good}", "-o", "{out}", "--pass", "merge:ratio=-0.2"],
        "ratio",
    ),
    ("ratio-text", ["compress", "{good}", "-o", "{out}", "--pass", "lrf:ratio=half"], "ratio"),
    (
        "target-nan",
        ["compress", "{good}", "-o", "{out}", "--pass", "lrf:target_macs=nan"],
        "target",
    ),
    (
        "bad-criterion",
        ["compress", "{good}", "-o", "{out}", "--pass", "lrf:criterion=magic"],
        "criterion",
    ),
    ("no-value", ["compress", "{good}", "-o", "{out}", "--pass", "lrf:ratio"], "key=value"),
    (
        "calibration-size",
        ["compress", "{good}", "-o", "{out}", "--calibration-size", "0"],
        "--calibration-size",
    ),
    ("output-folder-missing", ["compress", "{good}", "-o", "{out}/no/such/dir/m.onnx"], "folder"),
    ("output-is-input", ["compress", "{good}", "-o", "{good}"], "input"),
    ("unknown-flag", ["compress", "{good}", "-o", "{out}", "--turbo"], "--turbo"),
    ("bench-batch-zero", ["bench", "{good}", "--batch", "0"], "--batch"),
    ("bench-batch-text", ["bench", "{good}", "--batch", "one"], "--batch"),
    ("bench-runs-zero", ["bench", "{good}", "--runs", "0"], "--runs"),
    ("bench-shape", ["bench", "{good}", "--shape", "input=1xAx8"], "--shape"),
    ("bench-provider", ["bench", "{good}", "--provider", "warp-drive"], "warp-drive"),
    ("eval-batch-size", ["eval", "{good}", "--data", DATA, "--batch-size", "0"], "batch size"),
    ("verify-samples", ["verify", "{good}", "{good}", "--samples", "0"], "samples"),
    (
        "finetune-epochs",
        ["finetune", "{good}", "--data", DATA, "-o", "{out}", "--epochs", "0"],
        "epochs",
    ),
    ("finetune-lr", ["finetune", "{good}", "--data", DATA, "-o", "{out}", "--lr", "-1"], "lr"),
    (
        "finetune-output-is-input",
        ["finetune", "{good}", "--data", DATA, "-o", "{good}"],
        "input",
    ),
]


@pytest.mark.parametrize(
    ("args", "fragment"), [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS]
)
def test_bad_option_is_refused_in_one_line(
    args: list[str],
    fragment: str,
    good_model: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog,
) -> None:
    good = tmp_path / "good.onnx"
    good.write_bytes(good_model.read_bytes())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    filled = [a.format(good=good, out=out_dir / "out.onnx") for a in args]
    before = snapshot(tmp_path)
    outcome = run_cli(filled, capfd, caplog)
    assert_refused(outcome, args[0], fragment)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["compress", "finetune"])
def test_existing_output_needs_force_and_is_kept(
    command: str, good_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog
) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the user's earlier result")
    outcome = run_cli(command_args(command, good_model, good_model, out), capfd, caplog)
    assert_refused(outcome, command, "already exists", "--force")
    assert out.read_bytes() == b"the user's earlier result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


# ---------------------------------------------------------------------------------------------
# Bad data
# ---------------------------------------------------------------------------------------------


def _npz(name: str, **arrays: np.ndarray) -> Callable[[Path], str]:
    def build(folder: Path) -> str:
        np.savez(folder / name, **arrays)
        return f"npz:{folder / name}"

    return build


def _pickled_npz(folder: Path) -> str:
    """An .npz whose array is a pickle: loading it would run the pickle's code."""
    np.save(folder / "x.npy", np.array([1, "payload"], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(folder / "pickled.npz", "w") as archive:
        archive.write(folder / "x.npy", "x.npy")
    return f"npz:{folder / 'pickled.npz'}"


def _garbage_npz(folder: Path) -> str:
    (folder / "garbage.npz").write_bytes(b"definitely not a zip archive")
    return f"npz:{folder / 'garbage.npz'}"


def _unreadable_images(folder: Path) -> str:
    (folder / "images" / "cat").mkdir(parents=True)
    (folder / "images" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated here")
    return f"folder:{folder / 'images'}?channels=1&resize=8"


def _spec(text: str) -> Callable[[Path], str]:
    return lambda folder: text


_rng = np.random.default_rng(0)
BAD_DATA: list[tuple[str, Callable[[Path], str], str]] = [
    ("wrong-shape", _npz("rgb.npz", x=_rng.random((8, 3, 16, 16)).astype(np.float32)), "3x16x16"),
    ("wrong-rank", _npz("flat.npz", x=_rng.random((8, 64)).astype(np.float32)), "shape"),
    ("complex-dtype", _npz("c.npz", x=np.ones((8, 1, 8, 8), np.complex64)), "complex64"),
    ("string-dtype", _npz("s.npz", x=np.array([["a"] * 8] * 8)), "dtype"),
    ("nan-values", _npz("nan.npz", x=np.full((4, 1, 8, 8), np.nan, np.float32)), "NaN"),
    ("negative-labels", _npz("neg.npz", x=np.ones((4, 8, 8)), y=-np.arange(4)), "negative"),
    ("pickled-npz", _pickled_npz, "pickle"),
    ("garbage-npz", _garbage_npz, "not a zip archive"),
    ("missing-npz", _spec("npz:/nonexistent/calib.npz"), "no such file"),
    ("unreadable-image", _unreadable_images, "0.png"),
    ("empty-selection", _spec("digits[5:5]"), "empty"),
    ("unknown-kind", _spec("imagenet:/data"), "unknown kind"),
    ("bad-slice", _spec("digits[a:b]"), "slice"),
    ("bad-option", _spec("digits?mean=abc"), "mean"),
]


def data_command(command: str, good: Path, spec: str, out: Path) -> list[str | Path]:
    return {
        "compress": [
            "compress",
            good,
            "-o",
            out,
            "--pass",
            "lrf:ratio=0.5,criterion=activations",
            "--data",
            spec,
            "--quiet",
        ],
        "eval": ["eval", good, "--data", spec],
        "verify": ["verify", good, good, "--data", spec],
        "finetune": ["finetune", good, "--data", spec, "-o", out, "--epochs", "1", "--quiet"],
    }[command]


@pytest.mark.parametrize("command", ["compress", "eval", "verify", "finetune"])
@pytest.mark.parametrize(
    ("build", "fragment"), [c[1:] for c in BAD_DATA], ids=[c[0] for c in BAD_DATA]
)
def test_bad_data_is_refused_in_one_line(
    build: Callable[[Path], str],
    fragment: str,
    command: str,
    good_model: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    caplog,
) -> None:
    source = tmp_path / "in"
    source.mkdir()
    spec = build(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot(source)
    outcome = run_cli(data_command(command, good_model, spec, out_dir / "o.onnx"), capfd, caplog)
    assert_refused(outcome, command, fragment)
    assert snapshot(source) == before
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "finetune", "compress"])
def test_labels_out_of_range_are_refused(
    command: str, good_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog
) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((12, 8, 8), np.float32), y=np.arange(12))
    spec = f"npz:{tmp_path / 'd.npz'}"
    out = tmp_path / "o.onnx"
    args: list[str | Path] = {
        "eval": ["eval", good_model, "--data", spec],
        "finetune": ["finetune", good_model, "--data", spec, "-o", out, "--epochs", "1"],
        # compress checks labels where it measures accuracy
        "compress": ["compress", good_model, "-o", out, "--eval-data", spec, "--quiet"],
    }[command]
    outcome = run_cli(args, capfd, caplog)
    assert_refused(outcome, command, "11", "10 classes")
    assert not out.exists()


def test_float_data_for_an_integer_input_is_refused(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog
) -> None:
    """Casting normalised pixels to uint8 would feed zeros and ones: refuse instead."""
    model = cnn()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    model.graph.node.insert(
        0, helper.make_node("Cast", ["raw"], ["input"], to=TensorProto.FLOAT, name="cast")
    )
    model.graph.input[0].name = "raw"
    path = save(model, tmp_path / "uint8.onnx")
    outcome = run_cli(["eval", path, "--data", "digits[:16]"], capfd, caplog)
    assert_refused(outcome, "eval", "uint8", "raw")
    # raw pixel values (digits are 0..16) fit a uint8 input and run
    outcome = run_cli(["eval", path, "--data", "digits[:16]?scale=1"], capfd, caplog)
    assert outcome.code == 0, outcome.stderr_lines


# ---------------------------------------------------------------------------------------------
# Valid but unusual models are handled, not refused
# ---------------------------------------------------------------------------------------------


def control_flow_model(kind: str) -> onnx.ModelProto:
    """The CNN with r1 routed through an If, Loop or Scan (each computes Relu or identity)."""
    model = cnn()
    graph = model.graph
    anything = TensorProto.FLOAT
    if kind == "If":
        then_branch = helper.make_graph(
            [helper.make_node("Identity", ["r1"], ["t_out"])],
            "then",
            [],
            [helper.make_tensor_value_info("t_out", anything, None)],
        )
        else_branch = helper.make_graph(
            [helper.make_node("Relu", ["r1"], ["e_out"])],
            "else",
            [],
            [helper.make_tensor_value_info("e_out", anything, None)],
        )
        graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        flow = helper.make_node(
            "If", ["cond"], ["cf"], then_branch=then_branch, else_branch=else_branch, name="if"
        )
    elif kind == "Loop":
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Relu", ["v_in"], ["v_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("v_in", anything, None),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("v_out", anything, None),
            ],
        )
        graph.initializer.append(numpy_helper.from_array(np.array(2, np.int64), "trip"))
        graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
        flow = helper.make_node("Loop", ["trip", "cond", "r1"], ["cf"], body=body, name="loop")
    else:
        body = helper.make_graph(
            [helper.make_node("Relu", ["s_in"], ["s_out"])],
            "body",
            [helper.make_tensor_value_info("s_in", anything, [8, 8, 8])],
            [helper.make_tensor_value_info("s_out", anything, [8, 8, 8])],
        )
        flow = helper.make_node("Scan", ["r1"], ["cf"], body=body, num_scan_inputs=1, name="scan")
    graph.node.insert(2, flow)
    node(model, "conv2").input[0] = "cf"
    onnx.checker.check_model(model, full_check=True)
    return model


def subgraph_nodes(flow: onnx.NodeProto) -> list[list[bytes]]:
    return [
        [n.SerializeToString() for n in attr.g.node]
        for attr in flow.attribute
        if attr.HasField("g")
    ]


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def digits_batch(count: int = 16) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((count, 1, 8, 8)).astype(np.float32)


def compress_with_report(
    model: Path, out: Path, pass_spec: str, capfd, caplog, *extra: str
) -> tuple[Outcome, dict]:
    report = out.with_suffix(".json")
    outcome = run_cli(
        ["compress", model, "-o", out, "--pass", pass_spec, "--report", report, "--quiet", *extra],
        capfd,
        caplog,
    )
    assert outcome.code == 0, outcome.stderr_lines
    return outcome, json.loads(report.read_text())


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_control_flow_is_left_alone_and_reported(
    kind: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog
) -> None:
    source = save(control_flow_model(kind), tmp_path / "flow.onnx")
    before = source.read_bytes()
    out = tmp_path / "out.onnx"
    _, report = compress_with_report(source, out, "lrf:ratio=0.5,round_to=1", capfd, caplog)
    assert source.read_bytes() == before
    original, result = onnx.load(str(source)), onnx.load(str(out))
    flow_name = kind.lower()
    # the control-flow node and the nodes of its subgraphs are exactly as they were (shape
    # inference may annotate the subgraphs' values, which changes nothing they compute)
    assert subgraph_nodes(node(result, flow_name)) == subgraph_nodes(node(original, flow_name))
    assert list(node(result, flow_name).input) == list(node(original, flow_name).input)
    # the pass says which channels it left alone because of the control-flow node
    declined = next(step for step in report["steps"] if step["name"] == "lrf")["report"]["declined"]
    assert any(f"{kind} {flow_name}" in d["reason"] or "subgraph" in d["reason"] for d in declined)
    x = digits_batch()
    assert run_ort(out, x).shape == run_ort(source, x).shape
    assert np.isfinite(run_ort(out, x)).all()
    for args in (["inspect", out], ["eval", out, "--data", DATA], ["verify", source, out]):
        outcome = run_cli(args, capfd, caplog)
        assert outcome.code == 0, (args[0], outcome.stderr_lines)
    # the torch bridge cannot run control flow: one line naming the op, before any training
    outcome = run_cli(
        ["finetune", source, "--data", DATA, "-o", tmp_path / "ft.onnx", "--epochs", "1"],
        capfd,
        caplog,
    )
    assert_refused(outcome, "finetune", kind, str(source))


def test_float16_model(tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog) -> None:
    source = save(cnn(np.float16), tmp_path / "fp16.onnx")
    out = tmp_path / "out.onnx"
    _, report = compress_with_report(source, out, "lrf:ratio=0.5,round_to=1", capfd, caplog)
    result = onnx.load(str(out))
    assert {t.data_type for t in result.graph.initializer} == {TensorProto.FLOAT16}
    assert report["after"]["params"] < report["before"]["params"]
    for args in (
        ["inspect", out],
        ["eval", out, "--data", DATA],
        ["verify", source, out, "--data", DATA],
        ["bench", out, "--runs", "1", "--warmup", "0"],
    ):
        outcome = run_cli(args, capfd, caplog)
        assert outcome.code == 0, (args[0], outcome.stderr_lines)
    # a float32 original against its float16 conversion: compared on the same (cast) data
    fp32 = save(cnn(), tmp_path / "fp32.onnx")
    outcome = run_cli(["verify", fp32, source, "--data", DATA, "--json"], capfd, caplog)
    assert outcome.code == 0, outcome.stderr_lines
    assert json.loads(outcome.stdout)["deviation"]["max_rel"] < 1e-2
    outcome = run_cli(
        ["finetune", source, "--data", DATA, "-o", tmp_path / "ft.onnx"], capfd, caplog
    )
    assert_refused(outcome, "finetune", "float16", str(source))
    assert not (tmp_path / "ft.onnx").exists()


def test_bfloat16_weights_behind_a_cast(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog
) -> None:
    model = cnn()
    index = initializer_index(model, "w2")
    w2 = numpy_helper.to_array(model.graph.initializer[index])
    del model.graph.initializer[index]
    model.graph.initializer.append(
        helper.make_tensor("w2_bf16", TensorProto.BFLOAT16, w2.shape, w2.ravel().tolist())
    )
    model.graph.node.insert(
        0, helper.make_node("Cast", ["w2_bf16"], ["w2"], to=TensorProto.FLOAT, name="cast_w2")
    )
    source = save(model, tmp_path / "bf16.onnx")
    out = tmp_path / "out.onnx"
    compress_with_report(source, out, "lrf:ratio=0.5,round_to=1", capfd, caplog)
    result = onnx.load(str(out))
    # the bfloat16 weights are kept as they are, not silently widened
    assert TensorProto.BFLOAT16 in {t.data_type for t in result.graph.initializer}
    x = digits_batch()
    assert run_ort(out, x).shape == (16, 10)
    outcome = run_cli(["verify", source, out, "--data", DATA], capfd, caplog)
    assert outcome.code == 0, outcome.stderr_lines


def test_int8_qdq_weights_stay_quantized(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog
) -> None:
    model = cnn()
    index = initializer_index(model, "w2")
    w2 = numpy_helper.to_array(model.graph.initializer[index])
    scale = (np.abs(w2).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    q = np.clip(np.round(w2 / scale[:, None, None, None]), -127, 127).astype(np.int8)
    del model.graph.initializer[index]
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(q, "w2_q"),
            numpy_helper.from_array(scale, "w2_scale"),
            numpy_helper.from_array(np.zeros(8, np.int8), "w2_zp"),
        ]
    )
    model.graph.node.insert(
        0,
        helper.make_node(
            "DequantizeLinear", ["w2_q", "w2_scale", "w2_zp"], ["w2"], axis=0, name="dq_w2"
        ),
    )
    source = save(model, tmp_path / "qdq.onnx")
    out = tmp_path / "out.onnx"
    _, report = compress_with_report(source, out, "lrf:ratio=0.5,round_to=1", capfd, caplog)
    result = onnx.load(str(out))
    assert "DequantizeLinear" in {n.op_type for n in result.graph.node}
    assert TensorProto.INT8 in {t.data_type for t in result.graph.initializer}
    declined = next(step for step in report["steps"] if step["name"] == "lrf")["report"]["declined"]
    # The int8 weight is cut where it is stored (both of its axes, ratio=0.5 of 8 channels)
    # and its per-channel scales with it, never widened to float.
    assert not any("DequantizeLinear" in d["reason"] for d in declined)
    stored = {t.name: t for t in result.graph.initializer}
    assert stored["w2_q"].data_type == TensorProto.INT8
    assert list(stored["w2_q"].dims) == [4, 4, 3, 3] and list(stored["w2_scale"].dims) == [4]
    x = digits_batch()
    np.testing.assert_allclose(run_ort(out, x).shape, (16, 10))


def test_dynamic_spatial_dims(tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog) -> None:
    source = save(cnn(input_dims=("N", 1, "H", "W")), tmp_path / "dyn.onnx")
    out = tmp_path / "out.onnx"
    # without data nothing says how big H and W are: one line that says to give data
    outcome = run_cli(
        ["compress", source, "-o", out, "--pass", "lrf:ratio=0.5", "--quiet"], capfd, caplog
    )
    assert_refused(outcome, "compress", str(source), "'H'", "--data")
    assert not out.exists()
    outcome = run_cli(["bench", source, "--runs", "1", "--warmup", "0"], capfd, caplog)
    assert_refused(outcome, "bench", "--shape")
    # with data (or a shape) it works, and the output keeps the dynamic dims
    compress_with_report(source, out, "lrf:ratio=0.5,round_to=1", capfd, caplog, "--data", DATA)
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 1, "H", "W"]
    x = np.random.default_rng(0).standard_normal((2, 1, 12, 16)).astype(np.float32)
    assert run_ort(out, x).shape == (2, 10)
    outcome = run_cli(
        ["bench", source, "--runs", "1", "--warmup", "0", "--shape", "input=1x1x8x8"], capfd, caplog
    )
    assert outcome.code == 0, outcome.stderr_lines


def test_external_data_inside_the_folder_is_read_and_written_beside_the_output(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog
) -> None:
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    source = with_external_w2(source_dir, "w2.bin", data=W2_BYTES)
    before = snapshot(source_dir)
    out_dir = tmp_path / "elsewhere"
    out_dir.mkdir()
    out = out_dir / "out.onnx"
    compress_with_report(source, out, "canonicalize", capfd, caplog)
    assert snapshot(source_dir) == before
    # the weights came in a file of their own and leave in one, beside the output
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.json", "out.onnx", "out.onnx.data"]
    x = digits_batch()
    np.testing.assert_allclose(run_ort(out, x), run_ort(source, x), rtol=1e-5, atol=1e-5)
    for command in ("eval", "bench", "inspect"):
        outcome = run_cli(command_args(command, source, source, out), capfd, caplog)
        assert outcome.code == 0, (command, outcome.stderr_lines)


def test_nothing_to_compress_gives_an_unchanged_model_and_reasons(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog
) -> None:
    """One Conv straight to the output: no channel can go, and the report says why."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["output"], name="only_conv")],
        "single",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4, 6, 6])],
        [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w")],
    )
    source = save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
        tmp_path / "single.onnx",
    )
    out = tmp_path / "out.onnx"
    for spec in ("lrf:ratio=0.5", "merge:ratio=0.5"):
        _, report = compress_with_report(source, out, spec, capfd, caplog, "--force")
        step = report["steps"][-1]
        assert step["report"]["modified"] is False
        assert any("graph output" in d["reason"] for d in step["report"]["declined"])
        assert report["after"]["params"] == report["before"]["params"]
        x = digits_batch()
        np.testing.assert_array_equal(run_ort(out, x), run_ort(source, x))
