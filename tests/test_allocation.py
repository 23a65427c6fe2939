"""Global budget allocation across channel groups."""

from __future__ import annotations

from onnxcompress.allocation import GroupPath, allocate


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
