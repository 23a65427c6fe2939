"""The latency model (block detection, cost curves, cache) and allocation priced by latency.

The pass-level tests replace ONNX Runtime's timings with a synthetic latency table, so what the
allocator does with a price is tested exactly, on any machine; one test times real convs to
check that the cache makes a second run measure nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
from channel_models import Net, feeds_for, run

from onnxcompress.errors import PassConfigError
from onnxcompress.fitting.allocation import GroupPath, allocate
from onnxcompress.fitting.latency_curve import CostCurve, blocks
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import clone_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext
from onnxcompress.runtime import latency_table, vector_block
from onnxcompress.runtime.latency_table import (
    LatencyCache,
    LatencyModel,
    LatencyTarget,
    LayerShape,
    conv_shapes,
)

# -- the vector block ---------------------------------------------------------------------------


@pytest.fixture
def detected_block(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Block detection as a user gets it: without the suite's fixed block."""
    monkeypatch.delenv(vector_block.OVERRIDE_ENV, raising=False)
    yield


@pytest.mark.parametrize(
    ("flags", "machine", "isa", "block"),
    [
        ({"fma", "avx", "avx2", "avx512f", "avx512bw"}, "x86_64", "avx512", 16),
        ({"fma", "avx", "avx2"}, "x86_64", "avx2", 8),
        ({"avx"}, "x86_64", "avx", 8),
        ({"sse4_2"}, "x86_64", "generic", 8),
        (set(), "aarch64", "neon", 8),
    ],
)
def test_block_follows_the_cpu_flags(
    detected_block: None, flags: set[str], machine: str, isa: str, block: int
) -> None:
    assert vector_block.detect_isa(flags, machine) == isa
    assert vector_block.vector_block("cpu", isa) == block


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f\n\nprocessor\t: 1\n")
    assert {"avx2", "fma", "avx512f"} <= vector_block.cpu_flags(cpuinfo)
    assert vector_block.cpu_flags(tmp_path / "absent") == set()


def test_gpu_providers_use_their_own_block(detected_block: None) -> None:
    assert vector_block.vector_block("CUDAExecutionProvider", "avx512") == vector_block.GPU_BLOCK


def test_block_override_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vector_block.OVERRIDE_ENV, "4")
    assert vector_block.vector_block() == 4
    monkeypatch.setenv(vector_block.OVERRIDE_ENV, "sixteen")
    with pytest.raises(PassConfigError, match="positive integer"):
        vector_block.vector_block()


def test_a_cuda_target_is_keyed_and_blocked_as_cuda(
    detected_block: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path, with a fake provider list (onnxruntime-gpu cannot be installed here)."""
    from onnxcompress.runtime import session

    monkeypatch.setattr(
        session,
        "available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    target = LatencyTarget(provider="cuda", batch=32, threads=2)
    assert target.provider_name() == "CUDAExecutionProvider"
    assert target.block() == vector_block.GPU_BLOCK
    key = target.cache_key()
    assert key.startswith("CUDAExecutionProvider|") and "batch 32" in key and "threads 2" in key
    assert key != LatencyTarget(provider="cpu", batch=32, threads=2).cache_key()


# -- the cost curve -----------------------------------------------------------------------------


def block_law(cin: int, cout: int, block: int = 8) -> float:
    """A synthetic layer: 0.01 ms fixed, then per block product and per output block."""
    return 0.01 + 0.002 * blocks(cin, block) * blocks(cout, block) + 0.001 * blocks(cout, block)


def test_curve_fits_a_block_law_and_is_monotone() -> None:
    points = [(i, o, block_law(i, o)) for i in (64, 32) for o in (64, 32)]
    curve = CostCurve.fit(points, block=8)
    for cin, cout, ms in points:
        assert curve(cin, cout) == pytest.approx(ms, rel=1e-3)
    widths = range(1, 65)
    for cin, cout in itertools.product(widths, widths):
        assert curve(cin, cout) <= curve(min(cin + 1, 64), cout) + 1e-12
        assert curve(cin, cout) <= curve(cin, min(cout + 1, 64)) + 1e-12
    # Widths within one block cost the same; the next block costs more.
    assert curve(64, 41) == curve(64, 48) < curve(64, 49)
    assert all(c >= 0 for c in curve.coefficients)


def test_curve_never_predicts_a_cut_makes_a_layer_slower() -> None:
    """Noisy times where the narrower layer measured slower: the fit stays non-negative."""
    points = [(32, 32, 0.050), (32, 16, 0.055), (16, 32, 0.049), (16, 16, 0.030)]
    curve = CostCurve.fit(points, block=8)
    assert curve(32, 16) <= curve(32, 32) and curve(16, 16) <= curve(16, 32)


def test_one_point_gives_a_mac_proportional_curve() -> None:
    curve = CostCurve.fit([(16, 16, 0.04)], block=16)
    assert curve(16, 16) == pytest.approx(0.04)
    depthwise = CostCurve.fit([(32, 32, 0.02), (16, 16, 0.012)], block=8, depthwise=True)
    assert depthwise(32, 32) == pytest.approx(0.02, rel=1e-3)
    assert depthwise(16, 16) < depthwise(32, 32)


# -- the latency model --------------------------------------------------------------------------


def three_convs(size: int = 16) -> ir.Model:
    """conv1 3->32 at size, conv2 32->32 stride 2, conv3 32->32 at size/2, then a head."""
    net = Net(seed=3)
    x = net.input("x", ["N", 3, size, size])
    y = net.relu(net.conv(x, 3, 32))
    y = net.relu(net.conv(y, 32, 32, stride=2))
    y = net.relu(net.conv(y, 32, 32))
    return net.build([net.head(y, 32)])


def synthetic_ms(shape: LayerShape) -> float:
    """Convs at the larger size cost ten times more per block product than at the smaller one."""
    per_block = 0.01 if shape.spatial[0] >= 16 else 0.001
    return per_block * blocks(shape.in_channels, 8) * blocks(shape.out_channels, 8)


def synthetic_total(model: ir.Model, rest: float = 0.02) -> float:
    return rest + sum(synthetic_ms(shape) for shape in conv_shapes(model).values())


def test_model_covers_every_conv_with_its_input_size() -> None:
    model = three_convs()
    shapes = list(conv_shapes(model).values())
    assert [s.spatial for s in shapes] == [(16, 16), (16, 16), (8, 8)]
    assert [(s.in_channels, s.out_channels, s.strides) for s in shapes] == [
        (3, 32, (1, 1)),
        (32, 32, (2, 2)),
        (32, 32, (1, 1)),
    ]
    built = LatencyModel.build(
        model, LatencyTarget(), layer_timer=synthetic_ms, model_timer=synthetic_total, block=8
    )
    assert built.original_ms == pytest.approx(synthetic_total(model))
    assert built.predicted_ms() == pytest.approx(built.original_ms)
    assert built.measured == 2 + 4 + 4  # conv1 has one input width; conv2 and conv3 two each


def test_second_build_reads_the_cache(tmp_path: Path) -> None:
    """Real ONNX Runtime timings: the second run on the same target measures nothing."""
    model = three_convs(size=8)
    target = LatencyTarget(provider="cpu", batch=1, threads=1)
    path = tmp_path / "latency.json"
    first = LatencyModel.build(model, target, cache=LatencyCache(path), block=8)
    assert first.measured > 0 and first.cached == 0 and path.exists()
    second = LatencyModel.build(model, target, cache=LatencyCache(path), block=8)
    assert second.measured == 0 and second.cached == first.measured
    assert [c.coefficients for c in second.curves.values()] == [
        c.coefficients for c in first.curves.values()
    ]
    other = LatencyModel.build(
        model, LatencyTarget(provider="cpu", batch=2, threads=1), cache=LatencyCache(path), block=8
    )
    assert other.cached == 0  # another batch is another target


def test_unwritable_cache_only_logs(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    cache = LatencyCache(blocker / "latency.json")
    cache.put("target", "point", 1.0)
    cache.save()  # no exception: the times are still used for the run
    assert cache.get("target", "point") == 1.0


def test_calibration_fits_through_a_measured_point() -> None:
    model = three_convs()
    built = LatencyModel.build(
        model, LatencyTarget(), layer_timer=synthetic_ms, model_timer=synthetic_total, block=8
    )
    original = built.original_ms
    # Pretend a cut: shrink conv3's output by editing its weight, then "measure" it.
    conv3 = list(built.curves)[2]
    weight = conv3.inputs[1]
    assert weight is not None and weight.const_value is not None
    array = weight.const_value.numpy()[:16]
    weight.const_value = ir.tensor(array)
    predicted = built.predicted_ms()
    assert predicted < original
    built.calibrate(measured_ms=original - 2 * (original - predicted))
    assert built.predicted_ms() == pytest.approx(original - 2 * (original - predicted))


# -- allocation priced by latency ---------------------------------------------------------------


def test_allocator_ranks_by_worth_but_counts_saving() -> None:
    """Equal MACs and costs: the group whose channels save more time goes first."""
    same = {"size": 8, "costs": [1.0] * 8, "saving": 10.0}
    cheap_in_time = GroupPath(key=0, worth_curve=[1.0 * n for n in range(9)], **same)
    dear_in_time = GroupPath(key=1, worth_curve=[5.0 * n for n in range(9)], **same)
    assert allocate([cheap_in_time, dear_in_time], 30.0, round_to=1) == {1: 3}


def test_allocator_uses_each_paths_multiple() -> None:
    paths = [
        GroupPath(key=0, size=64, costs=[1.0] * 63, saving=1.0, multiple=16),
        GroupPath(key=1, size=24, costs=[1.0] * 23, saving=1.0, multiple=8),
    ]
    plan = allocate(paths, 40.0, round_to=1)
    assert (64 - plan.get(0, 0)) % 16 == 0 and (24 - plan.get(1, 0)) % 8 == 0
    assert sum(plan.values()) >= 40


class FakeTimer:
    """Stands in for InterleavedTimer: the synthetic table is the 'measured' latency, plus a
    fixed cost the latency model does not see, so the pass must calibrate to land."""

    def __init__(self, reference: ir.Model, target: LatencyTarget, **_: Any) -> None:
        self.original = synthetic_total(reference)
        self.reference = synthetic_total(reference, rest=0.05)

    def reference_ms(self) -> float:
        return self.original

    def ratio(self, candidate: ir.Model) -> float:
        return synthetic_total(candidate, rest=0.05) / self.reference


@pytest.fixture
def synthetic_latency(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from onnxcompress.passes import latency_pricing

    monkeypatch.setenv("ONNXCOMPRESS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(latency_table, "time_layer", lambda shape, target: synthetic_ms(shape))
    monkeypatch.setattr(latency_table, "InterleavedTimer", FakeTimer)
    monkeypatch.setattr(latency_pricing, "InterleavedTimer", FakeTimer)


def prune(model: ir.Model, **options: Any) -> dict[str, Any]:
    compression = create_pass("lrf", {"round_to": 8, **options}, PassContext())
    compression(model)
    return compression.report.as_dict()


def widths(model: ir.Model) -> list[int]:
    return [shape.out_channels for shape in conv_shapes(model).values()]


def test_cost_latency_cuts_where_time_is(synthetic_latency: None) -> None:
    """At the same MACs budget, pricing by time cuts the group whose convs run at the large
    size (conv1's output, read by conv2 at 16x16) before the cheap ones; by MACs it does not."""
    by_macs, by_time = three_convs(), three_convs()
    prune(by_macs, target_macs=0.7)
    report = prune(by_time, target_macs=0.7, cost="latency")
    assert report["targets"][0]["met"]
    assert widths(by_time)[0] < widths(by_macs)[0]
    assert synthetic_total(by_time) < synthetic_total(by_macs)
    assert "latency" in report["summary"] and report["summary"]["latency"]["model"]["convs"] == 3
    assert any("latency model" in note for note in report["notes"])
    # Still a valid model: it runs in ONNX Runtime with the original's output shapes.
    original = three_convs()
    feeds = feeds_for(original)
    for new, old in zip(run(by_time, feeds), run(original, feeds), strict=True):
        assert new.shape == old.shape and np.all(np.isfinite(new))


def test_target_latency_lands_within_tolerance(synthetic_latency: None) -> None:
    model = three_convs()
    original = clone_model(model)
    report = prune(model, target_latency=0.6)
    ratio = synthetic_total(model, rest=0.05) / synthetic_total(original, rest=0.05)
    assert report["targets"][0]["option"] == "target_latency"
    assert report["targets"][0]["met"], report["targets"]
    assert abs(ratio - 0.6) <= 0.02 + 1e-9
    rounds = report["summary"]["latency"]["rounds"]
    assert rounds and rounds[-1]["measured_ratio"] == pytest.approx(ratio, abs=1e-3)
    assert any(note.startswith("latency: predicted") for note in report["notes"])
    assert model_metrics(model).macs < model_metrics(original).macs


def test_unreachable_latency_target_is_reported_as_missed(synthetic_latency: None) -> None:
    model = three_convs()
    report = prune(model, target_latency=0.05, min_channels=8)
    outcome = report["targets"][0]
    assert not outcome["met"] and outcome["reason"]


def test_a_chunk_that_crosses_no_block_is_ranked_with_the_one_that_does() -> None:
    """Group 0's first chunk of 8 saves no time (its width stays within a 16-block), its second
    saves a whole block; taken together they beat group 1's steady but small saving per cost.
    Without the look-ahead group 0 would never start."""
    stepped = GroupPath(
        key=0, size=32, costs=[1.0] * 24, saving=1.0, multiple=8, worth_curve=stepped_curve()
    )
    steady = GroupPath(
        key=1,
        size=32,
        costs=[1.0] * 24,
        saving=1.0,
        multiple=8,
        worth_curve=[0.1 * n for n in range(25)],
    )
    assert allocate([stepped, steady], 16.0, round_to=8) == {0: 16}


def stepped_curve() -> list[float]:
    """Worth of removing n channels from 32 when time moves in blocks of 16: 0 until 16 go."""
    return [0.0 if n < 16 else (4.0 if n < 32 else 8.0) for n in range(25)]


def test_chunks_that_save_no_time_are_taken_cheapest_first() -> None:
    """A MACs budget may still need channels that save no time: among those, the one cheapest
    per MAC goes first (not the first group in the list, whose chunk would overshoot)."""
    zero = [0.0] * 9
    dear = GroupPath(key=0, size=16, costs=[1.0] * 8, saving=100.0, multiple=8, worth_curve=zero)
    cheap = GroupPath(key=1, size=16, costs=[0.01] * 8, saving=10.0, multiple=8, worth_curve=zero)
    assert allocate([dear, cheap], 80.0, round_to=8) == {1: 8}


def test_merge_prices_by_latency_too(synthetic_latency: None) -> None:
    model = three_convs()
    compression = create_pass(
        "merge", {"round_to": 8, "target_macs": 0.7, "cost": "latency"}, PassContext()
    )
    compression(model)
    report = compression.report.as_dict()
    assert report["targets"][0]["met"], report["targets"]
    assert report["summary"]["latency"]["model"]["convs"] == 3


def eighths_ms(shape: LayerShape) -> float:
    """A synthetic kernel whose time moves every 8 channels, inside 16-channel blocks."""
    return 0.001 * blocks(shape.in_channels, 8) * blocks(shape.out_channels, 8)


def test_narrow_layers_are_timed_at_every_width_a_pass_may_pick() -> None:
    """On a 16-channel block, a 32-channel layer is timed at 8, 16, 24 and 32 on both sides,
    and the measured times answer for those widths where the block count cannot tell them
    apart; wide layers keep the four-point fit."""
    model = three_convs()
    built = LatencyModel.build(
        model, LatencyTarget(), layer_timer=eighths_ms, model_timer=synthetic_total, block=16
    )
    assert built.measured == 4 + 16 + 16  # conv1 (3 inputs): 4 output widths; conv2, conv3: 4x4
    conv2 = list(built.curves)[1]
    curve = built.curves[conv2]
    assert curve(32, 24) == pytest.approx(0.012) and curve(32, 32) == pytest.approx(0.016)
    assert curve(32, 24) < curve(32, 32)
    assert not latency_table.timed_densely(conv_shapes(model)[conv2].at(32, 128), 16)
