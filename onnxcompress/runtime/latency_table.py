"""A latency model of one network on one target: each conv timed alone in ONNX Runtime at a few
channel widths, a block-aware cost curve fitted through the times, cached on disk.

A pass that prices channels by latency (``lrf``/``merge`` with ``cost=latency`` or
``target_latency``) asks this model what a plan saves. Each conv is rebuilt as a one-node
model with its real input size, kernel, stride, padding and groups, and timed on the run's
provider, thread count and batch at its full widths and about half of each (on the vector
block, see ``vector_block``); ``fitting.latency_curve.CostCurve`` interpolates between them.
Everything else the network does (pooling, additions, the classifier, the runtime's own
overhead) is the measured whole-model latency minus the convs' predicted share, and stays
fixed: pruning channels does not shrink it in this model.

Times are cached in ``~/.cache/onnxcompress/latency.json`` (``ONNXCOMPRESS_CACHE_DIR`` moves
it), keyed by provider, instruction set, ONNX Runtime version, threads and batch, then by the
layer's signature and widths: a second run on the same machine measures nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.fitting.latency_curve import CostCurve
from onnxcompress.graph.model_io import publish
from onnxcompress.graph.op_families import DEFAULT_DOMAINS
from onnxcompress.runtime.vector_block import detect_isa, vector_block

logger = logging.getLogger(__name__)

CACHE_ENV = "ONNXCOMPRESS_CACHE_DIR"
CACHE_VERSION = 1
# Timed runs of one layer: at least MIN_RUNS, then until MIN_SECONDS have passed or MAX_RUNS.
# A median of 5 to 25 runs of a sub-millisecond conv varied by a few percent between repeats
# on a shared 2-core machine; the fit and the allocation only need the ranking of layers.
WARMUP_RUNS = 2
MIN_RUNS = 5
MAX_RUNS = 25
MIN_SECONDS = 0.15


@dataclasses.dataclass(frozen=True)
class LatencyTarget:
    """Where latency is priced: ONNX Runtime provider, intra-op threads and batch.

    Attributes:
        provider: ``cpu``, ``cuda``, ... (None: the best available, as ``bench`` picks).
        batch: images per run.
        threads: intra-op threads (None: ONNX Runtime's default, all cores).
    """

    provider: str | None = None
    batch: int = 1
    threads: int | None = None

    def provider_name(self) -> str:
        from onnxcompress.runtime.session import resolve_providers

        return resolve_providers(self.provider)[0]

    def block(self) -> int:
        """Channels per vector block on this target."""
        return vector_block(self.provider_name())

    def cache_key(self) -> str:
        """What the times depend on besides the layer: provider, ISA, ORT version, threads,
        batch (with the default thread count, the machine's core count)."""
        import onnxruntime as ort

        threads = self.threads or f"default/{os.cpu_count()}"
        return (
            f"{self.provider_name()}|{detect_isa()}|ort {ort.__version__}|threads {threads}|"
            f"batch {self.batch}"
        )


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """A conv's signature: everything its latency depends on besides the target.

    Attributes:
        in_channels / out_channels: channel widths of the input and output.
        groups: the conv's ``group`` attribute.
        kernel, strides, pads, dilations: as the conv's attributes (resolved defaults).
        spatial: the input's spatial size.
    """

    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    spatial: tuple[int, ...]

    @property
    def depthwise(self) -> bool:
        """One filter per channel: input and output widths move together."""
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    def at(self, in_channels: int, out_channels: int) -> LayerShape:
        """The same conv at other widths (a depthwise conv keeps one width for both)."""
        if self.depthwise:
            return dataclasses.replace(
                self, in_channels=out_channels, out_channels=out_channels, groups=out_channels
            )
        per_group = max(in_channels // self.groups, 1)
        out_channels = max(self.groups, out_channels // self.groups * self.groups)
        return dataclasses.replace(
            self, in_channels=per_group * self.groups, out_channels=out_channels
        )

    def key(self) -> str:
        def dims(values: tuple[int, ...]) -> str:
            return "x".join(str(v) for v in values)

        return (
            f"conv {self.in_channels}->{self.out_channels} g{self.groups} k{dims(self.kernel)} "
            f"s{dims(self.strides)} p{dims(self.pads)} d{dims(self.dilations)} "
            f"@{dims(self.spatial)}"
        )

    def model_bytes(self, batch: int) -> bytes:
        """A one-conv ONNX model of this shape with random weights, serialized."""
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        weight = rng.standard_normal(
            (self.out_channels, self.in_channels // self.groups, *self.kernel)
        ).astype(np.float32)
        bias = np.zeros(self.out_channels, np.float32)
        node = helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            group=self.groups,
            kernel_shape=list(self.kernel),
            strides=list(self.strides),
            pads=list(self.pads),
            dilations=list(self.dilations),
        )
        x = helper.make_tensor_value_info(
            "x", TensorProto.FLOAT, [batch, self.in_channels, *self.spatial]
        )
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
        graph = helper.make_graph(
            [node],
            "layer",
            [x],
            [y],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return bytes(onnx.ModelProto.SerializeToString(model))


def conv_widths(node: ir.Node) -> tuple[int, int, int]:
    """A conv's current ``(in_channels, out_channels, groups)`` from its weight and attribute."""
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    groups = node.attributes.get_int("group", 1)
    dims = [int(d) for d in weight.const_value.shape.numpy()]
    out_channels, per_group = dims[0], dims[1]
    return per_group * groups, out_channels, groups


def conv_shapes(model: ir.Model) -> dict[ir.Node, LayerShape]:
    """The signature of every plain float Conv whose weight is a constant and whose input
    size is known (at the input shapes MACs are counted at, ``count_macs_at``)."""
    from onnxcompress.graph.canonicalize import infer_shapes
    from onnxcompress.graph.input_shapes import at_counted_shapes

    shapes: dict[ir.Node, LayerShape] = {}
    with at_counted_shapes(model):
        if any(
            node.op_type == "Conv" and node.inputs[0] is not None and node.inputs[0].shape is None
            for node in model.graph
        ):
            infer_shapes(model)
        for node in model.graph:
            if node.op_type != "Conv" or node.domain not in DEFAULT_DOMAINS:
                continue
            x, weight = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
            if x is None or weight is None or weight.const_value is None or x.shape is None:
                continue
            if weight.const_value.dtype != ir.DataType.FLOAT:
                continue
            dims = list(x.shape)
            spatial = dims[2:]
            if not spatial or not all(isinstance(d, int) and d > 0 for d in spatial):
                continue
            rank = len(spatial)
            kernel = tuple(int(d) for d in weight.const_value.shape.numpy()[2:])
            pads = tuple(node.attributes.get_ints("pads", [0] * 2 * rank))
            auto_pad = node.attributes.get("auto_pad")
            if auto_pad is not None and auto_pad.as_string() not in ("NOTSET", ""):
                # SAME_* padding: the amount follows from the sizes; a symmetric guess times
                # the same work within a pixel of the border.
                pads = tuple(k // 2 for k in kernel) * 2
            in_channels, out_channels, groups = conv_widths(node)
            shapes[node] = LayerShape(
                in_channels=in_channels,
                out_channels=out_channels,
                groups=groups,
                kernel=kernel,
                strides=tuple(node.attributes.get_ints("strides", [1] * rank)),
                pads=pads,
                dilations=tuple(node.attributes.get_ints("dilations", [1] * rank)),
                spatial=tuple(int(d) for d in spatial),  # type: ignore[arg-type]
            )
    return shapes


# A layer whose widths are all at most DENSE_BLOCKS blocks, on a target whose block is wider
# than FINE_STEP, is timed at every multiple of FINE_STEP (the narrowest step a pass takes by
# default): inside one block its time is not flat (see CostCurve.table), and such a layer has
# few widths to time. Wider layers are timed at full and half widths and fitted.
DENSE_BLOCKS = 4
FINE_STEP = 8


def width_levels(channels: int, block: int, dense: bool = False) -> list[int]:
    """The widths a layer is timed at: all of them and about half on the block, or with
    ``dense`` every multiple of ``FINE_STEP`` below them."""
    if dense:
        return sorted({channels, *range(FINE_STEP, channels, FINE_STEP)}, reverse=True)
    half = max(block, round(channels / 2 / block) * block)
    return [channels] if half >= channels else [channels, half]


def timed_densely(shape: LayerShape, block: int) -> bool:
    """Whether ``shape`` is timed at every ``FINE_STEP`` (see ``DENSE_BLOCKS``)."""
    widest = max(shape.in_channels, shape.out_channels)
    return block > FINE_STEP and widest <= DENSE_BLOCKS * block


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "latency.json"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnxcompress" / "latency.json"


class LatencyCache:
    """Measured layer times (ms) on disk, by target key and point key."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else default_cache_path()
        self._entries: dict[str, dict[str, float]] = {}
        self._dirty = False
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.path.read_text())
            if data.get("version") == CACHE_VERSION and isinstance(data.get("entries"), dict):
                self._entries = data["entries"]

    def get(self, target: str, point: str) -> float | None:
        value = self._entries.get(target, {}).get(point)
        return float(value) if isinstance(value, (int, float)) else None

    def put(self, target: str, point: str, ms: float) -> None:
        self._entries.setdefault(target, {})[point] = float(ms)
        self._dirty = True

    def save(self) -> None:
        """Write the cache atomically; a cache folder that cannot be written is only logged
        (the times are still used for this run)."""
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(fd, "w") as handle:
                json.dump({"version": CACHE_VERSION, "entries": self._entries}, handle)
            publish(tmp, self.path)
            self._dirty = False
        except OSError as exc:
            logger.warning("latency cache %s not written: %s", self.path, exc)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def median_ms(run: Callable[[], Any]) -> float:
    """Median wall time of ``run`` in ms, after warm-up (see ``MIN_RUNS`` and friends)."""
    for _ in range(WARMUP_RUNS):
        run()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < MAX_RUNS and (
        len(times) < MIN_RUNS or time.perf_counter() - started < MIN_SECONDS
    ):
        tic = time.perf_counter()
        run()
        times.append(time.perf_counter() - tic)
    return float(np.median(times)) * 1e3


def time_layer(shape: LayerShape, target: LatencyTarget) -> float:
    """Median latency (ms) of ``shape`` alone, on ``target``."""
    from onnxcompress.runtime import session as runtime

    session = runtime.make_session(
        shape.model_bytes(target.batch), provider=target.provider, threads=target.threads
    )
    x = np.random.default_rng(0).standard_normal(
        (target.batch, shape.in_channels, *shape.spatial), dtype=np.float32
    )
    return median_ms(lambda: session.run(None, {"x": x}))


def _batched(
    shapes: Mapping[str, tuple[int, ...]] | None, target: LatencyTarget
) -> dict[str, tuple[int, ...]] | None:
    if not shapes:
        return None
    return {name: (target.batch, *dims[1:]) for name, dims in shapes.items()}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

LayerTimer = Callable[[LayerShape], float]
ModelTimer = Callable[[ir.Model], float]


@dataclasses.dataclass
class LatencyModel:
    """Predicted latency of a network as its convs' widths change.

    The prediction is ``rest_ms + scale * sum(curve(widths))``. Timed alone, a conv pays for
    things it shares or skips inside the whole graph (the call into the runtime, layout
    reorders, an activation ONNX Runtime fuses), so the sum of the curves is not the
    network's time. At first the curves are scaled to the measured whole-model latency
    (``rest_ms`` is what the whole takes beyond them, when it takes longer); once a cut model
    has been measured, :meth:`calibrate` fits ``scale`` and ``rest_ms`` through both points.
    On ResNet-20 (AVX-512, measured) the first guess predicted 0.664 and 0.626 of the
    original for a model that measured 0.691 and 0.647 at batch 1 and 32.

    Attributes:
        curves: each modelled conv's cost curve (ms by input and output width), by node.
        original_ms: the whole network's measured latency when the model was built.
        covered_ms: the curves' sum at the original widths.
        scale / rest_ms: the affine map from the curves' sum to the network's latency.
        block: channels per vector block of the target.
        measured / cached: layer points timed now, and read from the cache.
        seconds: wall time spent building the model.
    """

    curves: dict[ir.Node, CostCurve]
    original_ms: float
    covered_ms: float
    scale: float
    rest_ms: float
    block: int
    measured: int = 0
    cached: int = 0
    seconds: float = 0.0
    calibrations: list[dict[str, float]] = dataclasses.field(default_factory=list)

    @classmethod
    def build(
        cls,
        model: ir.Model,
        target: LatencyTarget,
        *,
        cache: LatencyCache | None = None,
        layer_timer: LayerTimer | None = None,
        model_timer: ModelTimer | None = None,
        block: int | None = None,
        progress: bool = False,
    ) -> LatencyModel:
        """Time ``model``'s convs (or read them from the cache) and fit one curve each.

        Args:
            layer_timer / model_timer: replace the ONNX Runtime timings (tests, or a target
                this machine cannot run); the cache is used only with the real timers.
            block: channels per vector block (default: the target's).
        """
        started = time.perf_counter()
        block = block or target.block()
        real = layer_timer is None
        cache = cache if cache is not None or not real else LatencyCache()
        target_key = target.cache_key() if real else "synthetic"
        shapes = conv_shapes(model)
        curves: dict[ir.Node, CostCurve] = {}
        memo: dict[LayerShape, CostCurve] = {}
        measured = cached = 0
        timer = layer_timer or (lambda shape: time_layer(shape, target))
        with _progress_bar(len(shapes), progress) as bar:
            for node, shape in shapes.items():
                bar.update(1)
                if shape in memo:
                    curves[node] = memo[shape]
                    continue
                points = []
                for point in _points(shape, block):
                    ms = cache.get(target_key, point.key()) if cache is not None else None
                    if ms is None:
                        ms = timer(point)
                        measured += 1
                        if cache is not None:
                            cache.put(target_key, point.key(), ms)
                    else:
                        cached += 1
                    points.append((point.in_channels, point.out_channels, ms))
                memo[shape] = curves[node] = CostCurve.fit(
                    points, block, shape.depthwise, keep_table=timed_densely(shape, block)
                )
        if cache is not None:
            cache.save()
        if model_timer is not None:
            whole = model_timer(model)
        else:
            from onnxcompress.graph.input_shapes import counted_at

            whole = InterleavedTimer(model, target, overrides=counted_at(model)).reference_ms()
        covered = sum(curves[node](*conv_widths(node)[:2]) for node in curves)
        scale = min(1.0, whole / covered) if covered > 0 else 1.0
        result = cls(
            curves,
            original_ms=whole,
            covered_ms=covered,
            scale=scale,
            rest_ms=max(whole - scale * covered, 0.0),
            block=block,
            measured=measured,
            cached=cached,
            seconds=time.perf_counter() - started,
        )
        logger.info(
            "latency model: %d convs, %d points timed, %d cached, whole model %.3f ms (convs "
            "%.3f ms timed alone) in %.1f s",
            len(curves),
            measured,
            cached,
            whole,
            covered,
            result.seconds,
        )
        return result

    def convs_ms(self) -> float:
        """The curves' sum at the convs' current widths (unscaled)."""
        return sum(curve(*conv_widths(node)[:2]) for node, curve in self.curves.items())

    def predicted_ms(self) -> float:
        """The network's predicted latency at its convs' current widths."""
        return self.rest_ms + self.scale * self.convs_ms()

    def calibrate(self, measured_ms: float) -> None:
        """Refit ``scale`` and ``rest_ms`` through the original and the model as it is now,
        measured at ``measured_ms``. A cut too small to see (or timing noise that says the
        cut model is slower) leaves the map as it was."""
        now = self.convs_ms()
        predicted_saving = self.covered_ms - now
        saving = self.original_ms - measured_ms
        entry = {"predicted_ms": self.predicted_ms(), "measured_ms": measured_ms}
        if predicted_saving > 0 and saving > 0:
            # Bounded: one noisy measurement must not make the next plan absurd.
            self.scale = float(np.clip(saving / predicted_saving, 0.2, 5.0))
            self.rest_ms = self.original_ms - self.scale * self.covered_ms
        entry["scale"] = self.scale
        self.calibrations.append(entry)

    def as_dict(self) -> dict[str, Any]:
        return {
            "block": self.block,
            "convs": len(self.curves),
            "original_ms": self.original_ms,
            "convs_alone_ms": self.covered_ms,
            "scale": self.scale,
            "rest_ms": self.rest_ms,
            "points_measured": self.measured,
            "points_cached": self.cached,
            "seconds": round(self.seconds, 2),
            "calibrations": self.calibrations,
        }


def _points(shape: LayerShape, block: int) -> list[LayerShape]:
    dense = timed_densely(shape, block)
    if shape.depthwise:
        return [shape.at(c, c) for c in width_levels(shape.out_channels, block, dense)]
    return [
        shape.at(cin, cout)
        for cin in width_levels(shape.in_channels, block, dense)
        for cout in width_levels(shape.out_channels, block, dense)
    ]


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc="latency model", unit="conv", disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


class InterleavedTimer:
    """Times candidates against a fixed reference, their runs interleaved so that drift in the
    machine's speed hits both; the ratio of the medians is what a latency target reads.

    The one interleaved timing loop: ``target_latency`` times every round with it, and the
    pipeline's budget meter (``pipeline.budget.LatencyMeter``) with a fixed number of runs.

    Args:
        reference: the model every candidate is timed against (a session is built once).
        warmup: untimed runs of each model first.
        min_runs / max_runs: timed runs of each model: at least ``min_runs``, then more until
            ``min_seconds`` have passed, at most ``max_runs``.
        overrides: full input shapes for inputs with symbolic dims besides the batch (their
            first dim becomes the target's batch).
        seed: seed of the random inputs.
    """

    def __init__(
        self,
        reference: ir.Model,
        target: LatencyTarget,
        *,
        warmup: int = WARMUP_RUNS,
        min_runs: int = 7,
        max_runs: int = 4 * MAX_RUNS,
        min_seconds: float = 2 * MIN_SECONDS,
        overrides: Mapping[str, tuple[int, ...]] | None = None,
        seed: int = 0,
    ) -> None:
        from onnxcompress.runtime import session as runtime

        self.target = target
        self.warmup, self.min_runs, self.max_runs = warmup, min_runs, max(max_runs, min_runs)
        self.min_seconds = min_seconds
        self._reference = runtime.make_session(
            reference, provider=target.provider, threads=target.threads
        )
        self._feeds = runtime.random_feeds(
            self._reference, target.batch, seed=seed, overrides=_batched(overrides, target)
        )

    def reference_ms(self) -> float:
        """Median latency (ms) of the reference alone (see ``median_ms``)."""
        return median_ms(lambda: self._reference.run(None, self._feeds))

    def medians(self, candidate: ir.Model) -> tuple[float, float]:
        """Median latency (ms) of the reference and of ``candidate``, runs interleaved."""
        from onnxcompress.runtime import session as runtime

        session = runtime.make_session(
            candidate, provider=self.target.provider, threads=self.target.threads
        )
        pairs = [(self._reference, self._feeds), (session, self._rekey(session))]
        for _ in range(self.warmup):
            for sess, feed in pairs:
                sess.run(None, feed)
        times: list[list[float]] = [[], []]
        started = time.perf_counter()
        while len(times[0]) < self.max_runs and (
            len(times[0]) < self.min_runs or time.perf_counter() - started < self.min_seconds
        ):
            for index, (sess, feed) in enumerate(pairs):
                tic = time.perf_counter()
                sess.run(None, feed)
                times[index].append(time.perf_counter() - tic)
        reference, candidate_ms = (float(np.median(row)) * 1e3 for row in times)
        return reference, candidate_ms

    def ratio(self, candidate: ir.Model) -> float:
        """Median latency of ``candidate`` over the reference's, interleaved."""
        reference, candidate_ms = self.medians(candidate)
        return candidate_ms / reference if reference > 0 else 1.0

    def _rekey(self, session: Any) -> dict[str, Any]:
        # Passes keep input names; by position covers a tool that renamed them.
        names = [i.name for i in session.get_inputs()]
        if set(names) == set(self._feeds):
            return dict(self._feeds)
        return dict(zip(names, self._feeds.values(), strict=False))


__all__ = [
    "InterleavedTimer",
    "LatencyCache",
    "LatencyModel",
    "LatencyTarget",
    "LayerShape",
    "conv_shapes",
    "conv_widths",
    "default_cache_path",
    "time_layer",
    "width_levels",
]
