"""Global budget allocation across channel groups."""

from __future__ import annotations

import channel_models as cm
import numpy as np
import pytest

from onnxcompress.fitting.allocation import ExactSavings, GroupPath, allocate


def test_cheapest_per_mac_first() -> None:
    cheap_per_mac = GroupPath(key=0, size=10, costs=[1.0] * 9, saving=100.0)  # 0.01 per MAC
    dear_per_mac = GroupPath(key=1, size=10, costs=[0.5] * 9, saving=10.0)  # 0.05 per MAC
    assert allocate([cheap_per_mac, dear_per_mac], needed=300.0) == {0: 3}


def test_never_below_min_keep_and_stops_when_exhausted() -> None:
    path = GroupPath(key=0, size=4, costs=[0.1, 0.2, 0.3], saving=10.0, min_keep=2)
    assert allocate([path], needed=1e9) == {0: 2}


def test_costs_are_taken_in_path_order() -> None:
    """A cheap removal behind an expensive one is not taken first (running maximum)."""
    a = GroupPath(key=0, size=5, costs=[0.1, 5.0, 0.0, 0.0], saving=1.0)
    b = GroupPath(key=1, size=5, costs=[1.0, 1.0, 1.0, 1.0], saving=1.0)
    assert allocate([a, b], needed=3.0) == {0: 1, 1: 2}


def test_round_to_moves_in_chunks_and_leaves_small_groups() -> None:
    wide = GroupPath(key=0, size=20, costs=[0.01 * i for i in range(19)], saving=1.0)
    small = GroupPath(key=1, size=8, costs=[0.0] * 7, saving=1.0)
    result = allocate([wide, small], needed=5.0, round_to=8)
    assert result == {0: 12}  # 20 -> 8: first down to a multiple (4), then 8 at a time
    assert (20 - result[0]) % 8 == 0


def test_overshoot_is_trimmed_by_giving_back_chunks_the_goal_can_spare() -> None:
    fine = GroupPath(key=1, size=64, costs=[0.0] * 63, saving=1.0)  # chunks of 8 save 8
    coarse = GroupPath(key=0, size=16, costs=[0.01] * 15, saving=10.0)  # one chunk saves 80
    # greedy: all 7 fine chunks (56), then the coarse one (80): 136 saved for 100 needed
    assert allocate([coarse, fine], 100.0, round_to=8) == {1: 56, 0: 8}
    # with a slack of 5, fine chunks go back until 104 remain saved
    trimmed = allocate([coarse, fine], 100.0, round_to=8, slack=5.0)
    assert trimmed == {1: 24, 0: 8}
    assert 100.0 <= 10.0 * trimmed[0] + trimmed[1] <= 105.0


def test_nothing_needed_nothing_taken() -> None:
    assert allocate([GroupPath(0, 8, [0.0] * 7, 1.0)], needed=0.0) == {}


def test_a_chunk_that_overshoots_past_the_slack_is_given_back_when_short_is_closer() -> None:
    """One chunk saves 80 where 30 are needed: removing nothing (30 short) is closer than
    removing it (50 over), so the allocator gives it back; the caller says it missed."""
    coarse = GroupPath(key=0, size=16, costs=[0.01] * 15, saving=10.0)
    assert allocate([coarse], 30.0, round_to=8, slack=5.0) == {}
    # 60 needed: taking it (20 over) is closer than not (60 short).
    assert allocate([coarse], 60.0, round_to=8, slack=5.0) == {0: 8}


def test_exact_savings_decide_where_per_channel_estimates_double_count() -> None:
    """Two groups whose channels share one weight: each estimate counts the shared weight's
    crossing elements, so the sum overstates the plan; the exact count says it falls short."""

    def exact(plan: dict[int, int]) -> float:  # a 10x10 weight: rows and columns of a and b
        return 100.0 - (10 - plan.get(0, 0)) * (10 - plan.get(1, 0))

    a_first = GroupPath(key=0, size=10, costs=[0.0] * 5 + [1.0] * 4, saving=10.0)
    b_next = GroupPath(key=1, size=10, costs=[0.5] * 9, saving=10.0)
    # Estimates: a's 5 cheap rows, then b's columns (cost 0.5 < 1.0): 5 + 1 reach 60.
    assert allocate([a_first, b_next], 60.0) == {0: 5, 1: 1}
    # Exactly, 5 rows and 1 column save 100 - 5 * 9 = 55: one more column is needed (60).
    plan = allocate([a_first, b_next], 60.0, exact=exact)
    assert plan == {0: 5, 1: 2} and exact(plan) == 60.0


@pytest.mark.parametrize("name", sorted(cm.BUILDERS))
def test_exact_savings_equal_the_measured_macs_and_params_of_a_cut(name: str) -> None:
    from onnxcompress.graph.channels import analyze_channels
    from onnxcompress.graph.metrics import model_metrics
    from onnxcompress.graph.surgery import remove_channels

    model = cm.BUILDERS[name]()
    analysis = analyze_channels(model)
    groups = [g for g in analysis.prunable if g.size > 1]
    if not groups:
        pytest.skip(f"{name} has no prunable group wider than one channel")
    macs, params = ExactSavings(groups), ExactSavings(groups, params=True)
    before = model_metrics(model)
    rng = np.random.default_rng(0)
    plan = {g.id: int(rng.integers(1, g.size)) for g in groups}
    predicted = (macs(plan), params(plan))
    for group in groups:
        remove_channels(model, group, list(range(plan[group.id])))
    after = model_metrics(model)
    assert predicted[0] == before.macs - after.macs
    if name == "shared_weights":
        # Surgery copies a tied weight before slicing it for one reader, so the cut model
        # holds two copies: fewer parameters saved than the plan's count of one.
        assert predicted[1] > before.params - after.params
    else:
        assert predicted[1] == before.params - after.params
