"""Membership inference: metrics and LiRA on hand-computed cases, and the keyed splits."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from fedmpi import membership
from fedmpi.config import from_mapping
from fedmpi.data import load
from fedmpi.schema import ConfigError


def test_roc_auc_tpr_and_advantage_by_hand():
    fpr, tpr = membership.roc_curve([0.9, 0.8, 0.7, 0.6], [True, False, True, False])
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    assert membership.auc(fpr, tpr) == 0.75  # 3 of the 4 (member, non-member) pairs ordered right
    assert membership.tpr_at_fpr(fpr, tpr, 0.01) == 0.5 and membership.tpr_at_fpr(fpr, tpr, 0.5) == 1.0
    assert membership.advantage(fpr, tpr) == 0.5
    # ties enter together: one point for both units scored 1; the tied pair counts half
    fpr, tpr = membership.roc_curve([1.0, 1.0, 0.0], [True, False, True])
    assert fpr.tolist() == [0, 1, 1] and tpr.tolist() == [0, 0.5, 1]
    assert membership.auc(fpr, tpr) == 0.25
    # no non-members: undefined
    fpr, tpr = membership.roc_curve([1.0, 2.0], [True, True])
    assert math.isnan(membership.auc(fpr, tpr)) and math.isnan(membership.tpr_at_fpr(fpr, tpr, 0.01))


def test_auc_equals_the_mann_whitney_statistic():
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=400), 1)  # many ties
    member = rng.random(400) < 0.4
    u = stats.mannwhitneyu(scores[member], scores[~member]).statistic
    fpr, tpr = membership.roc_curve(scores, member)
    assert membership.auc(fpr, tpr) == pytest.approx(u / (member.sum() * (~member).sum()), abs=1e-12)
    assert membership.advantage(fpr, tpr) == pytest.approx(
        max(np.mean(scores[member] >= t) - np.mean(scores[~member] >= t) for t in np.unique(scores)), abs=1e-12)
    with pytest.raises(ValueError, match="finite"):
        membership.roc_curve([np.nan, 1.0], [True, False])


def test_scores_from_logits_by_hand():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    labels = np.array([0, 2])
    # p = e^2 / (e^2 + 2): phi = log(p / (1 - p)) = 2 - log 2; the loss is -log p
    phi = membership.logit_confidence(logits, labels)
    assert phi[0] == pytest.approx(2 - math.log(2), abs=1e-12)
    assert phi[1] == pytest.approx(-1 - math.log(1 + math.e), abs=1e-12)
    assert membership.cross_entropy(logits, labels)[0] == pytest.approx(math.log(math.exp(2) + 2) - 2, abs=1e-12)
    # a huge logit gap stays finite
    assert membership.logit_confidence(np.array([[800.0, 0.0]]), np.array([0]))[0] == pytest.approx(800.0)
    assert membership.per_unit([1.0, 2.0, 3.0, 5.0], np.array([0, 0, 1, 1]), 2).tolist() == [1.5, 4.0]


def test_lira_gaussians_and_scores_by_hand():
    # 4 shadows x 2 units; unit 0: IN {1, 3}, OUT {2, 4}; unit 1: IN {6, 10}, OUT {5, 7}
    phi = np.array([[1.0, 5.0], [3.0, 6.0], [2.0, 10.0], [4.0, 7.0]])
    inside = np.array([[True, False], [True, True], [False, True], [False, False]])
    per = membership.fit_gaussians(phi, inside, "per_example")
    assert per.mean_in.tolist() == [2.0, 8.0] and per.mean_out.tolist() == [3.0, 6.0]
    assert per.std_in.tolist() == pytest.approx([math.sqrt(2), math.sqrt(8)])
    assert per.std_out.tolist() == pytest.approx([math.sqrt(2), math.sqrt(2)])
    pooled = membership.fit_gaussians(phi, inside, "global")
    assert pooled.std_in.tolist() == pytest.approx([math.sqrt(5)] * 2)  # (2 + 8) / (1 + 1)
    assert pooled.std_out.tolist() == pytest.approx([math.sqrt(2)] * 2)
    target = np.array([2.5, 7.0])
    online = membership.lira_online(target, per)
    expected = [stats.norm.logpdf(t, mi, si) - stats.norm.logpdf(t, mo, so)
                for t, mi, si, mo, so in zip(target, per.mean_in, per.std_in, per.mean_out, per.std_out)]
    assert online.tolist() == pytest.approx(expected, abs=1e-12)
    assert membership.lira_offline(target, per).tolist() == pytest.approx([-0.5 / math.sqrt(2), 1 / math.sqrt(2)])
    assert membership.loss_threshold_scores([0.1, 2.0]).tolist() == [-0.1, -2.0]
    with pytest.raises(ValueError, match="at least 2 shadow"):
        membership.fit_gaussians(phi[:3], inside[:3], "per_example")


def test_keyed_splits_are_balanced_and_independent_of_the_shadow_count():
    sizes = np.array([5, 0, 40, 17])
    a = membership.shadow_keep(7, sizes, "example", 6)
    assert [k.shape for k in a] == [(6, 5), (6, 0), (6, 40), (6, 17)]
    assert all((k.sum(axis=0) == 3).all() for k in a)  # every example in exactly half of the shadows
    assert all(np.array_equal(x, y) for x, y in zip(a, membership.shadow_keep(7, sizes, "example", 6)))
    assert not all(np.array_equal(x, y) for x, y in zip(a, membership.shadow_keep(8, sizes, "example", 6)))
    labels = [np.random.default_rng(c).integers(0, 3, n) for c, n in enumerate(sizes)]
    t = membership.target_keep(7, labels, "example")
    assert [len(k) for k in t] == sizes.tolist()
    for y, k in zip(labels, t):  # half of each client's examples of each class (the odd one by a coin)
        for cls in range(3):
            n = int((y == cls).sum())
            assert k[y == cls].sum() in (n // 2, (n + 1) // 2)
    assert any(not np.array_equal(x, y) for x, y in zip(t, membership.target_keep(8, labels, "example")))
    clients = membership.target_keep(7, [np.zeros(1)] * 9, "client")
    assert sum(int(k[0]) for k in clients) in (4, 5)
    c = membership.shadow_keep(7, sizes, "client", 5)
    assert all((k == k[:, :1]).all() for k in c if k.shape[1])  # a client is in or out as a whole
    assert np.stack([k[:, 0] for k in c if k.shape[1]], axis=1).sum(axis=0).tolist() == [2, 2, 2]
    seeds = {membership.shadow_seed(7, s) for s in range(1, 20)}
    assert len(seeds) == 19 and 7 not in seeds


def test_restrict_keeps_a_clients_chosen_examples():
    cfg = from_mapping({"clients": {"total": 5, "per_round": 5}})
    data = load(cfg, need_test=False)
    keep = membership.target_keep(0, [data.client(c)[1] for c in range(5)], "example")
    part = membership.restrict(data, keep)
    assert part.full is data and part.client_sizes().tolist() == [int(k.sum()) for k in keep]
    x, y = part.client(2)
    full_x, full_y = data.client(2)
    assert np.array_equal(x, full_x[keep[2]]) and np.array_equal(y, full_y[keep[2]])
    # a shadow's split is taken from the full data, not from the target's
    shadow = membership.restrict(part, [np.ones(n, bool) for n in data.client_sizes()])
    assert shadow.full is data and shadow.client_sizes().tolist() == data.client_sizes().tolist()
    # generated (synthetic) clients too
    syn = load(from_mapping({"data": {"name": "synthetic"}, "clients": {"total": 3, "per_round": 3}}), need_test=False)
    keep = membership.target_keep(0, [syn.client(c)[1] for c in range(3)], "client")
    part = membership.restrict(syn, keep)
    assert part.client_sizes().tolist() == [n if k.all() else 0 for n, k in zip(syn.client_sizes(), keep)]


@pytest.mark.parametrize("overrides,message", [
    ({"audit": {"membership": {"level": "example", "shadows": 1}}}, "audit.membership.shadows = 1: must be >= 2"),
    ({"audit": {"membership": {"level": "example", "shadows": 3, "variance": "per_example"}}},
     "audit.membership.shadows = 3: must be >= 4"),
    ({"audit": {"membership": {"level": "example", "every": -1}}}, "audit.membership.every = -1: must be >= 0"),
    ({"audit": {"membership": {"level": "examples"}}}, "audit.membership.level = 'examples': must be one of none"),
    ({"audit": {"inversion": {"method": "dlg"}}, "transport": "reduce"}, "audit.inversion.method = 'dlg': rank 0 attacks"),
    ({"audit": {"inversion": {"method": "dlg", "rounds": [20]}}}, "audit.inversion.rounds[0] = 20: must be a round index"),
    ({"audit": {"inversion": {"method": "analytic"}}, "model": {"name": "cnn"}}, "fully connected first layer"),
    ({"audit": {"inversion": {"method": "dlg"}}, "data": {"normalize": "none"}}, "the [0, 1] pixel scale"),
    ({"audit": {"inversion": {"method": "dlg", "slots": 0}}}, "audit.inversion.slots = 0: must be >= 1"),
    ({"audit": {"inversion": {"method": "gan"}}}, "audit.inversion.method = 'gan': must be one of none, analytic"),
])
def test_audit_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        from_mapping(overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_client_level_audit_scores_each_client_by_its_examples():
    """At client level a unit is a client: its loss is the mean cross-entropy over its full shard,
    computed here with torch directly; membership and the shadows' splits are per client."""
    import torch
    import torch.nn.functional as F

    from fedmpi.leakage_audit import MembershipAudit
    from fedmpi.models import FlatModel, build_model, init_weights

    cfg = from_mapping({"clients": {"total": 6, "per_round": 6}, "model": {"hidden": [8]},
                        "audit": {"membership": {"level": "client", "shadows": 4, "every": 2}}, "rounds": 5})
    full = load(cfg, need_test=False)
    data = membership.restrict(full, membership.target_keep(cfg.seed, [full.client(c)[1] for c in range(6)], "client"))
    build = lambda: build_model(cfg.model, full.input_shape, full.num_classes)  # noqa: E731
    audit = MembershipAudit(cfg, data, build, 0)
    assert audit.units == 6 and audit.eval_rounds == [1, 3, 4]
    assert audit.member.tolist() == [n > 0 for n in data.client_sizes()]
    module = build()
    weights = init_weights(module, 3)
    loss, phi = audit.scores(FlatModel(build()), weights)
    with torch.no_grad():
        for c in range(6):
            x, y = full.client(c)
            logits = module(torch.from_numpy(x)).double()
            assert loss[c] == pytest.approx(float(F.cross_entropy(logits, torch.from_numpy(y))), rel=1e-6)
            p = logits.softmax(1)[torch.arange(len(y)), torch.from_numpy(y)]
            assert phi[c] == pytest.approx(float(torch.log(p / (1 - p)).mean()), rel=1e-5)
