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
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class GroupPath:
    """One group's offer: remove ``order[:n]`` for the first ``n`` costs.

    Attributes:
        key: identifies the group for the caller.
        size: channels the group has now.
        costs: cost of each successive removal (non-negative).
        saving: MACs (or params) saved by each removed channel.
        min_keep: the group never goes below this many channels.
    """

    key: int
    size: int
    costs: Sequence[float]
    saving: float
    min_keep: int = 1


def allocate(
    paths: Sequence[GroupPath],
    needed: float,
    *,
    round_to: int = 1,
    slack: float = float("inf"),
) -> dict[int, int]:
    """How many channels each group removes so that estimated savings reach ``needed``.

    Costs along a path are made non-decreasing (running maximum), so a cheap removal that
    only becomes available after an expensive one is not taken out of order.

    Args:
        needed: savings to reach (MACs or params), from current shapes.
        round_to: keep channel counts at multiples of this (SIMD-friendly widths). Removals
            then come in chunks: first down to a multiple, then ``round_to`` at a time, each
            chunk priced by its most expensive channel. Groups of at most ``round_to``
            channels are left alone.

    Returns:
        ``{key: number of channels to remove}`` (groups with 0 are omitted).
    """
    if needed <= 0:
        return {}
    heap: list[tuple[float, int, int]] = []
    chunks: dict[int, list[tuple[int, float]]] = {}  # key -> [(cumulative count, chunk cost)]
    by_key = {path.key: path for path in paths}
    for path in paths:
        limit = max(0, min(len(path.costs), path.size - path.min_keep))
        if limit == 0 or path.saving <= 0 or (round_to > 1 and path.size <= round_to):
            continue
        costs = np.maximum.accumulate(np.asarray(path.costs[:limit], dtype=float))
        steps = _chunk_ends(path.size, limit, round_to)
        if not steps:
            continue
        chunks[path.key] = [(end, float(costs[end - 1])) for end in steps]
        first_cost = chunks[path.key][0][1]
        heapq.heappush(heap, (first_cost / path.saving, path.key, 0))
    taken: dict[int, int] = {}  # key -> index of the last chunk taken
    saved = 0.0
    while heap and saved < needed:
        _, key, index = heapq.heappop(heap)
        saved += _chunk_gain(chunks[key], index, by_key[key].saving)
        taken[key] = index
        if index + 1 < len(chunks[key]):
            heapq.heappush(heap, (chunks[key][index + 1][1] / by_key[key].saving, key, index + 1))
    # Coarse chunks can overshoot the goal. Rather than skipping the cheap coarse chunk for an
    # expensive fine one, give back the costliest last chunks while the goal stays met.
    while saved > needed + slack:
        undo = [
            (chunks[key][index][1], key)
            for key, index in taken.items()
            if saved - _chunk_gain(chunks[key], index, by_key[key].saving) >= needed
        ]
        if not undo:
            break
        _, key = max(undo)
        saved -= _chunk_gain(chunks[key], taken[key], by_key[key].saving)
        if taken[key] == 0:
            del taken[key]
        else:
            taken[key] -= 1
    return {key: chunks[key][index][0] for key, index in taken.items()}


def _chunk_gain(ends: list[tuple[int, float]], index: int, saving: float) -> float:
    start = ends[index - 1][0] if index > 0 else 0
    return (ends[index][0] - start) * saving


def _chunk_ends(size: int, limit: int, multiple: int) -> list[int]:
    """Cumulative removal counts a group may stop at, keeping widths at multiples."""
    if multiple <= 1:
        return list(range(1, limit + 1))
    ends = []
    end = size % multiple or multiple
    while end <= limit and size - end >= multiple:
        ends.append(end)
        end += multiple
    return ends
