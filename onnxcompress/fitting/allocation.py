"""Share a global budget (MACs or params) among channel groups.

Each group offers a removal path: channels in the order it would drop them, each with a cost
(estimated output change, comparable across groups). The allocator takes the removal that is
cheapest per MAC (or parameter) saved, anywhere in the network, until the savings reach the
goal. Savings per channel are estimated from current shapes; because cutting two neighbouring
layers saves less than the sum of cutting each (their shared Conv shrinks once), callers run
it in rounds against the measured total until the target is met.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GroupPath:
    """One group's offer: remove ``order[:n]`` for the first ``n`` costs.

    Attributes:
        key: identifies the group for the caller.
        size: channels the group has now.
        costs: cost of each successive removal (non-negative).
        saving: what each removed channel saves in the unit the budget counts (MACs, params
            or milliseconds); channels are ranked by cost per saving unless ``worth_curve``.
        min_keep: the group never goes below this many channels.
        multiple: this group's ``round_to``, if not the one ``allocate`` is given.
        worth_curve: what the first ``n`` removals are worth together, for ``n = 0..``, when
            channels are not worth the same along the path. Priced by latency, a channel saves
            time only where the layer's width crosses a vector block, so a chunk that crosses
            none is worth nothing by itself: a chunk is then ranked by the best cost per worth
            of taking it together with the chunks after it up to a point that pays.
    """

    key: int
    size: int
    costs: Sequence[float]
    saving: float
    min_keep: int = 1
    multiple: int | None = None
    worth_curve: Sequence[float] | None = None


def allocate(
    paths: Sequence[GroupPath],
    needed: float,
    *,
    round_to: int = 1,
    slack: float = float("inf"),
    shortfall: float = 0.0,
    exact: Callable[[Mapping[int, int]], float] | None = None,
) -> dict[int, int]:
    """How many channels each group removes so that savings reach ``needed``.

    Costs along a path are made non-decreasing (running maximum), so a cheap removal that
    only becomes available after an expensive one is not taken out of order.

    Args:
        needed: savings to reach (MACs or params), from current shapes.
        round_to: keep channel counts at multiples of this (SIMD-friendly widths). Removals
            then come in chunks: first down to a multiple, then ``round_to`` at a time, each
            chunk priced by its most expensive channel. Groups of at most ``round_to``
            channels are left alone.
        shortfall: savings this far short of ``needed`` are enough (a tolerance below it).
        slack: how far past ``needed`` the savings may land. Beyond it, chunks are given back
            while the goal stays met, then while that lands closer to the goal (short of it).
        exact: the savings of a whole plan (``{key: channels removed}``), for instance
            ``ExactSavings``: cutting two neighbouring groups saves less than the sum of
            their per-channel estimates (their shared layer shrinks once), so the stopping and
            give-back decisions use it when given; the order of removals still follows the
            per-channel estimates.

    Returns:
        ``{key: number of channels to remove}`` (groups with 0 are omitted).
    """
    if needed <= 0:
        return {}
    heap: list[tuple[tuple[float, float], int, int]] = []
    chunks: dict[int, list[tuple[int, float]]] = {}  # key -> [(cumulative count, chunk cost)]
    by_key = {path.key: path for path in paths}
    for path in paths:
        limit = max(0, min(len(path.costs), path.size - path.min_keep))
        multiple = path.multiple or round_to
        too_narrow = multiple > 1 and path.size <= multiple
        if limit == 0 or path.saving <= 0 or too_narrow:
            continue
        costs = np.maximum.accumulate(np.asarray(path.costs[:limit], dtype=float))
        steps = chunk_ends(path.size, limit, multiple)
        if not steps:
            continue
        chunks[path.key] = [(end, float(costs[end - 1])) for end in steps]
        heapq.heappush(heap, (_priority(path, chunks[path.key], 0), path.key, 0))
    taken: dict[int, int] = {}  # key -> index of the last chunk taken

    def plan(state: Mapping[int, int]) -> dict[int, int]:
        return {key: chunks[key][index][0] for key, index in state.items() if index >= 0}

    def savings(state: Mapping[int, int]) -> float:
        if exact is not None:
            return exact(plan(state))
        return sum(
            _chunk_gain(chunks[key], i, by_key[key].saving)
            for key, index in state.items()
            for i in range(index + 1)
        )

    def without(key: int) -> dict[int, int]:
        return {**taken, key: taken[key] - 1}

    enough = needed - shortfall
    estimate = 0.0
    settled = False
    while heap and not settled:
        # The cheap running estimate leads; the exact count (when given) has the last word.
        if estimate >= enough and (exact is None or savings(taken) >= enough):
            break
        _, key, index = heap[0]
        if estimate + _chunk_gain(chunks[key], index, by_key[key].saving) > needed + slack:
            # The cheapest next chunk overshoots: another group's next chunk may land within
            # the slack (best: at least ``enough``; else short of it but within the slack,
            # which ends the search); the cheapest of those (per MAC) goes first instead.
            after = {entry: savings({**taken, entry[1]: entry[2]}) for entry in heap}
            preferred = [e for e, s in after.items() if enough <= s <= needed + slack]
            near = [e for e, s in after.items() if abs(s - needed) <= slack]
            if preferred or near:
                _, key, index = chosen = min(preferred or near)
                settled = not preferred
                heap.remove(chosen)
                heapq.heapify(heap)
            else:
                heapq.heappop(heap)
        else:
            heapq.heappop(heap)
        estimate += _chunk_gain(chunks[key], index, by_key[key].saving)
        taken[key] = index
        if index + 1 < len(chunks[key]):
            priority = _priority(by_key[key], chunks[key], index + 1)
            heapq.heappush(heap, (priority, key, index + 1))

    # Coarse chunks can land far from the goal. Give chunks back, one at a time, while that
    # lands better: within [enough, needed + slack] is best; then within the slack on either
    # side; then closer. An overshoot spends accuracy nobody asked to spend. Among equally good
    # give-backs the costliest chunk goes back (the cheap coarse chunk stays, fine ones go).
    def rank(state: Mapping[int, int]) -> tuple[int, float]:
        saved = savings(state)
        if enough <= saved <= needed + slack:
            return (0, 0.0)
        return (1 if abs(saved - needed) <= slack else 2, abs(saved - needed))

    current = rank(taken)
    while taken and current != (0, 0.0):
        best, _, key = min((rank(without(k)), -chunks[k][taken[k]][1], k) for k in taken)
        if best >= current:
            break
        taken, current = _shrunk(without(key)), best
    return plan(taken)


def _shrunk(state: Mapping[int, int]) -> dict[int, int]:
    """``state`` without the groups that no longer remove anything."""
    return {key: index for key, index in state.items() if index >= 0}


class ExactSavings:
    """MACs (or parameters) a whole removal plan saves, counted on the weights it shrinks.

    The MACs of a Conv, ConvTranspose, Gemm or MatMul are its weight's element count times how
    often each element is used per sample, so they scale with the product of the weight's axis
    lengths. A plan that removes channels from a group shortens every weight axis the group
    slices (by its channels times their multiplicity: ``H*W`` columns after a Flatten), and the
    saving of a weight sliced by two groups (a Conv between two pruned layers) is counted once.
    Parameters are the sliced weights' elements, biases included.
    """

    def __init__(
        self,
        groups: Sequence[Any],
        params: bool = False,
        factors: Mapping[Any, float] | None = None,
    ) -> None:
        """``factors`` replace the ``macs_factor`` of the nodes they name (MACs per weight
        element counted at the run's input shapes, where the model's own are symbolic)."""
        # weight -> [shape, factor, {axis: [(group key, positions per channel)]}]
        self._weights: dict[tuple[int, int], tuple[list[int], float, dict[int, list]]] = {}
        for group in groups:
            for ws in group.slices:
                if not params and (ws.is_bias or ws.macs_factor == 0):
                    continue
                # A weight two nodes share costs MACs in each, but its parameters once.
                key = (id(ws.value), 0) if params else (id(ws.node), ws.input_index)
                if key not in self._weights:
                    value = ws.value.const_value
                    shape = [int(d) for d in value.shape]
                    factor = float(ws.macs_factor)
                    if factors and ws.node in factors:
                        factor = float(factors[ws.node])
                    self._weights[key] = (shape, 1.0 if params else factor, {})
                cuts = self._weights[key][2].setdefault(ws.axis, [])
                entry = (group.id, group.multiplicity(ws.tensor))
                if entry not in cuts:  # the same axis seen through both of its readers
                    cuts.append(entry)

    def __call__(self, removed: Mapping[int, int]) -> float:
        total = 0.0
        for shape, factor, axes in self._weights.values():
            kept = 1.0
            hit = False
            for axis, length in enumerate(shape):
                cut = sum(removed.get(key, 0) * per for key, per in axes.get(axis, ()))
                hit = hit or cut > 0
                kept *= max(length - cut, 0)
            if hit:
                total += factor * (float(np.prod(shape)) - kept)
        return total


def _priority(path: GroupPath, ends: list[tuple[int, float]], index: int) -> tuple[float, float]:
    """The order chunk ``index`` is taken in: cost per unit of worth (lower first), then, for
    chunks worth nothing however far they go, cost per unit of saving (taken last, cheapest
    first, when the budget's unit still needs them)."""
    by_saving = ends[index][1] / path.saving
    if path.worth_curve is None:
        return (by_saving, 0.0)
    curve = path.worth_curve
    start = ends[index - 1][0] if index > 0 else 0
    best = float("inf")
    for end, cost in ends[index:]:
        if end >= len(curve):
            break
        gained = curve[end] - curve[start]
        if gained > 0:
            # The chunks up to ``end`` cost their most expensive channel (costs are running
            # maxima), and are worth ``gained`` over ``end - start`` channels.
            best = min(best, cost / (gained / (end - start)))
    return (best, by_saving if best == float("inf") else 0.0)


def _chunk_gain(ends: list[tuple[int, float]], index: int, saving: float) -> float:
    start = ends[index - 1][0] if index > 0 else 0
    return (ends[index][0] - start) * saving


def chunk_ends(size: int, limit: int, multiple: int) -> list[int]:
    """Cumulative removal counts a group may stop at, keeping widths at multiples."""
    if multiple <= 1:
        return list(range(1, limit + 1))
    ends = []
    end = size % multiple or multiple
    while end <= limit and size - end >= multiple:
        ends.append(end)
        end += multiple
    return ends
