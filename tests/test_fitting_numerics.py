"""The one ridge solver and the one Gram accumulator: known solutions, fallbacks, channel axes."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcompress.fitting.gram import GramAccumulator, channel_rows
from onnxcompress.fitting.ridge import Factorization, penalty_scale, ridge_inverse, ridge_solve


def _regression(seed: int = 0, rows: int = 500, cin: int = 6, cout: int = 3):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows, cin))
    weight = rng.standard_normal((cin, cout))
    bias = rng.standard_normal(cout)
    return z, weight, bias, z @ weight + bias


@pytest.mark.parametrize("factorization", ["cholesky", "lu"])
def test_known_solution_with_intercept_is_recovered(factorization: Factorization) -> None:
    z, weight, bias, y = _regression()
    za = np.concatenate([z, np.ones((len(z), 1))], axis=1)
    solution = ridge_solve(za.T @ za, za.T @ y, 1e-12, intercept=True, factorization=factorization)
    np.testing.assert_allclose(solution[:-1], weight, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(solution[-1], bias, rtol=1e-8, atol=1e-8)


def test_intercept_is_not_penalized() -> None:
    """A huge ridge shrinks the weights to zero, but the bias still fits the targets' mean."""
    z, _, _, y = _regression(1)
    za = np.concatenate([z, np.ones((len(z), 1))], axis=1)
    gram, cross = za.T @ za, za.T @ y
    free = ridge_solve(gram, cross, 1e6, intercept=True)
    assert np.abs(free[:-1]).max() < 1e-3
    np.testing.assert_allclose(free[-1], y.mean(axis=0), atol=1e-2)
    shrunk = ridge_solve(gram, cross, 1e6, intercept=False)
    assert np.abs(shrunk[-1]).max() < 1e-3


def test_penalty_is_relative_to_the_mean_diagonal() -> None:
    z, _, _, y = _regression(2)
    gram, cross = z.T @ z, z.T @ y
    # Scaling the data scales the Gram; a relative ridge gives the same solution.
    np.testing.assert_allclose(
        ridge_solve(gram, cross, 0.1), ridge_solve(gram * 1e4, cross * 1e4, 0.1), rtol=1e-10
    )
    assert penalty_scale(gram, gram.shape[0]) == pytest.approx(np.trace(gram) / gram.shape[0])


def test_all_zero_gram_scale_is_the_callers_choice() -> None:
    zero = np.zeros((4, 4))
    assert penalty_scale(zero, 4) == 1e-30
    assert penalty_scale(zero, 4, scale_floor=1e-12) == 1e-12
    assert penalty_scale(zero, 4, scale_floor=0.0, zero_scale=1.0) == 1.0
    np.testing.assert_allclose(
        ridge_inverse(zero, 1e-6, scale_floor=0.0, zero_scale=1.0), np.eye(4) * 1e6
    )


def test_singular_system_falls_back_to_least_squares() -> None:
    """Rank-deficient Gram and no ridge: Cholesky fails, lstsq gives the minimum-norm fit."""
    rng = np.random.default_rng(3)
    z = rng.standard_normal((50, 3)) @ rng.standard_normal((3, 6))  # rank 3 of 6
    y = z @ rng.standard_normal((6, 2))
    gram, cross = z.T @ z, z.T @ y
    solution = ridge_solve(gram, cross, 0.0)
    np.testing.assert_allclose(gram @ solution, cross, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(solution, np.linalg.pinv(z) @ y, rtol=1e-6, atol=1e-6)
    inverse = ridge_inverse(gram, 0.0)
    np.testing.assert_allclose(inverse, np.linalg.pinv(gram, hermitian=True), rtol=1e-8)


def test_singular_system_raises_when_asked() -> None:
    """Negative test: ``fallback="raise"`` lets a singular system's error through."""
    singular = np.zeros((4, 4))
    with pytest.raises(np.linalg.LinAlgError):
        ridge_solve(singular, np.ones((4, 1)), 0.0, factorization="lu", fallback="raise")
    with pytest.raises(np.linalg.LinAlgError):
        ridge_solve(singular, np.ones((4, 1)), 0.0, factorization="cholesky", fallback="raise")


def test_inverse_matches_numpy_on_a_positive_definite_gram() -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((7, 20))
    gram = a @ a.T
    expected = np.linalg.inv(gram + 1e-3 * np.trace(gram) / 7 * np.eye(7))
    np.testing.assert_allclose(ridge_inverse(gram, 1e-3), expected, rtol=1e-10)


def test_accumulated_batches_equal_one_pass() -> None:
    rng = np.random.default_rng(5)
    z = rng.standard_normal((10, 4, 5, 5))
    y = rng.standard_normal((10, 3, 5, 5))
    batched = GramAccumulator()
    for start in range(0, 10, 3):
        batched.add(z[start : start + 3], y[start : start + 3])
    whole = GramAccumulator()
    whole.add(z, y)
    a, b = batched.statistics(), whole.statistics()
    for name in ("gram", "cross", "target_sq", "target_sum"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12)
    assert a.count == b.count == 250
    rows = channel_rows(z)
    np.testing.assert_allclose(a.gram[:4, :4], rows.T @ rows, rtol=1e-12)
    np.testing.assert_allclose(a.gram[4, :4], rows.sum(axis=0), rtol=1e-12)
    assert a.gram[4, 4] == 250


def test_channel_axis_equals_a_transposed_nchw_input() -> None:
    rng = np.random.default_rng(6)
    nchw = rng.standard_normal((2, 4, 3, 5)).astype(np.float32)
    target = rng.standard_normal((2, 3, 3, 5)).astype(np.float32)
    first, last = GramAccumulator(), GramAccumulator()
    first.add(nchw, target, channel_axis=1)
    last.add(nchw.transpose(0, 2, 3, 1), target.transpose(0, 2, 3, 1), channel_axis=-1)
    a, b = first.statistics(), last.statistics()
    np.testing.assert_array_equal(a.gram, b.gram)
    np.testing.assert_array_equal(a.cross, b.cross)
    assert a.gram.dtype == np.float64


def test_relative_error_of_the_fitted_solution() -> None:
    z, _, _, y = _regression(7)
    accumulator = GramAccumulator()
    accumulator.add(z, y, channel_axis=-1)
    stats = accumulator.statistics()
    exact = ridge_solve(stats.gram, stats.cross, 1e-12, intercept=True)
    assert stats.relative_error(exact) < 1e-6
    assert stats.relative_error(np.zeros_like(exact)) > 0.5


def test_accumulator_rejects_mismatched_or_missing_batches() -> None:
    """Negative tests: targets with other positions, and statistics before any batch."""
    accumulator = GramAccumulator()
    with pytest.raises(ValueError, match="no calibration batch"):
        accumulator.statistics()
    with pytest.raises(ValueError, match="positions differ"):
        accumulator.add(np.ones((2, 3, 4, 4)), np.ones((2, 3, 2, 2)))
    assert accumulator.empty
