"""Byzantine behaviours as pure functions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtri

from fedmpi import attacks
from fedmpi.config import ConfigError, load


def test_alie_zmax_follows_baruch_et_al():
    # s = floor(n/2 + 1) - f supporters, z = Phi^-1((n - s) / n)
    for n, f in ((20, 4), (50, 12), (10, 1), (7, 3)):
        s = (n // 2 + 1) - f
        assert attacks.alie_zmax(n, f) == pytest.approx(ndtri((n - s) / n), rel=1e-12)
    assert attacks.alie_zmax(20, 4) == pytest.approx(0.38532, abs=1e-5)
    with pytest.raises(ValueError, match="unbounded"):
        attacks.alie_zmax(10, 6)


def test_alie_and_ipm_vectors():
    honest = np.array([[1.0, 0.0], [3.0, 4.0]])
    # mean (2, 2), population std (1, 2)
    np.testing.assert_allclose(attacks.alie(honest, n=4, f=2, z=1.5), [2 - 1.5, 2 - 3.0])
    np.testing.assert_allclose(attacks.ipm(honest, eps=0.5), [-1.0, -1.0])


def test_omniscient_attack_overwrites_only_byzantine_rows_with_one_vector():
    rng = np.random.default_rng(0)
    updates = rng.normal(size=(6, 5)).astype(np.float32)
    honest_before = updates[[0, 2, 3, 5]].copy()
    byz = np.array([False, True, False, False, True, False])
    attacks.ATTACKS["ipm"].on_server(updates, byz, {"eps": 2.0})
    np.testing.assert_array_equal(updates[~byz], honest_before)
    np.testing.assert_array_equal(updates[1], updates[4])
    np.testing.assert_allclose(updates[1], -2.0 * honest_before.astype(np.float64).mean(0), rtol=1e-6)


def test_update_attacks():
    u = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    x = u.copy()
    attacks.ATTACKS["sign_flip"].on_update(x, {"lambda": 10.0}, attacks.client_rng(0, 0, 0))
    np.testing.assert_array_equal(x, -10 * u)
    x = u.copy()
    attacks.ATTACKS["scaling"].on_update(x, {"lambda": 4.0}, attacks.client_rng(0, 0, 0))
    np.testing.assert_array_equal(x, 4 * u)
    a, b, c = np.zeros(20000, np.float32), np.zeros(20000, np.float32), np.zeros(20000, np.float32)
    attacks.ATTACKS["gaussian"].on_update(a, {"std": 3.0}, attacks.client_rng(7, 2, 5))
    attacks.ATTACKS["gaussian"].on_update(b, {"std": 3.0}, attacks.client_rng(7, 2, 5))
    attacks.ATTACKS["gaussian"].on_update(c, {"std": 3.0}, attacks.client_rng(7, 3, 5))
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # keyed by (seed, round, client)
    assert a.std() == pytest.approx(3.0, rel=0.03)


def test_label_flip():
    np.testing.assert_array_equal(attacks.flip_labels(np.array([0, 3, 9]), 10), [9, 6, 0])


def test_byzantine_set_is_fixed_by_seed():
    a = attacks.byzantine_clients(1, 100, fraction=0.2)
    assert len(a) == 20 and len(set(a)) == 20 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, attacks.byzantine_clients(1, 100, fraction=0.2))
    assert not np.array_equal(a, attacks.byzantine_clients(2, 100, fraction=0.2))
    assert attacks.byzantine_clients(0, 10, clients=[7, 2]).tolist() == [2, 7]


def test_scaling_lambda_defaults_to_cohort_size():
    assert attacks.resolved_params("scaling", {}, 12)["lambda"] == 12.0
    assert attacks.resolved_params("sign_flip", {}, 12)["lambda"] == 1.0


def test_f_defaults_to_expected_byzantine_per_cohort():
    cfg = load(None, ["clients.total=20", "clients.per_round=20", "aggregator.name=krum",
                      "attack.name=sign_flip", "attack.fraction=0.2"])
    assert cfg.aggregator.f == 4
    cfg = load(None, ["clients.total=100", "clients.per_round=10", "aggregator.name=krum",
                      "attack.name=sign_flip", "attack.clients=[1, 2, 3]"])
    assert cfg.aggregator.f == 1  # ceil(10 * 3 / 100)
    assert load(None, ["aggregator.name=krum"]).aggregator.f == 0


@pytest.mark.parametrize("overrides, message", [
    (["attack.name=sign_flip"], "attack.name = 'sign_flip': needs exactly one of attack.fraction or attack.clients"),
    (["attack.fraction=0.2"], "attack.fraction = 0.2: needs an attack: set attack.name"),
    (["attack.name=ipm", "attack.fraction=1.5"], "attack.fraction = 1.5: must be in (0, 1)"),
    (["attack.name=ipm", "attack.fraction=0.01"], "makes round(0.01 x clients.total 16) = 0 Byzantine clients"),
    (["attack.name=ipm", "attack.clients=[3, 16]"], "attack.clients[1] = 16: must be a client id in 0..15"),
    (["attack.name=sign_flip", "attack.fraction=0.2", "attack.params={eps: 1}"],
     "attack.params.eps = 1.0: unknown parameter for sign_flip (allowed: lambda)"),
    (["attack.name=gaussian", "attack.fraction=0.2", "attack.params={std: -1}"], "attack.params.std = -1.0: must be > 0"),
    (["aggregator.name=krum", "aggregator.f=7"], "aggregator.f = 7: krum needs n >= 2f + 3; got n = 16, f = 7"),
    (["aggregator.name=bulyan", "aggregator.f=4"], "bulyan needs n >= 4f + 3; got n = 16, f = 4"),
    (["aggregator.name=krum", "aggregator.f=2", "aggregator.pre=[{name: bucketing, bucket_size: 3}]"],
     "krum needs n >= 2f + 3; got n = 6, f = 2"),
    (["aggregator.name=median", "aggregator.pre=[{name: clip}]"], "aggregator.pre[0].max_norm = None: clip needs max_norm > 0"),
    (["aggregator.name=krum", "aggregator.m=3"], "aggregator.m = 3: only used with aggregator.name = multi_krum"),
    (["aggregator.name=trimmed_mean", "aggregator.f=8"], "trimmed_mean needs 2f < n"),
])
def test_bad_robustness_config(overrides, message):
    with pytest.raises(ConfigError) as info:
        load(None, overrides)
    assert message in str(info.value)
