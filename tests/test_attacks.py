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
    context = attacks.ServerContext(round_index=0, cohort=np.arange(6), finite=np.ones(6, bool), honest=~byz, f=2,
                                    aggregate=None, rng=np.random.default_rng(0))
    attacks.ATTACKS["ipm"].on_server(updates, byz, {"eps": 2.0}, context)
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
    run = ["clients.total=20", "clients.per_round=12", "attack.fraction=0.2"]
    assert attacks.resolved_params(load(None, [*run, "attack.name=scaling"]))["lambda"] == 12.0
    assert attacks.resolved_params(load(None, [*run, "attack.name=sign_flip"]))["lambda"] == 1.0


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
     "attack.params.eps = 1: unknown parameter for sign_flip (allowed: lambda)"),
    (["attack.name=gaussian", "attack.fraction=0.2", "attack.params={std: -1}"], "attack.params.std = -1.0: must be > 0"),
    (["aggregator.name=krum", "aggregator.f=7"], "aggregator.f = 7: krum needs n >= 2f + 3; got n = 16, f = 7"),
    (["aggregator.name=bulyan", "aggregator.f=4"], "bulyan needs n >= 4f + 3; got n = 16, f = 4"),
    (["aggregator.name=krum", "aggregator.f=2", "aggregator.pre=[{name: bucketing, bucket_size: 3}]"],
     "krum needs n >= 2f + 3; got n = 6, f = 2"),
    (["aggregator.name=median", "aggregator.pre=[{name: clip}]"], "aggregator.pre[0].max_norm = None: clip needs max_norm > 0"),
    (["aggregator.name=krum", "aggregator.m=3"], "aggregator.m = 3: only used with aggregator.name = multi_krum"),
    (["aggregator.name=trimmed_mean", "aggregator.f=8"], "trimmed_mean needs 2f < n"),
    (["clients.total=30", "clients.per_round=30", "aggregator.name=mda", "aggregator.f=10"],
     "aggregator.f = 10: mda searches C(n, f) = C(30, 10) = 30045015 subsets, more than its bound of 500000"),
    (["aggregator.name=monna", "aggregator.f=8"], "aggregator.f = 8: monna needs 2f < n; got n = 16, f = 8"),
    (["aggregator.name=median", "aggregator.f=8", "aggregator.pre=[{name: arc}]"], "arc needs 2f < n (rows reaching it: 16)"),
    (["attack.name=nonfinite", "attack.fraction=0.2", "attack.params={pattern: huge}"],
     "attack.params.pattern = 'huge': must be one of nan, inf, -inf, max, max_alternating, mixed, one_nan"),
    (["attack.name=min_max", "attack.fraction=0.2", "attack.params={perturbation: 3}"],
     "attack.params.perturbation = 3: must be one of unit_vec, std, sign"),
    (["attack.name=mimic", "attack.fraction=0.2", "attack.params={warmup: 1.5}"], "attack.params.warmup = 1.5: expected an integer"),
    (["attack.name=mimic", "attack.fraction=0.2", "attack.params={warmup: 0}"], "attack.params.warmup = 0: must be >= 1"),
    (["attack.name=fang_trimmed_mean", "attack.fraction=0.2", "attack.params={b: 1}"], "attack.params.b = 1.0: must be > 1"),
    (["attack.name=backdoor", "attack.fraction=0.2", "attack.params={poison_fraction: 1.5}"],
     "attack.params.poison_fraction = 1.5: must be <= 1"),
    (["attack.name=sign_flip", "attack.fraction=0.2", "attack.params={lambda: x}"], "attack.params.lambda = 'x': expected a number"),
    (["attack.name=sign_flip", "attack.fraction=0.2", "attack.params={lambda: .inf}"], "attack.params.lambda = inf: expected a finite"),
    (["attack.name=min_max", "attack.fraction=0.2", "transport=reduce"], "min_max is computed on rank 0 from the rows"),
])
def test_bad_robustness_config(overrides, message):
    with pytest.raises(ConfigError) as info:
        load(None, overrides)
    assert message in str(info.value)


def test_typed_params_keep_their_type_in_the_frozen_config():
    cfg = load(None, ["attack.name=min_sum", "attack.fraction=0.2", "attack.params={perturbation: std, reference: min}"])
    assert dict(cfg.attack.params) == {"perturbation": "std", "reference": "min"}
    assert attacks.resolved_params(cfg) == {"perturbation": "std", "reference": "min"}
    cfg = load(None, ["attack.name=sign_flip", "attack.fraction=0.2", "attack.params={lambda: 10}"])
    assert cfg.attack.params["lambda"] == 10.0 and isinstance(cfg.attack.params["lambda"], float)


def test_nonfinite_hook_replaces_the_update():
    u = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    attacks.ATTACKS["nonfinite"].on_update(u, {"pattern": "-inf"}, attacks.client_rng(0, 0, 0))
    assert u.tolist() == [-np.inf] * 3


def test_backdoor_stamps_relabels_and_scales_by_hand():
    x = np.zeros((8, 1, 4, 4), dtype=np.float32)
    y = np.arange(8) % 3
    xb, yb = attacks.backdoor_data(x, y, target=2, fraction=0.25, value=np.array([5.0]), size=2,
                                   rng=np.random.default_rng(0))
    poisoned = np.flatnonzero(xb.reshape(8, -1).any(axis=1))
    assert len(poisoned) == 2  # round(0.25 x 8)
    assert poisoned.tolist() == sorted(np.random.default_rng(0).choice(8, size=2, replace=False).tolist())
    for i in range(8):
        if i in poisoned:  # the bottom-right 2 x 2 square is 5, the rest untouched; label 2
            assert xb[i, 0, 2:, 2:].tolist() == [[5, 5], [5, 5]] and xb[i, 0, :2].sum() == 0 and yb[i] == 2
        else:
            assert not xb[i].any() and yb[i] == y[i]
    assert not x.any()  # inputs are not modified
    xt, yt = attacks.backdoor_test_set(x, y, target=2, value=np.array([5.0]), size=2)
    assert len(yt) == int((y != 2).sum()) and (yt == 2).all() and (xt[:, 0, 2:, 2:] == 5).all()
    assert attacks.trigger_size(8, 8) == 2 and attacks.trigger_size(28, 28) == 4
    assert attacks.replacement_factor(20, 1.0) == 20.0  # one attacker: gamma = n / eta
    assert attacks.replacement_factor(20, 0.5, attackers=4) == 10.0  # 4 colluders: each n / (eta m)
    u = np.array([1.0, -2.0], dtype=np.float32)
    attacks.ATTACKS["backdoor"].on_update(u, {"gamma": 20.0}, None)
    assert u.tolist() == [20.0, -40.0]


def test_backdoor_defaults_from_the_run():
    from fedmpi.data import load as load_data

    cfg = load(None, ["clients.total=20", "clients.per_round=10", "attack.name=backdoor", "attack.fraction=0.2",
                      "server.lr=0.5"])
    params = attacks.resolved_params(cfg, load_data(cfg))
    # 4 attackers of 20, 10 per round: 2 expected per cohort -> gamma = 10 / (0.5 x 2) = 10
    assert params["gamma"] == 10.0 and params["trigger_size"] == 2 and params["target"] == 0
    assert params["poison_fraction"] == 20 / 64
    # the brightest standardised value: (16 / 16 - mean) / std of the training pixels
    data = load_data(cfg)
    assert params["trigger_value"].tolist() == [float(data.x_train.max())]
