"""Rank-0 attacks in a round, in process: what the ServerContext gives them (the rule
in use, a keyed generator, checkpointed state) and that --resume stays exact with
mimic's state."""

from __future__ import annotations

import numpy as np
import torch

from fedmpi import attacks
from fedmpi.config import load
from fedmpi.data import load as load_data
from fedmpi.models import FlatModel, build_model, init_weights, layout
from fedmpi.results import ResultsWriter, read_checkpoint
from fedmpi.server import ServerLoop, sample_cohort
from fedmpi.worker import ClientHost, LocalClients


def _loop(overrides, writer=None):
    torch.set_num_threads(1)
    cfg = load(None, ["rounds=4", "clients.total=8", "clients.per_round=8", "model.hidden=[16]", *overrides])
    data = load_data(cfg)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    model = FlatModel(module)
    clients = LocalClients(ClientHost(cfg, data, model), model.size, reduce=False)
    loop = ServerLoop(cfg, clients, data, model, init_weights(module, cfg.seed).copy(), writer, quiet=True)
    return loop, module


def test_fang_krum_crafts_rows_against_the_rule_in_use():
    loop, _ = _loop(["attack.name=fang_krum", "attack.clients=[2, 5]", "aggregator.name=krum"])
    updates = loop.collect(0, sample_cohort(loop.cfg, 0))
    byz = updates.rows[updates.byzantine].astype(np.float64)
    honest = updates.rows[~updates.byzantine].astype(np.float64)
    # w1 = -lambda * sign(mean honest): every coordinate is 0 or +-lambda, against the honest direction
    lam = np.abs(byz[0][byz[0] != 0])
    assert np.allclose(lam, lam[0], rtol=1e-6) and lam[0] > 0
    signs = np.sign(honest.mean(axis=0))
    assert np.array_equal(np.sign(byz[0]), -signs)
    # the second row is w1 plus noise of at most 1e-5 / d per coordinate
    assert np.abs(byz[1] - byz[0]).max() <= 1e-5 / byz.shape[1] + 1e-6 * lam[0]
    # lambda came from the search against Krum over these rows, which the attack could simulate
    rows = np.concatenate([byz.astype(np.float32), honest.astype(np.float32)])
    chosen = loop.aggregator.simulate(rows, loop.cfg.aggregator.f, 0).selected
    upper = attacks.fang_krum_lambda(honest.astype(np.float32), 8, 2)
    assert lam[0] <= upper * (1 + 1e-6) and (chosen[0] < 2 or lam[0] <= 2e-5)


def test_optimised_alie_uses_the_rule_and_beats_the_default_z():
    loop, _ = _loop(["attack.name=alie_optimised", "attack.clients=[2, 5]", "aggregator.name=median"])
    updates = loop.collect(0, sample_cohort(loop.cfg, 0))
    honest = updates.rows[~updates.byzantine]
    vector, z = attacks.alie_optimised(honest, 8, 2, lambda rows: loop.aggregator.simulate(rows, 2, 0))
    np.testing.assert_array_equal(updates.rows[updates.byzantine][0], vector.astype(np.float32))
    mean = honest.astype(np.float64).mean(axis=0)

    def damage(zz):
        crafted = attacks.alie(honest, 8, 2, zz).astype(np.float32)
        rows = np.concatenate([honest, np.repeat(crafted[None], 2, axis=0)])
        return np.linalg.norm(loop.aggregator.simulate(rows, 2, 0).vector - mean)

    assert z > 0 and damage(z) >= damage(attacks.alie_zmax(8, 2))


def _mimic(path, rounds, resume_from=None):
    overrides = ["attack.name=mimic", "attack.clients=[1, 6]", "attack.params={warmup: 3}",
                 "aggregator.name=median", f"output.path={path}"]
    loop, module = _loop(overrides)
    start = 0
    history = None
    if resume_from is not None:
        history = read_checkpoint(resume_from)["history"]
        round_index, weights, state = history["checkpoint"]
        loop.load_state(weights, state)
        start = round_index + 1
    specs = [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "numel": s.numel} for s in layout(module)]
    loop.writer = ResultsWriter(str(path), config_yaml=loop.cfg.to_yaml(), world_size=1, seed=0, layout=specs,
                                overwrite=True, state_spec=loop.state_spec(), history=history)
    sent = []
    for r in range(start, rounds):
        loop.run_round(r)
        sent.append(int(loop.attack_state["target_id"]))
        loop.writer.checkpoint(r, loop.weights, loop.state())
    loop.writer.close()
    return loop, sent


def test_mimic_state_is_checkpointed_and_resume_is_exact(tmp_path):
    straight, targets = _mimic(tmp_path / "a.h5", 4)
    assert int(straight.attack_state["learnt"]) == 3  # learnt in rounds 0, 1, 2; frozen in round 3
    assert targets[3] == targets[2] and targets[0] not in (1, 6)  # an honest client, frozen after the warm-up
    _mimic(tmp_path / "b.h5", 2)
    resumed, _ = _mimic(tmp_path / "c.h5", 4, resume_from=tmp_path / "b.h5")
    assert resumed.weights.tobytes() == straight.weights.tobytes()
    for key, value in straight.attack_state.items():
        assert np.array_equal(resumed.attack_state[key], value), key
    # the Byzantine rows are copies of the target's row: the record of the last round shows equal norms
    from fedmpi.results import open_results

    with open_results(tmp_path / "a.h5") as f:
        last = f["clients/round"][:] == 3
        ids, norms = f["clients/client_id"][:][last], f["clients/update_norm"][:][last]
        assert norms[ids == 1][0] == norms[ids == 6][0] == norms[ids == targets[3]][0]
        assert "attack" in f["checkpoint/slot0"] and f["checkpoint/slot0/attack/z"].shape == straight.attack_state["z"].shape
