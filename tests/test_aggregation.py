"""Aggregation rules on small hand-computed cases: ties, duplicates, outliers,
1e30 rows, all-equal rows, invalid f. Expected values are worked out by hand in
the comments, or by brute force in float64 where the point is numerics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmpi import aggregation as agg

LINE = np.array([[0.0], [1.0], [2.0], [3.0], [100.0]])  # 1-D points, one outlier


def _brute_sq_distances(x):
    x = np.asarray(x, dtype=np.float64)
    return np.array([[np.sum((a - b) ** 2) for b in x] for a in x])


def _unchanged(fn, updates, *args, **kwargs):
    before = updates.copy()
    result = fn(updates, *args, **kwargs)
    assert np.array_equal(updates, before), f"{fn.__name__} modified its input"
    return result


# --------------------------------------------------------------------------- fedavg


def test_fedavg_weighted_and_uniform():
    x = np.array([[0.0, 2.0], [4.0, 6.0]], dtype=np.float32)
    np.testing.assert_array_equal(_unchanged(agg.fedavg, x, weights=[1, 3]).vector, [3.0, 5.0])
    np.testing.assert_array_equal(agg.fedavg(x).vector, [2.0, 4.0])
    assert agg.fedavg(x, [0, 1]).selected.tolist() == [1]


def test_fedavg_rejects_bad_weights():
    x = np.ones((2, 3))
    for bad, msg in (([0, 0], "must not all be zero"), ([1, -1], "non-negative"), ([1], "one entry per row")):
        with pytest.raises(ValueError, match=msg):
            agg.fedavg(x, bad)


# --------------------------------------------------------------------------- krum


def test_krum_scores_use_n_minus_f_minus_2_neighbours():
    # n = 5, f = 1 -> 2 nearest others. Squared distances:
    # 0: {1: 1, 2: 4, 3: 9}  -> 1 + 4 = 5
    # 1: {0: 1, 2: 1}        -> 2
    # 2: {1: 1, 3: 1}        -> 2
    # 3: {2: 1, 1: 4}        -> 5
    # 4: {3: 97^2, 2: 98^2}  -> 9409 + 9604 = 19013
    res = _unchanged(agg.krum, LINE, f=1)
    np.testing.assert_allclose(res.scores, [5, 2, 2, 5, 19013], rtol=1e-12)
    assert res.selected.tolist() == [1]  # 1 and 2 tie: lowest index
    np.testing.assert_array_equal(res.vector, [1.0])


def test_krum_paper_neighbour_count_changes_the_winner():
    # 0, 0.9, 1.9, 2, 2.1: with n - f - 2 = 2 neighbours row 3 (at 2) wins (0.01 + 0.01);
    # a library using n - f - 1 = 3 neighbours would pick row 2 (0.01 + 0.04 + 1.0 = 1.05 < 1.22).
    x = np.array([[0.0], [0.9], [1.9], [2.0], [2.1]])
    assert agg.krum(x, 1).selected.tolist() == [3]
    wider = agg.krum_scores(_brute_sq_distances(x), 0)  # 0 -> n - 2 = 3 neighbours
    assert int(np.argmin(wider)) == 2


def test_krum_duplicate_rows_tie_to_lowest_index():
    x = np.array([[5.0, 5.0], [1.0, 2.0], [1.0, 2.0], [1.1, 2.0], [9.0, 9.0]])
    res = agg.krum(x, 1)
    assert res.selected.tolist() == [1]
    assert res.scores[1] == res.scores[2] == pytest.approx(0.01)


def test_krum_all_equal_rows():
    x = np.tile(np.array([[0.25, -3.0, 7.0]], dtype=np.float32), (6, 1))
    res = agg.krum(x, 1)
    assert res.selected.tolist() == [0] and np.all(res.scores == 0)
    np.testing.assert_array_equal(res.vector, x[0])


def test_krum_1e30_attacker_keeps_honest_distances_exact():
    rng = np.random.default_rng(0)
    honest = rng.normal(size=(6, 1000))
    x = np.vstack([honest, np.full((1, 1000), 1e30)]).astype(np.float32)
    dist = agg.pairwise_sq_distances(x)
    ref = _brute_sq_distances(x)
    assert np.all(np.isfinite(dist))
    np.testing.assert_allclose(dist, ref, rtol=1e-12)
    res = agg.krum(x, 2)
    assert res.selected.tolist() == [int(np.argmin(agg.krum_scores(ref, 2)))]
    assert res.selected[0] != 6


def test_centered_gram_beats_uncentered_float32_on_near_identical_clients():
    """The uncentered float32 Gram trick loses most digits here and picks the wrong winner."""
    rng = np.random.default_rng(1)
    common = rng.normal(size=20000) * 10
    x = (common + 1e-3 * rng.normal(size=(9, 20000))).astype(np.float32)
    ref = _brute_sq_distances(x)
    ours = agg.pairwise_sq_distances(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=0)
    g32 = x @ x.T
    naive = np.diag(g32)[:, None] + np.diag(g32)[None, :] - 2 * g32
    off = ~np.eye(9, dtype=bool)
    assert np.max(np.abs(naive[off] - ref[off]) / ref[off]) > 0.5  # the failure mode we avoid
    assert agg.krum(x, 2).selected[0] == int(np.argmin(agg.krum_scores(ref, 2)))


@pytest.mark.parametrize("rule", ["krum", "multi_krum"])
def test_krum_invalid_f(rule):
    fn = getattr(agg, rule)
    with pytest.raises(ValueError, match=rf"{rule} needs n >= 2f \+ 3; got n = 4, f = 1"):
        fn(np.zeros((4, 2)), 1)
    with pytest.raises(ValueError, match="non-negative integer"):
        fn(np.zeros((5, 2)), -1)


def test_multi_krum_averages_the_m_best():
    # scores from test_krum_scores...: [5, 2, 2, 5, 19013] -> best 4 (m = n - f) are rows 0..3
    res = _unchanged(agg.multi_krum, LINE, f=1)
    assert res.selected.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(res.vector, [1.5])
    res = agg.multi_krum(LINE, f=1, m=3)  # ties 0 and 3 at 5: row 0 goes first
    assert res.selected.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(res.vector, [1.0])
    with pytest.raises(ValueError, match="1 <= m <= n"):
        agg.multi_krum(LINE, f=1, m=6)


# --------------------------------------------------------------------------- coordinate-wise


def test_median_odd_and_even():
    x = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [100.0, -5.0]])
    # even n: columns sorted (1, 2, 3, 100) and (-5, 10, 20, 30) -> (2 + 3)/2, (10 + 20)/2
    np.testing.assert_array_equal(_unchanged(agg.median, x).vector, [2.5, 15.0])
    np.testing.assert_array_equal(agg.median(x[:3]).vector, [2.0, 20.0])


def test_median_ignores_1e30_rows_and_scores_kept_fraction():
    x = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [1e30, -1e30], [1e30, -1e30]], dtype=np.float32)
    res = agg.median(x)
    # sorted columns (1, 2, 3, 1e30, 1e30) and (-1e30, -1e30, 1, 2, 3): middles are row 2 and row 0
    np.testing.assert_array_equal(res.vector, [3.0, 1.0])
    np.testing.assert_array_equal(res.scores, [0.5, 0.0, 0.5, 0.0, 0.0])
    assert res.selected.tolist() == [0, 2]


def test_trimmed_mean():
    x = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    res = _unchanged(agg.trimmed_mean, x, f=1)
    np.testing.assert_array_equal(res.vector, [3.0])  # drop 1 and 100, mean(2, 3, 4)
    np.testing.assert_array_equal(res.scores, [0, 1, 1, 1, 0])
    np.testing.assert_array_equal(agg.trimmed_mean(x, 0).vector, [22.0])
    with pytest.raises(ValueError, match=r"trimmed_mean needs 2f < n; got n = 5, f = 3"):
        agg.trimmed_mean(x, 3)


def test_trimmed_mean_all_equal_and_duplicates():
    x = np.full((5, 3), 2.5, dtype=np.float32)
    np.testing.assert_array_equal(agg.trimmed_mean(x, 2).vector, [2.5, 2.5, 2.5])
    dup = np.array([[1.0], [1.0], [1.0], [9.0], [9.0]])
    np.testing.assert_array_equal(agg.trimmed_mean(dup, 1).vector, [11.0 / 3.0])


# --------------------------------------------------------------------------- geometric median


def test_geometric_median_of_equilateral_triangle_is_its_centre():
    x = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3.0)]])
    res = _unchanged(agg.geometric_median, x)
    np.testing.assert_allclose(res.vector, [1.0, math.sqrt(3.0) / 3.0], atol=1e-8)
    assert res.info["converged"]


def test_geometric_median_heavy_point_wins():
    # weight 10 >= 1 + 1: the minimiser of sum w_i |v - x_i| is the heavy point itself
    x = np.array([[0.0, 0.0], [4.0, 0.0], [1.0, 3.0]])
    res = agg.geometric_median(x, weights=[1, 1, 10])
    np.testing.assert_allclose(res.vector, [1.0, 3.0], atol=1e-5)


def _weiszfeld_reference(x, iterations=20000):
    """Plain smoothed Weiszfeld in coordinates, float64, run far past convergence."""
    x = np.asarray(x, dtype=np.float64)
    v = np.median(x, axis=0)
    for _ in range(iterations):
        b = 1.0 / np.maximum(np.linalg.norm(x - v, axis=1), 1e-6)
        v = b @ x / b.sum()
    return v


def test_geometric_median_matches_reference_iteration():
    x = np.random.default_rng(5).normal(size=(20, 300))
    res = agg.geometric_median(x)
    assert res.info["converged"] and res.info["recenters"] == 0
    np.testing.assert_allclose(res.vector, _weiszfeld_reference(x), atol=1e-9)


def test_geometric_median_exact_next_to_1e30_outlier():
    rng = np.random.default_rng(3)
    honest = rng.normal(size=(9, 50))
    x = np.vstack([honest, np.full((1, 50), 1e30)]).astype(np.float32)
    res = agg.geometric_median(x)
    assert res.info["converged"] and res.info["recenters"] >= 1  # rebuilt around the honest cluster
    np.testing.assert_allclose(res.vector, _weiszfeld_reference(x), atol=1e-8)
    assert res.scores[-1] < 1e-20  # the outlier is weighted out


def test_geometric_median_stops_at_max_iter():
    x = np.random.default_rng(0).normal(size=(7, 4))
    res = agg.geometric_median(x, tol=0.0, max_iter=3)
    assert res.info["iterations"] == 3 and not res.info["converged"]


# --------------------------------------------------------------------------- bulyan


def test_bulyan_hand_computed():
    # n = 7, f = 1: theta = 5 rows by repeated Krum, beta = 3 closest to the median.
    # Krum picks (see the scores worked out in the test comments above, 4, 3, 2, 1, 0 neighbours):
    # 2 (tie with 3), then 3, then 1 (tie with 4), then 4, then 0 (all scores 0: lowest index).
    # Coordinate: values 0..4, median 2, closest three 2, 1, 3 -> 2.
    x = np.array([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [1000.0]])
    res = _unchanged(agg.bulyan, x, f=1)
    assert res.selected.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(res.vector, [2.0])
    with pytest.raises(ValueError, match=r"bulyan needs n >= 4f \+ 3; got n = 6, f = 1"):
        agg.bulyan(x[:6], 1)


def test_bulyan_with_1e30_rows():
    rng = np.random.default_rng(4)
    honest = rng.normal(size=(9, 20))
    x = np.vstack([honest, np.full((1, 20), 1e30), np.full((1, 20), -1e30)]).astype(np.float32)
    res = agg.bulyan(x, 2)
    assert 9 not in res.selected and 10 not in res.selected
    assert np.all(np.abs(res.vector) <= np.abs(honest).max(axis=0))


def test_bulyan_colluding_identical_rows_cannot_move_the_aggregate():
    # Two identical attackers are each other's only neighbour in the last Krum
    # step (|R| - f - 2 = 1), so one may be selected; the median stage trims it.
    rng = np.random.default_rng(4)
    honest = rng.normal(size=(9, 20))
    x = np.vstack([honest, np.full((2, 20), 1e30)]).astype(np.float32)
    res = agg.bulyan(x, 2)
    assert np.all(np.abs(res.vector) <= np.abs(honest).max(axis=0))


# --------------------------------------------------------------------------- centered clipping


def test_centered_clipping_hand_computed():
    x = np.array([[3.0, 4.0], [0.0, 0.5]])
    # from 0: |x0| = 5 -> factor 0.2 -> (0.6, 0.8); x1 inside tau = 1; mean -> (0.3, 0.65)
    res = _unchanged(agg.centered_clipping, x, tau=1.0)
    np.testing.assert_allclose(res.vector, [0.3, 0.65])
    np.testing.assert_allclose(res.scores, [0.2, 1.0])
    # from the center (3, 4): x0 - c = 0 (kept), x1 - c = (-3, -3.5), |.| = 4.6098 -> clipped to 1
    res = agg.centered_clipping(x, tau=1.0, center=np.array([3.0, 4.0]))
    step = np.array([-3.0, -3.5]) / math.hypot(3.0, 3.5) / 2
    np.testing.assert_allclose(res.vector, np.array([3.0, 4.0]) + step)


def test_centered_clipping_bounds_a_1e30_row():
    x = np.vstack([np.zeros((4, 3)), np.full((1, 3), 1e30)]).astype(np.float32)
    res = agg.centered_clipping(x, tau=2.0, iterations=3)
    assert np.all(np.isfinite(res.vector)) and np.linalg.norm(res.vector) <= 3 * 2.0 / 5 + 1e-12


# --------------------------------------------------------------------------- pre-aggregation


def test_nnm_mixes_nearest_neighbours():
    x = np.array([[0.0], [1.0], [10.0]])
    # f = 1: each row averages its 2 nearest (itself included): {0,1}, {1,0}, {10,1}
    np.testing.assert_array_equal(_unchanged(agg.nnm, x, 1), [[0.5], [0.5], [5.5]])
    with pytest.raises(ValueError, match="nnm needs f < n"):
        agg.nnm(x, 3)


def test_bucketing_partitions_rows():
    x = np.arange(14, dtype=np.float64).reshape(7, 2)
    buckets = agg.bucket_assignment(7, 3, np.random.default_rng(0))
    assert sorted(np.concatenate(buckets).tolist()) == list(range(7)) and [len(b) for b in buckets] == [3, 3, 1]
    out = _unchanged(agg.bucketing, x, 3, np.random.default_rng(0))
    for b, rows in enumerate(buckets):
        np.testing.assert_allclose(out[b], x[rows].mean(0))


def test_clip_bounds_norms_and_keeps_direction():
    x = np.array([[3.0, 4.0], [0.3, 0.4], [1e30, 1e30]], dtype=np.float32)
    out = _unchanged(agg.clip, x, 1.0)
    norms = np.linalg.norm(out, axis=1)
    np.testing.assert_allclose(norms, [1.0, 0.5, 1.0])
    np.testing.assert_allclose(out[0], [0.6, 0.8])
    np.testing.assert_allclose(out[1], x[1].astype(np.float64))


def test_row_norms_do_not_overflow():
    x = np.full((2, 8), 1e30, dtype=np.float32)
    np.testing.assert_allclose(agg.row_norms(x), math.sqrt(8) * 1e30, rtol=1e-6)


# --------------------------------------------------------------------------- meamed


def test_meamed_hand_computed():
    # median 2; distances to it 2, 1, 0, 1, 98: the n - f = 4 closest are rows 2, 1, 3, 0 -> (2 + 1 + 3 + 0) / 4
    result = _unchanged(agg.meamed, LINE, f=1)
    np.testing.assert_array_equal(result.vector, [1.5])
    assert result.selected.tolist() == [0, 1, 2, 3]
    assert result.scores.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_meamed_ties_go_to_the_lowest_index_and_coordinates_are_independent():
    # column 0: median 3, distances 3, 1, 1, 3 -> rows 1, 2 and the tie 0/3 goes to row 0: (2 + 4 + 0) / 3 = 2
    # column 1: median 15, distances 5, 5, 25, 5 -> rows 0, 1, 3 (row 2 is the far one): (10 + 20 + 10) / 3
    x = np.array([[0.0, 10.0], [2.0, 20.0], [4.0, 40.0], [6.0, 10.0]])
    result = agg.meamed(x, f=1)
    np.testing.assert_allclose(result.vector, [2.0, 40.0 / 3.0])
    assert result.scores.tolist() == [1.0, 1.0, 0.5, 0.5]


def test_meamed_ignores_a_1e30_row_and_f0_is_the_mean():
    x = np.array([[1.0], [2.0], [3.0], [1e30]], dtype=np.float32)
    # median 2.5: distances 1.5, 0.5, 0.5, ~1e30 -> rows 0, 1, 2
    np.testing.assert_array_equal(agg.meamed(x, f=1).vector, [2.0])
    y = np.array([[1.0, -2.0], [3.0, 6.0], [8.0, 5.0]])
    np.testing.assert_allclose(agg.meamed(y, f=0).vector, y.mean(axis=0))


def test_meamed_needs_2f_below_n():
    with pytest.raises(ValueError, match="meamed needs 2f < n; got n = 4, f = 2"):
        agg.meamed(np.zeros((4, 3)), f=2)
