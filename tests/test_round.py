"""One round in process (one process, a fake writer), and the round aggregator's
pre-aggregation steps with their slot-to-row mapping on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmpi import seeding
from fedmpi.aggregation import krum_scores
from fedmpi.config import load
from fedmpi.data import load as load_data
from fedmpi.models import FlatModel, build_model, init_weights
from fedmpi.protocol import RECORD, RECORD_FIELDS
from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS, ClientRecords, RoundRecord
from fedmpi.rounds import RuleAggregator, Updates
from fedmpi.server import ServerLoop, sample_cohort
from fedmpi.training import LocalTrainer
from fedmpi.worker import ClientHost, LocalClients


class FakeWriter:
    """Keeps what the loop would write."""

    snapshot_every = 0

    def __init__(self):
        self.rounds, self.clients = [], []

    def append_round(self, round_record, client_records):
        self.rounds.append(round_record)
        self.clients.append(client_records)


def _loop(overrides):
    torch.set_num_threads(1)
    cfg = load(None, ["rounds=2", "clients.total=8", "clients.per_round=4", "model.hidden=[16]", *overrides])
    data = load_data(cfg)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    weights = init_weights(module, cfg.seed).copy()
    model = FlatModel(module)
    clients = LocalClients(ClientHost(cfg, data, model), model.size, reduce=cfg.transport == "reduce")
    return cfg, data, ServerLoop(cfg, clients, data, model, weights, FakeWriter(), quiet=True)


def _updates_by_hand(cfg, data, weights, cohort, r):
    """Each client's update from a fresh trainer, independently of the loop."""
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    trainer = LocalTrainer(FlatModel(module), cfg)
    rows = np.empty((len(cohort), weights.size), dtype=np.float32)
    samples = []
    for i, cid in enumerate(cohort):
        x, y = data.client(int(cid))
        samples.append(trainer.train(weights, x, y, r, int(cid), rows[i]).num_samples)
    return rows, np.array(samples, dtype=np.float64)


def test_one_fedavg_round_in_process_matches_the_definition():
    cfg, data, loop = _loop([])
    before = loop.weights.copy()
    loop.run_round(0)
    cohort = sample_cohort(cfg, 0)
    rows, samples = _updates_by_hand(cfg, data, before, cohort, 0)
    expected = before.astype(np.float64) + (samples / samples.sum()) @ rows.astype(np.float64)
    np.testing.assert_allclose(loop.weights, expected.astype(np.float32), rtol=0, atol=1e-7)
    row, clients = loop.writer.rounds[0], loop.writer.clients[0]
    assert isinstance(row, RoundRecord) and isinstance(clients, ClientRecords)
    assert row.round == 0 and row.cohort_size == 4 and 0 <= row.test_accuracy <= 1
    assert np.isnan(row.epsilon) and row.byzantine_in_cohort == 0
    np.testing.assert_array_equal(clients.client_id, cohort)
    np.testing.assert_array_equal(clients.num_samples, samples)
    np.testing.assert_allclose(clients.score, samples / samples.sum())
    np.testing.assert_allclose(clients.update_norm, np.linalg.norm(rows.astype(np.float64), axis=1), rtol=1e-12)
    assert clients.selected.all() and not clients.byzantine.any()


def test_round_records_reject_a_missing_field():
    values = {name: 0 for name in ROUND_FIELDS}
    values.pop("train_loss")
    with pytest.raises(TypeError, match="train_loss"):
        RoundRecord(**values)
    with pytest.raises(TypeError):
        ClientRecords(**{name: 0 for name in CLIENT_FIELDS}, extra=1)


def test_omniscient_attack_and_krum_in_process():
    cfg, data, loop = _loop(["clients.per_round=8", "attack.name=ipm", "attack.clients=[2, 5]",
                             "attack.params={eps: 3.0}", "aggregator.name=krum"])
    loop.run_round(0)
    clients = loop.writer.clients[0]
    assert clients.byzantine.tolist() == [c in (2, 5) for c in clients.client_id]
    # krum keeps exactly one slot, an honest one, the one with the lowest score
    assert clients.selected.sum() == 1 and not (clients.selected & clients.byzantine).any()
    assert np.argmin(clients.score) == np.flatnonzero(clients.selected)[0]
    assert loop.writer.rounds[0].byzantine_selected == 0


def _updates(rows, samples=None):
    rows = np.asarray(rows, dtype=np.float32)
    k = len(rows)
    records = np.zeros((k, len(RECORD_FIELDS)))
    records[:, RECORD["num_samples"]] = samples if samples is not None else 1
    return Updates(cohort=np.arange(k), records=records, counts=[k], rows=rows, byzantine=np.zeros(k, bool))


def test_nnm_then_median_maps_rows_back_to_slots():
    # rows 0, 1, 3, 100 with f = 1: each row becomes the mean of its 3 nearest (itself included):
    # 0 -> {0,1,3} 4/3; 1 -> {0,1,3} 4/3; 3 -> {0,1,3} 4/3; 100 -> {1,3,100} 104/3.
    # median of [4/3, 4/3, 4/3, 104/3] (even n: rows at sorted positions 1 and 2, i.e. rows 1 and 2) = 4/3;
    # rows 1 and 2 are each made of slots {0, 1, 2}: those three are selected, slot 3 is not.
    cfg = load(None, ["clients.per_round=4", "aggregator.name=median", "aggregator.f=1", "aggregator.pre=[{name: nnm}]"])
    result = RuleAggregator(cfg, 1)(_updates([[0.0], [1.0], [3.0], [100.0]]), 0)
    np.testing.assert_allclose(result.vector, [4 / 3])
    assert result.selected.tolist() == [True, True, True, False]
    assert result.scores.tolist() == [0.0, 1.0, 1.0, 0.0]  # fraction of coordinates where each row was a middle value


def test_bucketing_then_krum_maps_buckets_back_to_slots():
    rows = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [50.0, 50.0], [1.0, 1.0]])
    cfg = load(None, ["seed=3", "clients.total=5", "clients.per_round=5", "aggregator.name=krum", "aggregator.f=0",
                      "aggregator.pre=[{name: bucketing, bucket_size: 2}]"])
    result = RuleAggregator(cfg, 2)(_updates(rows, samples=[1, 2, 3, 4, 5]), 7)
    # the shuffle is keyed by (seed, "bucketing", round, step index); buckets are consecutive pairs of it
    order = seeding.rng(3, "bucketing", 7, 0).permutation(5)
    buckets = [np.sort(order[i:i + 2]) for i in range(0, 5, 2)]
    means = np.array([rows[b].mean(axis=0) for b in buckets])
    sq = ((means[:, None, :] - means[None, :, :]) ** 2).sum(-1)
    scores = krum_scores(sq, 0)  # each bucket: squared distance to its 1 nearest other bucket
    best = int(np.argmin(scores))
    np.testing.assert_allclose(result.vector, means[best])
    slot_bucket = np.empty(5, dtype=int)
    for b, members in enumerate(buckets):
        slot_bucket[members] = b
    assert result.selected.tolist() == [slot_bucket[s] == best for s in range(5)]
    np.testing.assert_allclose(result.scores, scores[slot_bucket])


def test_clip_then_fedavg_keeps_slots_and_weights():
    cfg = load(None, ["clients.per_round=3", "aggregator.pre=[{name: clip, max_norm: 1.0}]"])
    result = RuleAggregator(cfg, 2)(_updates([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], samples=[1, 1, 2]), 0)
    # clipped rows: (0.6, 0.8), (0.3, 0.4), (0, 0); sample-weighted mean with weights 1/4, 1/4, 1/2
    np.testing.assert_allclose(result.vector, [0.225, 0.3], rtol=1e-7)
    np.testing.assert_allclose(result.scores, [0.25, 0.25, 0.5])
    assert result.selected.tolist() == [True, True, True]


def test_empty_cohort_leaves_the_model_unchanged():
    cfg = load(None, [])
    result = RuleAggregator(cfg, 3)(_updates(np.empty((0, 3))), 0)
    assert result.vector.tolist() == [0.0, 0.0, 0.0] and result.selected.size == 0
