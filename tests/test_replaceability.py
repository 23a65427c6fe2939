"""The least-squares removal solver on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.fitting.replaceability import compensation, greedy_removal


def synthetic(samples: int = 800, free: int = 8, seed: int = 0):
    """Channels 0..free-1 independent; the last two are affine combinations of the first three."""
    rng = np.random.default_rng(seed)
    y = rng.standard_normal((samples, free))
    mix = rng.standard_normal((3, 2))
    y = np.concatenate([y, y[:, :3] @ mix + np.array([0.5, -1.0])], axis=1)
    outgoing = rng.standard_normal((y.shape[1], 6))
    augmented = np.concatenate([y, np.ones((samples, 1))], axis=1)
    return y, outgoing, augmented.T @ augmented


def test_dependent_channels_are_removed_first_at_zero_cost() -> None:
    _, outgoing, gram = synthetic()
    plan = greedy_removal(gram, outgoing @ outgoing.T, max_remove=4, intercept=True)
    assert len(plan.order) == 4
    # the two dependent directions cost nothing; independent channels cost clearly more
    # (up to the 1e-6 relative ridge term)
    assert plan.costs[0] < 1e-6 and plan.costs[1] < 1e-6
    assert min(plan.costs[2:]) > 1e-3
    # the first two removals span the dependency among channels {0, 1, 2, 8, 9}
    assert set(plan.order[:2]) <= {0, 1, 2, 8, 9}


def test_compensation_reproduces_outputs_exactly_for_dependent_channels() -> None:
    y, outgoing, gram = synthetic()
    plan = greedy_removal(gram, outgoing @ outgoing.T, max_remove=2, intercept=True)
    comp = compensation(gram, plan.order, channels=y.shape[1], intercept=True)
    assert comp.bias is not None
    folded = outgoing[comp.keep] + comp.matrix.T @ outgoing[comp.removed]
    constant = comp.bias @ outgoing[comp.removed]
    np.testing.assert_allclose(
        y[:, comp.keep] @ folded + constant, y @ outgoing, rtol=1e-4, atol=1e-4
    )
    assert np.all(comp.residual < 1e-8)


def test_removing_an_independent_channel_is_not_free() -> None:
    """Negative control: without a dependency the fit leaves a residual and outputs change."""
    rng = np.random.default_rng(3)
    y = rng.standard_normal((500, 6))
    outgoing = rng.standard_normal((6, 4))
    gram = y.T @ y
    comp = compensation(gram, [0], channels=6, intercept=False)
    assert comp.residual[0] > 0.5
    folded = outgoing[comp.keep] + comp.matrix.T @ outgoing[comp.removed]
    assert np.abs(y[:, comp.keep] @ folded - y @ outgoing).max() > 0.1


@pytest.mark.parametrize("step_fraction", [0.0, 0.1])
def test_plan_never_removes_the_last_channel(step_fraction: float) -> None:
    _, outgoing, gram = synthetic()
    plan = greedy_removal(
        gram, outgoing @ outgoing.T, max_remove=100, intercept=True, step_fraction=step_fraction
    )
    assert len(plan.order) == outgoing.shape[0] - 1
    assert len(set(plan.order)) == len(plan.order)
    assert all(0 <= c < outgoing.shape[0] for c in plan.order)


def test_sequential_greedy_equals_joint_fit() -> None:
    """Folding removals one at a time gives the joint least-squares fit on the final kept set."""
    rng = np.random.default_rng(5)
    y = rng.standard_normal((400, 7))
    y[:, 6] = y[:, 0] - 2 * y[:, 1] + 0.1 * rng.standard_normal(400)
    gram = y.T @ y
    removed = [6, 3]
    joint = compensation(gram, removed, channels=7, intercept=False, ridge=0.0)
    # sequential: fit 6 on all others, then 3 on the rest and substitute it into 6's fit
    first = compensation(gram, [6], channels=7, intercept=False, ridge=0.0)
    second = compensation(gram, [3], channels=7, intercept=False, ridge=0.0)
    keep_after_first = first.keep  # [0..5]
    coef6 = dict(zip(keep_after_first, first.matrix[0], strict=True))
    sub = compensation(
        gram[np.ix_(keep_after_first, keep_after_first)],
        [3],
        channels=6,
        intercept=False,
        ridge=0.0,
    )
    coef3 = dict(zip([keep_after_first[k] for k in sub.keep], sub.matrix[0], strict=True))
    combined = {k: coef6.get(k, 0.0) + coef6[3] * coef3.get(k, 0.0) for k in coef3}
    expected = np.array([combined[k] for k in joint.keep])
    np.testing.assert_allclose(joint.matrix[0], expected, rtol=1e-6, atol=1e-9)
    assert second.keep != joint.keep  # sanity: the joint fit used a smaller kept set
