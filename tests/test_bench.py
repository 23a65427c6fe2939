"""Tests for onnxcompress.runtime.bench and the provider logic it relies on in
onnxcompress.runtime.session.

Timing assertions are deliberately loose (2-core CI machines are noisy); the structure of the
measurement (interleaving, shared inputs, batch handling) is checked exactly through a session spy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

from onnxcompress.errors import (
    DataError,
    ModelLoadError,
    PassConfigError,
    ProviderUnavailableError,
)
from onnxcompress.runtime import session as runtime
from onnxcompress.runtime.bench import BenchRow, benchmark, format_bench_table

CHANNELS = 16
SIZE = 32
ROW_KEYS = {"model", "provider", "batch", "p50_ms", "p90_ms", "p99_ms", "throughput", "speedup"}


def _conv_chain(
    path: Path, depth: int, *, input_shape: list[int | str] | None = None, seed: int = 0
) -> Path:
    """``depth`` 3x3 Conv+Relu layers at CHANNELS channels: MACs grow linearly with depth."""
    rng = np.random.default_rng(seed)
    shape = input_shape or ["N", CHANNELS, SIZE, SIZE]
    nodes, inits = [], []
    current = "x"
    for i in range(depth):
        weight = rng.standard_normal((CHANNELS, CHANNELS, 3, 3)).astype(np.float32) * 0.1
        inits.append(onh.from_array(weight, f"w{i}"))
        nodes.append(oh.make_node("Conv", [current, f"w{i}"], [f"c{i}"], pads=[1, 1, 1, 1]))
        nodes.append(oh.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        current = f"r{i}"
    nodes.append(oh.make_node("Identity", [current], ["y"]))
    graph = oh.make_graph(
        nodes,
        "chain",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def light(tmp_path: Path) -> Path:
    return _conv_chain(tmp_path / "light.onnx", 1)


@pytest.fixture
def heavy(tmp_path: Path) -> Path:
    # 20x the MACs of ``light``: a gap no scheduling noise closes.
    return _conv_chain(tmp_path / "heavy.onnx", 20, seed=1)


class _SpySession:
    """Wraps an InferenceSession and records every run into a shared log."""

    def __init__(self, inner: Any, label: str, log: list[tuple[str, dict[str, np.ndarray]]]):
        self._inner = inner
        self._label = label
        self._log = log

    def run(self, output_names: Any, feeds: dict[str, np.ndarray], *args: Any) -> Any:
        self._log.append((self._label, feeds))
        return self._inner.run(output_names, feeds, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def run_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, np.ndarray]]]:
    log: list[tuple[str, dict[str, np.ndarray]]] = []
    real = runtime.make_session

    def spy(model: Any, **kwargs: Any) -> _SpySession:
        return _SpySession(real(model, **kwargs), Path(model).stem, log)

    monkeypatch.setattr(runtime, "make_session", spy)
    return log


# ---------------------------------------------------------------------------------------------
# Rows and table
# ---------------------------------------------------------------------------------------------


def test_row_shape_and_json(light: Path) -> None:
    (row,) = benchmark([light], provider="cpu", warmup=1, runs=5, threads=1)
    data = json.loads(json.dumps(row.as_dict()))
    assert set(data) == ROW_KEYS
    assert data["model"] == str(light)
    assert data["provider"] == "cpu" and data["batch"] == 1
    assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms
    assert row.throughput == pytest.approx(1 / (row.p50_ms / 1e3))
    assert row.speedup == 1.0


def test_format_bench_table(light: Path, heavy: Path) -> None:
    rows = [
        BenchRow(str(heavy), "cpu", 1, 4.0, 4.5, 5.0, 250.0, 1.0),
        BenchRow(str(light), "cpu", 1, 0.5, 0.6, 0.7, 2000.0, 8.0),
    ]
    lines = format_bench_table(rows).splitlines()
    assert lines[0].split() == [
        "model",
        "provider",
        "batch",
        "p50",
        "ms",
        "p90",
        "ms",
        "p99",
        "ms",
        "img/s",
        "speedup",
    ]
    assert lines[2].startswith(str(heavy)) and lines[2].endswith("1.00x")
    assert lines[3].startswith(str(light)) and lines[3].endswith("8.00x")
    assert "2,000.0" in lines[3] and "0.500" in lines[3]


# ---------------------------------------------------------------------------------------------
# Speed-ups (loose bounds: only gaps far above the machine's noise are asserted)
# ---------------------------------------------------------------------------------------------


def test_model_against_itself_has_speedup_near_one(tmp_path: Path) -> None:
    model = _conv_chain(tmp_path / "mid.onnx", 4)
    rows = benchmark([model, model], provider="cpu", warmup=3, runs=25, threads=1)
    assert rows[0].speedup == 1.0
    assert 0.5 < rows[1].speedup < 2.0


def test_light_model_is_faster_than_heavy_one(light: Path, heavy: Path) -> None:
    rows = benchmark([heavy, light], provider="cpu", warmup=2, runs=10, threads=1)
    assert [r.model for r in rows] == [str(heavy), str(light)]
    assert rows[0].speedup == 1.0
    assert rows[1].speedup > 2.0
    assert rows[1].throughput > rows[0].throughput


# ---------------------------------------------------------------------------------------------
# Measurement structure
# ---------------------------------------------------------------------------------------------


def test_runs_are_interleaved_and_share_feeds(
    light: Path, heavy: Path, run_log: list[tuple[str, dict[str, np.ndarray]]]
) -> None:
    benchmark([heavy, light], provider="cpu", warmup=2, runs=4, threads=1)
    order = [label for label, _ in run_log]
    assert order == ["heavy", "light"] * 6
    first = run_log[0][1]
    assert all(feeds is first for _, feeds in run_log)


def test_seed_decides_the_inputs(
    light: Path, run_log: list[tuple[str, dict[str, np.ndarray]]]
) -> None:
    benchmark([light], provider="cpu", warmup=0, runs=1, seed=0)
    benchmark([light], provider="cpu", warmup=0, runs=1, seed=0)
    benchmark([light], provider="cpu", warmup=0, runs=1, seed=1)
    a, b, c = (feeds["x"] for _, feeds in run_log)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dynamic_batch_runs_each_batch_size(
    light: Path, run_log: list[tuple[str, dict[str, np.ndarray]]]
) -> None:
    rows = benchmark([light], provider="cpu", batches=(1, 4), warmup=1, runs=2)
    assert [r.batch for r in rows] == [1, 4]
    assert [feeds["x"].shape[0] for _, feeds in run_log] == [1, 1, 1, 4, 4, 4]
    for row in rows:
        assert row.throughput == pytest.approx(row.batch / (row.p50_ms / 1e3))


def test_fixed_batch_model_refuses_other_batch(tmp_path: Path) -> None:
    model = _conv_chain(tmp_path / "fixed.onnx", 1, input_shape=[1, CHANNELS, SIZE, SIZE])
    assert benchmark([model], provider="cpu", batches=(1,), warmup=0, runs=1)[0].batch == 1
    with pytest.raises(DataError, match="fixed batch of 1"):
        benchmark([model], provider="cpu", batches=(4,), warmup=0, runs=1)


def test_dynamic_spatial_dims_need_shape_overrides(
    tmp_path: Path, run_log: list[tuple[str, dict[str, np.ndarray]]]
) -> None:
    model = _conv_chain(tmp_path / "anysize.onnx", 1, input_shape=["N", CHANNELS, "H", "W"])
    with pytest.raises(DataError, match="dynamic dimension"):
        benchmark([model], provider="cpu", warmup=0, runs=1)
    rows = benchmark(
        [model],
        provider="cpu",
        batches=(1, 3),
        warmup=0,
        runs=1,
        shape_overrides={"x": (1, CHANNELS, 24, 20)},
    )
    assert [r.batch for r in rows] == [1, 3]
    # The override fixes H and W; the batch axis follows each batch size.
    assert [feeds["x"].shape for _, feeds in run_log] == [(1, 16, 24, 20), (3, 16, 24, 20)]
    with pytest.raises(DataError, match="none of the models has"):
        benchmark([model], provider="cpu", runs=1, shape_overrides={"input": (1, 16, 8, 8)})


def test_progress_bar_goes_to_stderr(light: Path, capsys: pytest.CaptureFixture[str]) -> None:
    benchmark([light], provider="cpu", warmup=1, runs=2, progress=True)
    captured = capsys.readouterr()
    assert "bench" in captured.err and captured.out == ""
    benchmark([light], provider="cpu", warmup=1, runs=2, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# User errors
# ---------------------------------------------------------------------------------------------


def test_bad_model_files_raise_model_load_error(tmp_path: Path, light: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not a protobuf \x00\xff" * 10)
    with pytest.raises(ModelLoadError, match=r"garbage\.onnx"):
        benchmark([light, garbage], provider="cpu", warmup=0, runs=1)
    with pytest.raises(ModelLoadError, match="no such file"):
        benchmark([tmp_path / "missing.onnx"], provider="cpu", warmup=0, runs=1)


@pytest.mark.parametrize(
    "kwargs", [{"batches": (0,)}, {"batches": ()}, {"runs": 0}, {"warmup": -1}]
)
def test_bad_arguments_raise_pass_config_error(light: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(PassConfigError):
        benchmark([light], provider="cpu", **kwargs)


def test_cuda_without_onnxruntime_gpu_names_the_package(light: Path) -> None:
    if "CUDAExecutionProvider" in runtime.available_providers():
        pytest.skip("CUDA is available here; the missing-provider error cannot happen")
    with pytest.raises(ProviderUnavailableError, match="onnxruntime-gpu"):
        benchmark([light], provider="cuda", warmup=0, runs=1)


def test_unknown_provider_is_refused(light: Path) -> None:
    with pytest.raises(ProviderUnavailableError, match="unknown provider"):
        benchmark([light], provider="tpu", warmup=0, runs=1)


# ---------------------------------------------------------------------------------------------
# Provider resolution (the CUDA path, simulated)
# ---------------------------------------------------------------------------------------------

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def test_cuda_path_when_onnxruntime_gpu_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "available_providers", lambda: [CUDA, CPU])
    assert runtime.default_provider() == "cuda"
    # CPU stays in the list as the fallback for ops CUDA does not implement.
    assert runtime.resolve_providers(None) == [CUDA, CPU]
    assert runtime.resolve_providers("cuda") == [CUDA, CPU]
    assert runtime.resolve_providers("CUDA") == [CUDA, CPU]
    assert runtime.resolve_providers(CUDA) == [CUDA, CPU]
    assert runtime.resolve_providers("cpu") == [CPU]
    with pytest.raises(ProviderUnavailableError, match="TensorrtExecutionProvider"):
        runtime.resolve_providers("tensorrt")


def test_cpu_only_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "available_providers", lambda: [CPU])
    assert runtime.default_provider() == "cpu"
    assert runtime.resolve_providers(None) == [CPU]
    with pytest.raises(
        ProviderUnavailableError,
        match=r"pip install 'onnxcompress\[gpu\]' \(it installs onnxruntime-gpu",
    ):
        runtime.resolve_providers("cuda")
