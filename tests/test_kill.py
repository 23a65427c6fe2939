"""SIGKILL tests: a killed ``compress`` leaves no output and the input intact; a ``finetune``
killed mid-epoch and resumed ends with the same weights as a run never interrupted.

Both run the real console entry point in a child process and kill it with SIGKILL, which no
handler can intercept: only atomic writes (temp file, then rename) keep the promises.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from onnxcompress.graph.model_io import load_model
from onnxcompress.pipeline.run import compress
from onnxcompress.torch_bridge.training_checkpoint import CHECKPOINT_FILE

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "digits_resnet.onnx"
# One thread everywhere: the resumed run must replay the interrupted one bit for bit.
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def demo_model() -> Path:
    if not DEMO_MODEL.exists():
        pytest.skip("models/digits_resnet.onnx has not been trained yet")
    return DEMO_MODEL


def cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "onnxcompress.cli", *map(str, args)]


def kill_when(command: list[str], marker: str, delay: float, cwd: Path) -> str:
    """Start ``command``, SIGKILL it ``delay`` seconds after ``marker`` shows on its stderr."""
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV, cwd=cwd
    )
    assert process.stderr is not None
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if marker in line:
                time.sleep(delay)
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


@pytest.mark.parametrize(
    ("marker", "delay"),
    # Killed the moment the marker shows: on a quiet machine the demo model's whole lrf step,
    # verification and save take well under a second, so any delay here races the finish.
    [("running canonicalize", 0.0), ("running lrf", 0.0), ("  lrf:", 0.0)],
    ids=["canonicalize", "mid-lrf", "before-save"],
)
def test_killed_compress_leaves_no_output_and_the_input_intact(
    demo_model: Path, tmp_path: Path, marker: str, delay: float
) -> None:
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    source.write_bytes(demo_model.read_bytes())
    before = source.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    command = cli("compress", source, "-o", out_dir / "small.onnx", "--pass", "lrf:target_macs=0.5")
    kill_when(command, marker, delay, tmp_path)
    assert source.read_bytes() == before
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.onnx"]
    # No half-written temporary file beside where the output would have gone, ever.
    left = sorted(p.name for p in out_dir.iterdir())
    if marker == "running canonicalize":
        assert left == []  # killed long before any write: nothing at all
    else:
        # The later kills can lose the race to a finish well under a second away; then the
        # atomic rename has happened and the file must be the whole, loadable model.
        assert left in ([], ["small.onnx"]), left
        if left:
            load_model(out_dir / "small.onnx")


def finetune_command(student: Path, out: Path, checkpoints: Path, *extra: str) -> list[str]:
    return cli(
        "finetune",
        student,
        "--teacher",
        DEMO_MODEL,
        "--data",
        "digits[:1200]",
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--lr",
        "0.002",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--checkpoint-dir",
        checkpoints,
        "-o",
        out,
        *extra,
    )


def weights(path: Path) -> dict[str, np.ndarray]:
    model = load_model(path)
    return {
        name: value.const_value.numpy()
        for name, value in model.graph.initializers.items()
        if value.const_value is not None
    }


def test_finetune_killed_mid_epoch_resumes_to_the_same_weights(
    demo_model: Path, tmp_path: Path
) -> None:
    student = tmp_path / "student.onnx"
    compress(demo_model, student, [("lrf", {"target_macs": 0.5, "criterion": "weights"})])
    student_bytes = student.read_bytes()

    straight = tmp_path / "straight.onnx"
    result = subprocess.run(
        finetune_command(student, straight, tmp_path / "ck_straight"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]

    resumed = tmp_path / "resumed.onnx"
    checkpoints = tmp_path / "ck_killed"
    command = finetune_command(student, resumed, checkpoints)
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV, cwd=tmp_path
    )
    checkpoint = checkpoints / CHECKPOINT_FILE
    deadline = time.monotonic() + 300
    # the first epoch's checkpoint appears (atomically); the kill lands inside the second
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "finetune ended before it could be killed"
    assert not resumed.exists()
    assert student.read_bytes() == student_bytes

    import torch

    saved = torch.load(checkpoint, weights_only=True)
    assert 1 <= saved["epoch"] < 3  # killed after a checkpoint and before the end

    result = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed" in result.stderr or "resumed" in result.stdout
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6, err_msg=name)
    assert student.read_bytes() == student_bytes
