"""Non-finite updates are the attacker's, never the model's: the fused norm and
finite check, and every aggregator leaving such rows out (counted against f), on
hand-computed cases; then rounds in process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpi import seeding
from fedmpi.aggregation import norms_and_finite
from fedmpi.config import load
from fedmpi.data import load as load_data
from fedmpi.models import FlatModel, build_model, init_weights
from fedmpi.privacy.client_level import CentralDP
from fedmpi.protocol import RECORD, RECORD_FIELDS, weighted_total
from fedmpi.rounds import PresummedMean, RuleAggregator, Updates
from fedmpi.server import ServerLoop
from fedmpi.worker import ClientHost, LocalClients

NAN, INF = np.nan, np.inf
F32_MAX = float(np.finfo(np.float32).max)


def test_norms_and_finite_by_hand():
    rows = np.array([[3, 4], [INF, 0], [NAN, 1], [-INF, NAN], [F32_MAX, F32_MAX]], dtype=np.float32)
    norms, finite = norms_and_finite(rows)
    assert finite.tolist() == [True, False, False, False, True]
    assert norms[0] == 5.0 and norms[1] == INF and np.isnan(norms[2]) and np.isnan(norms[3])
    assert norms[4] == pytest.approx(F32_MAX * np.sqrt(2), rel=1e-15)  # float64: no overflow
    # several column blocks (2 rows: 131072 columns a block), the bad value in the last one
    wide = np.ones((2, 300_000), dtype=np.float32)
    wide[1, -1] = NAN
    assert norms_and_finite(wide)[1].tolist() == [True, False]
    assert norms_and_finite(wide)[0][0] == pytest.approx(np.sqrt(300_000), rel=1e-15)
    # float64 rows: a finite 1e200 squares to inf, yet the row is finite
    assert norms_and_finite(np.array([[1e200, 0.0], [INF, 0.0]]))[1].tolist() == [True, False]


def _updates(rows, samples=None, finite_from_rows=True):
    rows = np.asarray(rows, dtype=np.float32)
    k = len(rows)
    records = np.zeros((k, len(RECORD_FIELDS)))
    records[:, RECORD["num_samples"]] = samples if samples is not None else 1
    finite = norms_and_finite(rows)[1] if finite_from_rows else None
    return Updates(cohort=np.arange(k), records=records, counts=[k], rows=rows, byzantine=np.zeros(k, bool),
                   finite=finite)


def test_krum_runs_on_the_finite_rows_with_f_reduced():
    # 7 slots, f = 2 (Krum needs 7 >= 2f + 3); slots 1 and 4 are not finite, so Krum runs on
    # the 5 values 0, 1, 2, 3, 10 with f = 2 - 2 = 0: each row's 3 nearest others give
    # 0: 1+4+9 = 14; 1: 1+1+4 = 6; 2: 1+1+4 = 6; 3: 1+4+9 = 14; 10: 49+64+81 = 194.
    # Tie 6/6: the lowest index (value 1, slot 2) wins.
    cfg = load(None, ["clients.total=7", "clients.per_round=7", "aggregator.name=krum", "aggregator.f=2"])
    result = RuleAggregator(cfg, 1)(_updates([[0], [NAN], [1], [2], [INF], [3], [10]]), 0)
    assert result.skipped is None and result.vector.tolist() == [1.0]
    assert result.selected.tolist() == [False, False, True, False, False, False, False]
    np.testing.assert_allclose(result.scores, [14, INF, 6, 6, INF, 14, 194], rtol=1e-12)


def test_too_few_finite_rows_skip_the_round():
    # 2 finite rows of 7 and f = max(0, 2 - 5) = 0: Krum needs n >= 3
    cfg = load(None, ["clients.total=7", "clients.per_round=7", "aggregator.name=krum", "aggregator.f=2"])
    result = RuleAggregator(cfg, 1)(_updates([[0], [NAN], [1], [NAN], [INF], [-INF], [NAN]]), 0)
    assert result.skipped == "krum needs n >= 2f + 3; got n = 2, f = 0 (n: rows per round reaching the aggregator)"
    assert result.vector.tolist() == [0.0] and not result.selected.any()
    assert np.isnan(result.scores[[0, 2]]).all() and np.isinf(result.scores[[1, 3, 4, 5, 6]]).all()
    nothing = RuleAggregator(load(None, ["clients.per_round=3"]), 1)(_updates([[NAN], [INF], [NAN]]), 0)
    assert nothing.skipped == "no finite update"


def test_trimmed_mean_and_fedavg_on_finite_rows():
    # trimmed mean, f = 2, one NaN row: f = 1 on 5, 1, 2, 3, 100 -> mean of 2, 3, 5
    cfg = load(None, ["clients.total=6", "clients.per_round=6", "aggregator.name=trimmed_mean", "aggregator.f=2"])
    result = RuleAggregator(cfg, 1)(_updates([[5], [NAN], [1], [2], [3], [100]]), 0)
    assert result.vector[0] == pytest.approx(10 / 3, rel=1e-15)
    assert result.scores.tolist() == [1, INF, 0, 1, 1, 0]
    assert result.selected.tolist() == [True, False, False, True, True, False]
    # FedAvg: weights 1, 2, 1 of the finite slots -> (1 * (1, 0) + 2 * (3, 2) + (0, 4)) / 4
    cfg = load(None, ["clients.total=4", "clients.per_round=4"])
    result = RuleAggregator(cfg, 2)(_updates([[1, 0], [NAN, 0], [3, 2], [0, 4]], samples=[1, 5, 2, 1]), 0)
    assert result.vector.tolist() == [1.75, 2.0]
    assert result.scores.tolist() == [0.25, INF, 0.5, 0.25] and result.selected.tolist() == [True, False, True, True]


def test_reduce_workers_sum_finite_rows_and_rank0_divides_by_their_samples():
    rows = np.array([[1, 0], [NAN, 0], [3, 2], [0, 4]], dtype=np.float32)
    records = np.zeros((4, len(RECORD_FIELDS)))
    records[:, RECORD["num_samples"]] = [1, 5, 2, 1]
    records[:, RECORD["finite"]] = [1, 0, 1, 1]
    total = weighted_total(rows, records)
    assert total.tolist() == [7.0, 8.0]  # 1 * (1, 0) + 2 * (3, 2) + 1 * (0, 4)
    records[:, RECORD["finite"]] = 0
    assert weighted_total(rows, records).tolist() == [0.0, 0.0]
    records[:, RECORD["finite"]] = [1, 0, 1, 1]
    updates = Updates(cohort=np.arange(4), records=records, counts=[4], total=total, finite=records[:, RECORD["finite"]] > 0)
    result = PresummedMean(load(None, ["clients.per_round=4", "transport=reduce"]), 2)(updates, 0)
    assert result.vector.tolist() == [1.75, 2.0] and result.scores.tolist() == [0.25, INF, 0.5, 0.25]
    assert result.selected.tolist() == [True, False, True, True] and result.skipped is None


def test_central_dp_leaves_non_finite_rows_out_of_the_clipped_sum():
    cfg = load(None, ["seed=5", "clients.total=4", "clients.per_round=4", "privacy.mode=client_central",
                      "privacy.noise_multiplier=0.5", "privacy.accountant=rdp"])
    updates = _updates([[3, 4], [NAN, NAN], [0.3, 0.4], [INF, 0]])
    result = CentralDP(cfg, 2)(updates, 3)
    noise = seeding.rng(5, "server_noise", 3).standard_normal(2)
    expected = (np.array([0.6, 0.8]) + np.float32([0.3, 0.4]) + 0.5 * 1.0 * noise) / 4  # (3, 4) clipped to norm 1
    np.testing.assert_allclose(result.vector, expected, rtol=1e-7)
    assert result.selected.tolist() == [True, False, True, False]
    assert result.clipped[[0, 2]].tolist() == [1.0, 0.0] and np.isnan(result.clipped[[1, 3]]).all()
    assert np.isinf(result.scores[[1, 3]]).all()


def test_simulate_is_the_aggregate_the_server_computes():
    cfg = load(None, ["clients.total=6", "clients.per_round=6", "aggregator.name=krum", "aggregator.f=1",
                      "aggregator.pre=[{name: nnm}]"])
    rows = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    aggregator = RuleAggregator(cfg, 4)
    simulated = aggregator.simulate(rows.copy(), 1, 0)
    actual = aggregator(_updates(rows), 0)
    np.testing.assert_array_equal(simulated.vector, actual.vector)
    assert simulated.selected.tolist() == np.flatnonzero(actual.selected).tolist()
    with pytest.raises(ValueError, match="krum needs n >= 2f"):
        aggregator.simulate(rows[:4], 1, 0)


# --------------------------------------------------------------------------- rounds in process


class FakeWriter:
    snapshot_every = 0

    def __init__(self):
        self.rounds, self.clients, self.status = [], [], None

    def append_round(self, round_record, client_records):
        self.rounds.append(round_record)
        self.clients.append(client_records)

    def checkpoint(self, *args):
        pass

    def stopped(self, status):
        self.status = status

    path = "fake.h5"


def _loop(overrides):
    torch.set_num_threads(1)
    cfg = load(None, ["rounds=2", "clients.total=8", "clients.per_round=8", "model.hidden=[16]", *overrides])
    data = load_data(cfg)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    model = FlatModel(module)
    clients = LocalClients(ClientHost(cfg, data, model), model.size, reduce=cfg.transport == "reduce")
    return ServerLoop(cfg, clients, data, model, init_weights(module, cfg.seed).copy(), FakeWriter(), quiet=True)


@pytest.mark.parametrize("pattern", ["inf", "one_nan"])
def test_a_round_records_and_excludes_non_finite_senders(pattern):
    loop = _loop(["attack.name=nonfinite", "attack.clients=[1, 6]", f"attack.params={{pattern: {pattern}}}",
                  "aggregator.name=median"])
    before = loop.weights.copy()
    loop.run_round(0)
    row, clients = loop.writer.rounds[0], loop.writer.clients[0]
    assert clients.finite.tolist() == (~clients.byzantine).tolist() and clients.byzantine.sum() == 2
    assert not clients.selected[clients.byzantine].any() and np.isinf(clients.score[clients.byzantine]).all()
    assert not np.isfinite(clients.update_norm[clients.byzantine]).any()
    assert row.nonfinite_updates == 2 and not row.aggregation_skipped and row.byzantine_selected == 0
    assert np.isfinite(loop.weights).all() and not np.array_equal(loop.weights, before)
    assert np.isnan(row.backdoor_accuracy) and loop.diverged is None


def test_a_model_made_non_finite_by_the_server_step_stops_the_run():
    # two of eight clients send +FLT_MAX everywhere: finite, so FedAvg takes them; the mean
    # (~FLT_MAX / 4) times server.lr = 10 overflows float32 in the server step
    loop = _loop(["attack.name=nonfinite", "attack.clients=[1, 6]", "attack.params={pattern: max}", "server.lr=10"])
    assert loop.run() == 4 and loop.writer.status == 4
    assert len(loop.writer.rounds) == 1 and "the global model holds NaN or infinite values" in loop.diverged
    assert "server.optimizer = avg" in loop.diverged
