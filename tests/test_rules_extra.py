"""MDA, MoNNA and ARC on hand-computed cases and ByzFL's published examples: ties,
duplicates, 1e30 rows, near-identical rows, non-finite rows, the MDA refusal bound,
invalid f. Expected values are worked out in the comments."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedmpi import aggregation as agg

X3 = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])  # ByzFL's documentation example


def _unchanged(fn, updates, *args, **kwargs):
    before = updates.copy()
    result = fn(updates, *args, **kwargs)
    assert np.array_equal(updates, before, equal_nan=True), f"{fn.__name__} modified its input"
    return result


# --------------------------------------------------------------------------- MDA


def test_mda_byzfl_example_lexicographic_tie():
    # f = 1, subsets of 2: {0,1} and {1,2} have diameter sqrt(27), {0,2} sqrt(108).
    # Tie -> lexicographically first {0, 1} -> mean [2.5, 3.5, 4.5] (ByzFL's MDA(1) output).
    res = _unchanged(agg.mda, X3, 1)
    assert res.selected.tolist() == [0, 1]
    np.testing.assert_array_equal(res.vector, [2.5, 3.5, 4.5])
    assert res.info["diameter"] == pytest.approx(math.sqrt(27), rel=1e-15)
    assert res.info["ties"] == 2 and res.info["subsets"] == 3
    # every row belongs to a subset of diameter sqrt(27)
    np.testing.assert_allclose(res.scores, [math.sqrt(27)] * 3, rtol=1e-15)


def test_mda_duplicates_tie_and_f0():
    # rows 0..3 identical: the C(4, 3) = 4 subsets of them all have diameter 0 -> {0, 1, 2}
    x = np.array([[0.0], [0.0], [0.0], [0.0], [7.0]])
    res = agg.mda(x, 2)
    assert res.selected.tolist() == [0, 1, 2]
    assert res.info["diameter"] == 0.0 and res.info["ties"] == 4 and res.info["subsets"] == 10
    # the outlier's best subset is {0, 1, 4}-like: diameter 7
    np.testing.assert_allclose(res.scores, [0, 0, 0, 0, 7], rtol=1e-15, atol=0)
    # f = 0: the mean of everything, diameter = largest pairwise distance
    res0 = agg.mda(x, 0)
    assert res0.selected.tolist() == [0, 1, 2, 3, 4] and res0.vector[0] == pytest.approx(1.4, rel=1e-15)
    assert res0.info["diameter"] == pytest.approx(7.0, rel=1e-15)


def test_mda_excludes_1e30_row_and_resolves_near_identical_rows():
    # Rows 1000 + delta (delta 0, 1e-3, 2e-3, 3.5e-3, 1e-2 on coordinate 0) and one 1e30 row.
    # n = 6, f = 2, keep 4: {0,1,2,3} has diameter 3.5e-3, {1,2,3,4} 9e-3, anything with row 5 ~1e30.
    deltas = [0.0, 1e-3, 2e-3, 3.5e-3, 1e-2]
    x = np.full((6, 3), 1000.0)
    x[:5, 0] += deltas
    x[5] = 1e30
    res = _unchanged(agg.mda, x, 2)
    assert res.selected.tolist() == [0, 1, 2, 3]
    assert res.info["diameter"] == pytest.approx(3.5e-3, rel=1e-9)
    np.testing.assert_allclose(res.vector, [1000.0 + np.mean(deltas[:4]), 1000.0, 1000.0], rtol=1e-15)
    assert res.scores[5] > 1e29 and res.scores[4] == pytest.approx(9e-3, rel=1e-9)


def test_mda_matches_brute_force_with_lexicographic_ties():
    rng = np.random.default_rng(3)
    for trial in range(4):
        n, f = 8, 3
        x = rng.normal(size=(n, 5)).astype(np.float32)
        if trial == 3:
            x[5] = x[1]  # a duplicate
        d2 = np.array([[np.sum((a.astype(np.float64) - b) ** 2) for b in x] for a in x])
        best, best_set = None, None
        for s in itertools.combinations(range(n), n - f):  # strict minimum in lexicographic order
            diam = max(d2[i, j] for i, j in itertools.combinations(s, 2))
            if best is None or diam < best * (1 - 1e-12):
                best, best_set = diam, s
        res = agg.mda(x, f)
        assert tuple(res.selected.tolist()) == best_set
        assert res.info["diameter"] == pytest.approx(math.sqrt(best), rel=1e-9)
        np.testing.assert_allclose(res.vector, x[list(best_set)].astype(np.float64).mean(0), rtol=1e-6)


def test_mda_nonfinite_rows():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [np.nan, 0.0], [np.inf, 1.0], [1.0, 1.0], [0.5, 0.5]])
    res = agg.mda(x, 2)  # the two non-finite rows are left out; diameter sqrt(2)
    assert res.selected.tolist() == [0, 1, 2, 5, 6]
    np.testing.assert_allclose(res.vector, [0.5, 0.5])
    assert np.isinf(res.scores[3]) and np.isinf(res.scores[4])
    with pytest.raises(ValueError, match="more than f = 1 rows have non-finite"):
        agg.mda(x, 1)


def test_mda_refuses_large_searches_and_bad_f():
    with pytest.raises(ValueError, match=r"C\(30, 10\) = 30045015 subsets .* max_subsets = 500000"):
        agg.mda(np.zeros((30, 2)), 10)
    assert agg.MDA_MAX_SUBSETS == 500_000
    with pytest.raises(ValueError, match=r"C\(5, 2\) = 10 subsets .* max_subsets = 9"):
        agg.mda(np.zeros((5, 2)), 2, max_subsets=9)
    assert agg.mda(np.zeros((5, 2)), 2, max_subsets=10).selected.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="mda needs 2f < n; got n = 4, f = 2"):
        agg.mda(np.zeros((4, 2)), 2)
    with pytest.raises(ValueError, match="mda: f must be a non-negative integer"):
        agg.mda(np.zeros((4, 2)), -1)


# --------------------------------------------------------------------------- MoNNA


def test_monna_byzfl_example_row_pivot():
    # pivot row 1: distances sqrt(27), 0, sqrt(27); n - f = 2 nearest: row 1 and, by the
    # lowest-index tie rule, row 0 -> [2.5, 3.5, 4.5] (ByzFL's MoNNA(1, 1) output)
    res = _unchanged(agg.monna, X3, 1, 1)
    assert res.selected.tolist() == [0, 1]
    np.testing.assert_array_equal(res.vector, [2.5, 3.5, 4.5])
    np.testing.assert_allclose(res.scores, [math.sqrt(27), 0, math.sqrt(27)])
    assert res.info == {"pivot": "row", "pivot_row": 1}


def test_monna_median_and_vector_pivots():
    x = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])
    # default pivot: median 2 -> distances 2, 1, 0, 1, 98 -> rows 1, 2, 3 -> mean 2
    res = agg.monna(x, 2)
    assert res.selected.tolist() == [1, 2, 3] and res.vector.tolist() == [2.0] and res.info["pivot"] == "median"
    np.testing.assert_array_equal(res.scores, [2, 1, 0, 1, 98])
    # a bad vector pivot 60: distances 60, 59, 58, 57, 40 -> rows 2, 3, 4 -> (2 + 3 + 100) / 3 = 35
    res = agg.monna(x, 2, np.array([60.0]))
    assert res.selected.tolist() == [2, 3, 4] and res.vector.tolist() == [35.0] and res.info["pivot"] == "vector"
    # tie at the boundary: pivot 0, distances 3, 1, 1, 9, 3 -> rows 1, 2 and row 0 (before row 4)
    y = np.array([[3.0], [-1.0], [1.0], [9.0], [-3.0]])
    res = agg.monna(y, 2, np.array([0.0]))
    assert res.selected.tolist() == [0, 1, 2] and res.vector.tolist() == [1.0]


def test_monna_1e30_and_nonfinite_rows():
    x = np.full((5, 4), 1000.0, dtype=np.float32)
    x[:, 0] += np.array([0.0, 1e-3, 3e-3, 0.0, 0.0], dtype=np.float32)
    x[3] = 1e30
    x[4, 2] = np.nan
    res = _unchanged(agg.monna, x, 2, 0)  # pivot row 0: rows 0, 1, 2 nearest; 1e30 and NaN rows far
    assert res.selected.tolist() == [0, 1, 2]
    assert np.isinf(res.scores[4]) and res.scores[3] > 1e29
    assert res.scores[1] == pytest.approx(float(np.float32(1000.001)) - 1000.0, rel=1e-12)


def test_monna_rejects_bad_arguments():
    with pytest.raises(ValueError, match="monna needs 2f < n; got n = 4, f = 2"):
        agg.monna(np.zeros((4, 2)), 2)
    with pytest.raises(ValueError, match=r"pivot row must be in \[0, 3\)"):
        agg.monna(X3, 1, 3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        agg.monna(X3, 1, np.zeros(2))
    with pytest.raises(ValueError, match="non-finite"):
        agg.monna(X3, 1, np.array([0.0, np.nan, 0.0]))


# --------------------------------------------------------------------------- ARC


def test_arc_byzfl_example():
    # n = 3, f = 1: k = floor(2 * 1 * 2 / 3) = 1; the largest row (norm sqrt(194)) is scaled to
    # the second largest norm sqrt(77): 7 * sqrt(77 / 194) = 4.41004009 (ByzFL's ARC(1) output)
    out = _unchanged(agg.arc, X3, 1)
    np.testing.assert_array_equal(out[:2], X3[:2])
    np.testing.assert_allclose(out[2], [4.41004009, 5.04004582, 5.67005155], rtol=1e-8)
    assert out.dtype == np.float64


def test_arc_count_exact():
    assert [agg.arc_count(n, f) for n, f in ((3, 1), (10, 3), (4, 1), (7, 3), (100, 49), (10, 0))] == [1, 4, 1, 3, 49, 0]


def test_arc_clips_k_largest_to_next_norm():
    # n = 10, f = 3: k = floor(2 * 3 * 7 / 10) = 4. Norms 1..10 in shuffled row order:
    # the four largest (10, 9, 8, 7) are scaled to the fifth largest, 6.
    norms = np.array([3.0, 10.0, 1.0, 7.0, 5.0, 9.0, 2.0, 8.0, 6.0, 4.0])
    x = (norms[:, None] * np.array([0.6, 0.8])).astype(np.float32)
    out = agg.arc(x, 3)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), np.minimum(norms, 6.0), rtol=1e-6)
    np.testing.assert_allclose(out / np.linalg.norm(out, axis=1, keepdims=True), np.tile([0.6, 0.8], (10, 1)), rtol=1e-6)
    # ties at the threshold change nothing: norms 5, 5, 5, 1 with k = 1 -> threshold 5
    t = np.array([[3.0, 4.0], [0.0, 5.0], [5.0, 0.0], [1.0, 0.0]])
    np.testing.assert_array_equal(agg.arc(t, 1), t)
    # f = 0: k = 0, unchanged
    np.testing.assert_array_equal(agg.arc(X3, 0), X3)


def test_arc_1e30_row_and_bad_f():
    x = np.ones((5, 4), dtype=np.float32)
    x[2] = 1e30  # norm 2e30: fine in float64
    out = agg.arc(x, 1)  # k = floor(2 * 1 * 4 / 5) = 1 -> row 2 scaled to norm 2
    np.testing.assert_allclose(out[2], [1.0, 1.0, 1.0, 1.0], rtol=1e-12)
    np.testing.assert_array_equal(out[[0, 1, 3, 4]], x[[0, 1, 3, 4]])
    with pytest.raises(ValueError, match="arc needs 2f < n; got n = 4, f = 2"):
        agg.arc(np.ones((4, 2)), 2)
