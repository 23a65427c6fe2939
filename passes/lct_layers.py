"""Candidate layers of the ``lct`` pass and their targets: the zeros below one global magnitude
threshold (sparse), or ranks from one spectral-energy threshold or a per-layer energy (lowrank).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import heapq
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.edits import private_initializer
from onnxcompress.graph.factorization import (
    break_even_rank,
    factorizable_reason,
    rank_cost,
    weight_matrix,
)
from onnxcompress.graph.op_families import DEFAULT_DOMAINS

if TYPE_CHECKING:
    from onnxcompress.passes.base import PassReport
    from onnxcompress.passes.lct import LctConfig

SPARSE_OPS = ("Conv", "Gemm", "MatMul")
# Bisection steps on the log of the global spectral-energy threshold (lowrank by budget).
THRESHOLD_STEPS = 60


@dataclasses.dataclass
class Layer:
    """A candidate layer and its target.

    Attributes:
        node: the node's name.
        op: its op type.
        weight: the weight initializer's name.
        shape: the weight's shape.
        target_zeros: sparse: weights set to zero at the target.
        rank: lowrank: the target rank; full_rank: the weight matrix's full rank.
        macs / target_macs: the node's MACs now and once factorized at ``rank``.
        significance: the layer's place in the ranking (0: least significant).
        sensitivity: measured top-1 drop with this layer alone at its target.
        stage: the stage that collapses it.
        level: the accepted fraction of the way to the target (0: dense, 1: at the target);
            back-offs leave a layer part of the way.
        zeros: sparse: zeros measured in the written weight.
        trans_b: Gemm: whether the weight is stored (N, K).
        break_even: lowrank: the largest rank (a multiple of ``multiple``) that saves at least
            ``min_saving`` of the layer's MACs once factorized (0: none).
        multiple: lowrank: ranks below the full rank are multiples of this.
        rank_cost / positions: lowrank: MACs per rank and output position, and the positions.
    """

    node: str
    op: str
    weight: str
    shape: tuple[int, ...]
    target_zeros: int = 0
    rank: int = 0
    full_rank: int = 0
    macs: int = 0
    target_macs: int = 0
    significance: int = 0
    sensitivity: float | None = None
    stage: int = 0
    level: float = 0.0
    zeros: int = 0
    trans_b: bool = True
    break_even: int = 0
    rank_cost: int = 0
    positions: int = 1
    multiple: int = 1

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def target_sparsity(self) -> float:
        return self.target_zeros / max(self.elements, 1)

    @property
    def accepted(self) -> bool:
        """Whether the layer ended collapsed (at least part of the way)."""
        return self.count_at(self.level) != self.count_at(0.0)

    def count_at(self, level: float) -> int:
        """The constraint at ``level``: zeros (sparse) or the rank (lowrank).

        A partial rank cut starts at the break-even rank, not at the full rank, so every level
        above 0 saves MACs once factorized, in proportion to the level (MACs are linear in the
        rank).
        """
        level = min(1.0, max(0.0, level))
        if self.full_rank:
            if level <= 0.0:
                return self.full_rank
            top = max(self.rank, min(self.break_even, self.full_rank))
            rank = top - round(level * (top - self.rank))
            # Up to the block multiple: a backed-off level cuts less, never more, and stays at
            # or below ``top`` (itself a multiple, as is the target).
            return min(top, -(-rank // self.multiple) * self.multiple)
        return round(level * self.target_zeros)

    def macs_at(self, level: float) -> int:
        """lowrank: the node's MACs with the rank at ``level`` (factorized when it is cut)."""
        return self.macs_at_rank(self.count_at(level))

    def macs_at_rank(self, rank: int) -> int:
        """lowrank: the node's MACs at ``rank``: factorized below the full rank, else dense."""
        if rank >= self.full_rank:
            return self.macs
        return rank * self.rank_cost * self.positions

    @property
    def compression(self) -> float:
        """Share of the layer removed at the target: zeros, or MACs saved by the rank."""
        if self.full_rank:
            return 1.0 - self.target_macs / max(self.macs, 1)
        return self.target_sparsity


def find_candidates(
    model: ir.Model, report: PassReport, lowrank: bool, exclude: Sequence[str]
) -> list[Layer]:
    """The Conv, Gemm and MatMul nodes whose weight may collapse; the others are declined, with
    why (``exclude``: node-name patterns the user keeps dense)."""
    graph = model.graph
    layers: list[Layer] = []
    for index, node in enumerate(list(graph)):
        if node.op_type not in SPARSE_OPS or node.domain not in DEFAULT_DOMAINS:
            continue
        label = node.name or f"{node.op_type}_{index}"
        if not node.name:
            node.name = label
        pattern = next((p for p in exclude if fnmatch.fnmatchcase(label, p)), None)
        if pattern is not None:
            report.decline(label, f"excluded by the user (exclude={pattern})")
            continue
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if weight is None or weight.const_value is None:
            report.decline(label, "its weight is computed, not an initializer")
            continue
        if weight.name in {v.name for v in graph.inputs}:
            report.decline(label, "its weight is also a graph input (the user may feed it)")
            continue
        if not weight.const_value.dtype.is_floating_point():
            report.decline(label, f"its weight is {weight.const_value.dtype}, not float")
            continue
        if lowrank:
            reason = factorizable_reason(node)
            if reason is not None:
                report.decline(label, reason)
                continue
        elif len(weight.const_value.shape) < 2:
            report.decline(label, "its weight is a vector")
            continue
        value = private_initializer(graph, node, 1)
        assert value.name is not None and value.const_value is not None
        shape = tuple(int(d) for d in value.const_value.shape.numpy())
        layer = Layer(label, node.op_type, value.name, shape)
        if node.op_type == "Gemm":
            attr = node.attributes.get("transB")
            layer.trans_b = attr is not None and attr.as_int() != 0
        layers.append(layer)
    return layers


def allocate_sparsity(
    model: ir.Model, layers: list[Layer], cfg: LctConfig, sparsity: float
) -> None:
    """One global magnitude threshold at ``sparsity``; each layer's zeros below it are its
    target."""
    zeros = _GlobalThreshold(model, layers, cfg.max_layer_sparsity).zeros(sparsity)
    for layer, count in zip(layers, zeros, strict=True):
        layer.target_zeros = count


# Planning a file size aims this much under the target: the decoders' sizes are estimates.
FILE_MARGIN = 0.03


def sparsity_for_file(
    model: ir.Model, layers: list[Layer], cfg: LctConfig, bytes_before: int, target_file: float
) -> tuple[float, float]:
    """The lowest global sparsity whose compactly stored model (``cfg.values``) is predicted at
    or under ``target_file`` of ``bytes_before`` (less ``FILE_MARGIN``), and that prediction as
    a fraction; at ``max_layer_sparsity`` everywhere when no sparsity reaches it.

    The file, not the sparsity, is what a user of ``values=int8`` asks for: aiming the ramp at
    the default 0.9 when about 0.6 makes the file 5x smaller spends the training budget on
    zeros nobody asked for (ResNet-20, 15 minutes: the ramp stalled at 31% of the way).
    """
    from onnxcompress.graph.sparse_storage import predicted_stored_bytes

    allocation = _GlobalThreshold(model, layers, cfg.max_layer_sparsity)
    elements = [math.prod(layer.shape) for layer in layers]

    def predicted(sparsity: float) -> float:
        total = bytes_before
        for layer, zeros, size in zip(layers, allocation.zeros(sparsity), elements, strict=True):
            if zeros > 0:
                stored = predicted_stored_bytes(layer.shape, size - zeros, cfg.values)
                total += stored - 4 * size  # a float32 weight becomes its stored form
        return total / bytes_before

    def lowest(goal: float) -> float:
        low, high = 0.0, cfg.max_layer_sparsity
        if predicted(high) > goal:
            return high
        for _ in range(40):  # the file shrinks as the sparsity grows: bisect
            middle = 0.5 * (low + high)
            if predicted(middle) <= goal:
                high = middle
            else:
                low = middle
        return high

    goal = target_file * (1.0 - FILE_MARGIN)
    sparsity = lowest(goal)
    # The formulas know the encodings' bytes but not the decoders' nodes and names (700 to
    # 1,200 bytes a tensor, measured on ResNet-20): store a copy at the plan once, and aim
    # again by what they missed.
    missed = _stored_fraction(model, layers, allocation.zeros(sparsity), cfg, bytes_before)
    missed -= predicted(sparsity)
    if missed > 0:
        sparsity = lowest(goal - missed)
    return sparsity, predicted(sparsity) + max(missed, 0.0)


def _stored_fraction(
    model: ir.Model, layers: list[Layer], zeros: Sequence[int], cfg: LctConfig, bytes_before: int
) -> float:
    """The file, as a fraction of ``bytes_before``, of a copy of ``model`` whose layers have
    their ``zeros`` smallest weights at zero, stored as ``lct`` stores them."""
    from onnxcompress.graph.model_io import clone_model, model_to_bytes
    from onnxcompress.graph.sparse_storage import store_sparse

    copy = clone_model(model)
    names = []
    for layer, count in zip(layers, zeros, strict=True):
        if count <= 0:
            continue
        value = copy.graph.initializers[layer.weight]
        assert value.const_value is not None
        weight = value.const_value.numpy().copy()
        flat = weight.reshape(-1)
        flat[np.argsort(np.abs(flat), kind="stable")[:count]] = 0.0
        value.const_value = ir.tensor(weight)
        names.append(layer.weight)
    store_sparse(copy, names, values=cfg.values)
    return len(model_to_bytes(copy)) / bytes_before


class _GlobalThreshold:
    """Zeros per layer under one global magnitude threshold, for any global sparsity."""

    def __init__(self, model: ir.Model, layers: list[Layer], max_layer_sparsity: float) -> None:
        # Each layer's magnitudes sorted, so its count below a threshold is a binary search.
        self.per_layer = [
            np.sort(np.abs(layer_weight(model, layer)).reshape(-1)) for layer in layers
        ]
        self.everything = np.sort(np.concatenate(self.per_layer))
        self.caps = [math.floor(max_layer_sparsity * m.size) for m in self.per_layer]

    def zeros(self, sparsity: float) -> list[int]:
        count = round(sparsity * self.everything.size)
        threshold = self.everything[count - 1] if count > 0 else -np.inf
        return [
            min(int(np.searchsorted(mags, threshold, side="right")), cap)
            for mags, cap in zip(self.per_layer, self.caps, strict=True)
        ]


def allocate_ranks(
    model: ir.Model,
    layers: list[Layer],
    report: PassReport,
    macs_before: int,
    cfg: LctConfig,
    second_moments: Mapping[str, np.ndarray] | None = None,
) -> list[Layer]:
    """Set every layer's target ``rank`` (see ``_allocate_ranks``); returns the layers it cuts
    (a rank below the full one, at or under the break-even rank)."""
    _allocate_ranks(model, layers, report, macs_before, cfg, second_moments)
    return [layer for layer in layers if 0 < layer.rank <= layer.break_even]


def _allocate_ranks(
    model: ir.Model,
    layers: list[Layer],
    report: PassReport,
    macs_before: int,
    cfg: LctConfig,
    second_moments: Mapping[str, np.ndarray] | None,
) -> None:
    """Ranks from a per-layer energy, or for ``target_macs`` from the spectra.

    Without ``second_moments`` the spectra are the weights' and one global threshold on each
    layer's share of its squared singular values picks the ranks. With them (each layer's
    input second moment ``E[z zᵀ]`` on calibration data, by node name) the spectra are the
    layers' responses (``fitting.lowrank.response_spectrum``) and the ranks are cut greedily,
    one block at a time, where the least output energy is lost per MAC saved: on ResNet-20
    CIFAR-10 at 0.6 of the MACs a data-fitted model kept 71.9 % top-1 with these ranks against
    49.0 % with the same threshold rule on the response spectra (``docs/methods/lct.md``).
    """
    from onnxcompress.fitting.lowrank import energy_rank, response_spectrum
    from onnxcompress.graph.input_shapes import at_counted_shapes

    graph = model.graph
    spectra: list[np.ndarray] = []
    # MACs and positions at the size the run counts them at (symbolic sizes would give 1x1).
    with at_counted_shapes(model):
        for layer in layers:
            _size_layer(model, graph.node(layer.node), layer, cfg, spectra)
    if second_moments is not None:
        spectra = [
            response_spectrum(
                weight_matrix(graph.node(layer.node), layer_weight(model, layer)),
                second_moments[layer.node],
            )
            for layer in layers
        ]

    def apply(ranks: Sequence[int]) -> int:
        saved = 0
        for layer, rank in zip(layers, ranks, strict=True):
            if rank <= layer.break_even:
                layer.rank = rank
                layer.target_macs = layer.macs_at_rank(rank)
            else:
                layer.rank, layer.target_macs = layer.full_rank, layer.macs
            saved += layer.macs - layer.target_macs
        return macs_before - saved

    if cfg.energy is not None:
        apply(
            [
                _round_rank(energy_rank(s, cfg.energy), layer)
                for s, layer in zip(spectra, layers, strict=True)
            ]
        )
        return
    assert cfg.target_macs is not None
    goal = cfg.target_macs * macs_before
    if second_moments is not None:
        ranks = _greedy_ranks(layers, spectra, macs_before - goal)
        if apply(ranks) > goal:
            report.summary["budget_note"] = (
                f"target_macs={cfg.target_macs} is out of reach by factorization alone; every "
                "candidate layer is cut as far as it may be"
            )
        return
    shares = [s**2 / max(float((s**2).sum()), 1e-30) for s in spectra]

    def ranks_at(log_threshold: float) -> list[int]:
        threshold = math.exp(log_threshold)
        counts = [max(1, int(np.count_nonzero(share >= threshold))) for share in shares]
        return [_round_rank(c, layer) for c, layer in zip(counts, layers, strict=True)]

    low, high = math.log(1e-12), 0.0
    if apply(ranks_at(high)) > goal:
        report.summary["budget_note"] = (
            f"target_macs={cfg.target_macs} is out of reach by factorization alone; every "
            "candidate layer goes to rank 1"
        )
        return
    for _ in range(THRESHOLD_STEPS):
        middle = 0.5 * (low + high)
        if apply(ranks_at(middle)) > goal:
            low = middle
        else:
            high = middle
    apply(ranks_at(high))


def _greedy_ranks(
    layers: Sequence[Layer], spectra: Sequence[np.ndarray], needed: float
) -> list[int]:
    """Ranks that save at least ``needed`` MACs (or all that can be saved), cut one step at a
    time where the least relative energy is lost per MAC saved.

    A layer's first cut goes from its full rank to its break-even rank (a factorization cheaper
    than that saves too little to be worth two nodes); each later cut removes one block of
    ``multiple`` ranks, down to one block.
    """
    ranks = [layer.full_rank for layer in layers]
    energies = [np.asarray(s, np.float64) ** 2 for s in spectra]
    totals = [max(float(e.sum()), 1e-30) for e in energies]

    def next_cut(index: int) -> tuple[int, float, float] | None:
        layer, rank = layers[index], ranks[index]
        lower = layer.break_even if rank >= layer.full_rank else rank - layer.multiple
        if lower < max(1, layer.multiple) or layer.break_even <= 0:
            return None
        saved = layer.macs_at_rank(rank) - layer.macs_at_rank(lower)
        lost = float(energies[index][lower:rank].sum()) / totals[index]
        return lower, saved, lost

    # Each layer's next cut in a heap by price; only the layer just cut needs a new price.
    heap: list[tuple[float, int, int, float]] = []

    def push(index: int) -> None:
        cut = next_cut(index)
        if cut is not None and cut[1] > 0:
            lower, saved, lost = cut
            heapq.heappush(heap, (lost / saved, index, lower, saved))

    for index in range(len(layers)):
        push(index)
    saved_so_far = 0.0
    while saved_so_far < needed and heap:
        _, index, lower, saved = heapq.heappop(heap)
        ranks[index] = lower
        saved_so_far += saved
        push(index)
    return ranks


def _round_rank(rank: int, layer: Layer) -> int:
    """``rank`` to the nearest multiple of the layer's block (at least one block)."""
    if layer.multiple <= 1 or rank >= layer.full_rank:
        return rank
    rounded = max(layer.multiple, layer.multiple * round(rank / layer.multiple))
    return min(rounded, layer.full_rank)


def layer_weight(model: ir.Model, layer: Layer) -> np.ndarray:
    """The layer's weight as it stands in ``model``."""
    value = model.graph.initializers[layer.weight]
    assert value.const_value is not None
    return value.const_value.numpy()


def _size_layer(
    model: ir.Model, node: ir.Node, layer: Layer, cfg: LctConfig, spectra: list[np.ndarray]
) -> None:
    """One layer's spectrum, MACs, cost per rank and the largest rank worth factorizing."""
    from onnxcompress.graph.metrics import node_macs

    matrix = weight_matrix(node, layer_weight(model, layer))
    singular = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    spectra.append(singular)
    layer.full_rank = int(singular.size)
    layer.macs = node_macs(node)
    dense_cost = rank_cost(node, layer.shape, None)
    layer.positions = max(1, layer.macs // max(dense_cost, 1))
    layer.rank_cost = rank_cost(node, layer.shape, 1)
    layer.multiple = cfg.round_to if layer.full_rank > cfg.round_to else 1
    # The largest rank worth factorizing: it saves at least min_saving of the MACs.
    worth = math.floor(
        (1.0 - cfg.min_saving) * layer.macs / max(layer.rank_cost * layer.positions, 1)
    )
    limit = min(break_even_rank(node, layer.shape), worth)
    layer.break_even = max(0, limit - limit % layer.multiple)
