"""FedProx, SCAFFOLD and heterogeneous devices: the definitions on hand-checked cases,
the equivalences with FedAvg, SCAFFOLD against a framework-free implementation of
the paper, and real mpirun jobs (rank-count invariance, exact resume)."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, run_job
from fedmpi import devices, seeding
from fedmpi.config import ConfigError, load
from fedmpi.data import load as load_data
from fedmpi.models import FlatModel, build_model, init_weights
from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS
from fedmpi.server import ServerLoop
from fedmpi.training import LocalTrainer
from fedmpi.worker import ClientHost, LocalClients

HELPERS = REPO / "tests" / "helpers"
TIMING = {"wall_s", "train_s", "comm_s", "aggregate_s", "eval_s"}


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.name=scaffold", "aggregator.name=median"], "only aggregator.name = fedavg"),
    (["algorithm.name=scaffold", "transport=reduce"], "transport: reduce never gathers"),
    (["algorithm.name=scaffold", "transport=sharded"], "transport: sharded never gathers"),
    (["transport=sharded", "devices.dropout=0.2"], "devices.dropout = 0.2: drops updates from the round"),
    (["transport=sharded", "devices.stragglers=0.5"], "devices.stragglers = 0.5: with devices.partial_work = drop"),
    (["algorithm.name=scaffold", "privacy.mode=client_local", "privacy.noise_multiplier=1"], "reach the server unprotected"),
    (["algorithm.mu=0.5"], "only used with algorithm.name = fedprox (algorithm.name is fedavg)"),
    (["algorithm.name=fedprox", "algorithm.mu=-1"], "algorithm.mu = -1.0: must be >= 0"),
    (["devices.stragglers=1.5"], "devices.stragglers = 1.5: must be in [0, 1]"),
    (["devices.dropout=1"], "devices.dropout = 1.0: must be in [0, 1)"),
    (["devices.speed_sigma=0.5"], "only used with devices.deadline"),
    (["devices.deadline=0"], "devices.deadline = 0.0: must be > 0"),
    (["devices.partial_work=later"], "devices.partial_work = 'later': must be one of use, drop"),
])
def test_bad_algorithm_and_device_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError) as err:
        load(None, overrides)
    assert message in str(err.value)


def test_partial_work_defaults_to_the_algorithm():
    assert load(None, []).devices.partial_work == "drop"
    assert load(None, ["algorithm.name=fedprox"]).devices.partial_work == "use"
    assert load(None, ["algorithm.name=scaffold"]).devices.partial_work == "use"
    assert load(None, ["algorithm.name=fedprox", "devices.partial_work=drop"]).devices.partial_work == "drop"


# --------------------------------------------------------------------------- devices


def test_device_draws_follow_their_definition():
    cfg = load(None, ["clients.total=40", "clients.per_round=20", "devices.stragglers=0.3", "devices.dropout=0.25",
                      "algorithm.name=fedprox"])
    cohort = np.arange(0, 40, 2)
    draws = [devices.cohort_draws(cfg, r, cohort) for r in range(200)]
    assert all(d.straggler.sum() == 6 for d in draws)  # round(0.3 x 20), every round
    assert abs(np.mean([d.dropout.mean() for d in draws]) - 0.25) < 0.02
    # keyed by (seed, round, client): a slot's dropout does not depend on the rest of the cohort
    again = devices.cohort_draws(cfg, 7, cohort[5:])
    assert (again.dropout == draws[7].dropout[5:]).all()
    # a straggler does 1..K-1 steps, uniformly; others their full work
    work = [devices.local_work(cfg, r, 3, 10, True, False) for r in range(2000)]
    assert {w for w, _ in work} == set(range(1, 10)) and {code for _, code in work} == {devices.USED}
    assert devices.local_work(cfg, 0, 3, 10, False, False) == (10, devices.USED)
    assert devices.local_work(cfg, 0, 3, 1, True, False) == (1, devices.USED)
    assert devices.local_work(cfg, 0, 3, 10, False, True) == (0, devices.DROPOUT)
    drop = load(None, ["devices.stragglers=0.5"])
    assert drop.devices.partial_work == "drop" and devices.local_work(drop, 0, 3, 10, True, False) == (0, devices.PARTIAL)


def test_deadline_cuts_or_drops_by_client_speed():
    cfg = load(None, ["algorithm.name=fedprox", "devices.deadline=8", "devices.speed_sigma=1.0"])
    cut = load(None, ["devices.deadline=8", "devices.speed_sigma=1.0"])  # fedavg: partial work dropped
    for cid in range(16):
        v = devices.speed(cfg, cid)
        assert v == float(np.random.Generator(np.random.PCG64(np.random.SeedSequence(0, spawn_key=(seeding.PURPOSES["speed"], cid))))
                          .lognormal(0.0, 1.0))
        fits = math.floor(8 * v)
        steps, code = devices.local_work(cfg, 0, cid, 20, False, False)
        if fits >= 20:
            assert (steps, code) == (20, devices.USED)
        elif fits == 0:
            assert (steps, code) == (0, devices.DEADLINE)
        else:
            assert (steps, code) == (fits, devices.USED)
            assert devices.local_work(cut, 0, cid, 20, False, False) == (0, devices.DEADLINE)


# --------------------------------------------------------------------------- FedProx and DP-SGD


def _trainer(overrides):
    torch.set_num_threads(1)
    cfg = load(None, ["model.hidden=[16]", *overrides])
    data = load_data(cfg)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    return cfg, data, LocalTrainer(FlatModel(module), cfg), init_weights(module, cfg.seed).copy()


def test_proximal_term_is_added_after_per_example_clipping_and_noise():
    """Two DP-SGD steps with mu = 0 and mu = 0.5: the first step is the same (w = w_global);
    the second sees the same weights, batch and noise, so the privatised gradient is the
    same and the updates differ by exactly lr mu (w_1 - w_global): the proximal gradient is
    neither clipped per example nor scaled by the batch size, and the per-example norms
    (what the sensitivity C bounds) do not move."""
    dp = ["privacy.mode=sample", "privacy.noise_multiplier=1.0", "privacy.max_grad_norm=0.5",
          "privacy.batch_sampling=shuffle", "train.batch_size=8", "train.lr=0.2"]
    cfg, data, plain, w = _trainer(dp)
    prox = _trainer([*dp, "algorithm.name=fedprox", "algorithm.mu=0.5"])[2]
    x, y = data.client(3)
    d = w.size
    one, two, two_mu, one_mu = (np.empty(d, dtype=np.float32) for _ in range(4))
    plain.train(w, x, y, 0, 3, one, max_steps=1)
    prox.train(w, x, y, 0, 3, one_mu, max_steps=1)
    assert one.tobytes() == one_mu.tobytes()
    r0 = plain.train(w, x, y, 0, 3, two, max_steps=2)
    r1 = prox.train(w, x, y, 0, 3, two_mu, max_steps=2)
    assert r0.steps == r1.steps == 2 and r0.clipped_fraction == r1.clipped_fraction > 0
    np.testing.assert_allclose(two_mu - two, -0.2 * 0.5 * one.astype(np.float64), atol=2e-7, rtol=1e-5)
    assert np.abs(two_mu - two).max() > 1e-3  # the term is there


def test_fedprox_with_mu_zero_is_fedavg_bit_for_bit_and_mu_changes_it():
    devices_on = ["devices.stragglers=0.5", "devices.dropout=0.2", "devices.partial_work=use"]
    fedavg = _rounds(devices_on, 3)
    assert _rounds([*devices_on, "algorithm.name=fedprox", "algorithm.mu=0"], 3) == fedavg
    assert _rounds([*devices_on, "algorithm.name=fedprox", "algorithm.mu=0.5"], 3)[0] != fedavg[0]


class _Writer:
    snapshot_every = 0

    def __init__(self):
        self.clients = []

    def append_round(self, round_record, client_records):
        self.clients.append(client_records)


def _loop(overrides):
    torch.set_num_threads(1)
    cfg = load(None, ["clients.total=8", "clients.per_round=4", "model.hidden=[16]", *overrides])
    data = load_data(cfg)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    model = FlatModel(module)
    clients = LocalClients(ClientHost(cfg, data, model), model.size, reduce=False)
    return ServerLoop(cfg, clients, data, model, init_weights(module, cfg.seed).copy(), _Writer(), quiet=True)


def _rounds(overrides, rounds):
    """(final weights bytes, every client field of every round as bytes) of an in-process run."""
    loop = _loop(overrides)
    for r in range(rounds):
        loop.run_round(r)
    fields = [name for name in CLIENT_FIELDS if name not in TIMING]
    return loop.weights.tobytes(), [getattr(c, name).tobytes() for c in loop.writer.clients for name in fields]


def test_scaffold_first_round_is_fedavg_bit_for_bit():
    """Round 0: every control variate is 0, so with server.lr = 1 SCAFFOLD is FedAvg; from
    round 1 on the corrections c - c_i are not 0 and the runs part."""
    assert _rounds(["algorithm.name=scaffold"], 1) == _rounds([], 1)
    assert _rounds(["algorithm.name=scaffold"], 2)[0] != _rounds([], 2)[0]


# --------------------------------------------------------------------------- SCAFFOLD against the paper


def _softmax_grad(w, b, x, y):
    """Gradient of the mean cross-entropy of softmax(x w^T + b), float64."""
    z = x @ w.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return p.T @ x, p.sum(axis=0)


def scaffold_reference(x0, clients, cohorts, lr, epochs, global_lr, total):
    """SCAFFOLD (Karimireddy et al. 2020, Algorithm 1, option II), written from the paper
    for multinomial logistic regression with full-batch local steps, one process, numpy:
    returns the server model after every round, c, and every c_i."""
    dim_w = x0[0].shape
    x = [x0[0].astype(np.float64), x0[1].astype(np.float64)]
    c = [np.zeros(dim_w), np.zeros(x0[1].shape)]
    ci = {i: [np.zeros(dim_w), np.zeros(x0[1].shape)] for i in range(total)}
    models = []
    for cohort in cohorts:
        dx = [np.zeros(dim_w), np.zeros(x0[1].shape)]
        dc = [np.zeros(dim_w), np.zeros(x0[1].shape)]
        for i in cohort:
            xi, yi = clients[i]
            y = [x[0].copy(), x[1].copy()]
            for _ in range(epochs):  # K = epochs local steps, each on the full local data
                g = _softmax_grad(y[0], y[1], xi, yi)
                y = [y[j] - lr * (g[j] - ci[i][j] + c[j]) for j in range(2)]
            new = [ci[i][j] - c[j] + (x[j] - y[j]) / (epochs * lr) for j in range(2)]
            for j in range(2):
                dx[j] += (y[j] - x[j]) / len(cohort)
                dc[j] += (new[j] - ci[i][j]) / len(cohort)
            ci[i] = new
        x = [x[j] + global_lr * dx[j] for j in range(2)]
        c = [c[j] + len(cohort) / total * dc[j] for j in range(2)]
        models.append(np.concatenate([x[0].ravel(), x[1]]))
    return models, np.concatenate([c[0].ravel(), c[1]]), {i: np.concatenate([v[0].ravel(), v[1]]) for i, v in ci.items()}


def test_scaffold_matches_a_framework_free_implementation_of_the_paper(tmp_path):
    rng = np.random.default_rng(5)
    total, per_client, dim, classes = 8, 24, 6, 3
    centers = rng.normal(0, 2, (classes, dim))
    y_train = rng.integers(0, classes, total * per_client)
    x_train = (centers[y_train] + rng.normal(0, 1.5, (len(y_train), dim))).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_train[:20], y_test=y_train[:20])
    overrides = ["data.name=npz", f"data.path={tmp_path / 'd.npz'}", "data.normalize=none", "model.name=logreg",
                 f"clients.total={total}", "clients.per_round=4", "train.batch_size=32", "train.epochs=3",
                 "train.lr=0.1", "server.lr=0.7", "algorithm.name=scaffold", "rounds=4", "output.snapshot_every=1"]
    proc = run_job(None, [*[a for o in overrides for a in ("--set", o)], "--out", "s.h5", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = load(None, overrides)
    data = load_data(cfg)
    clients = {i: (data.client(i)[0].astype(np.float64), data.client(i)[1]) for i in range(total)}
    assert {len(v[1]) for v in clients.values()} == {per_client}  # equal sizes: the paper's weights
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    w0 = init_weights(module, cfg.seed)
    x0 = (w0[:classes * dim].reshape(classes, dim), w0[classes * dim:])
    with h5py.File(tmp_path / "s.h5", "r") as f:
        cohorts = f["clients/client_id"][:].reshape(4, 4)
        snapshots = f["model/snapshots"][:]
        slot = int(f["checkpoint/current"][0])
        control = f[f"checkpoint/slot{slot}/algorithm/control"][:]
        client_control = f[f"checkpoint/slot{slot}/clients/control"][:]
    models, c, ci = scaffold_reference(x0, clients, cohorts.tolist(), 0.1, 3, 0.7, total)
    for r in range(4):
        np.testing.assert_allclose(snapshots[r], models[r], atol=1e-6, rtol=0)
    np.testing.assert_allclose(control, c, atol=1e-6, rtol=0)
    for i in range(total):
        np.testing.assert_allclose(client_control[i], ci[i], atol=1e-6, rtol=0)
    assert np.abs(control).max() > 1e-2  # the control variates are not trivially 0


# --------------------------------------------------------------------------- real jobs


BASE = ["rounds=5", "clients.total=12", "clients.per_round=6", "model.hidden=[16]", "output.checkpoint_every=2",
        "output.snapshot_every=1", "devices.stragglers=0.5", "devices.dropout=0.2", "devices.deadline=10",
        "devices.speed_sigma=0.6"]
SCAFFOLD = [*BASE, "algorithm.name=scaffold", "server.lr=0.9"]
FEDPROX = [*BASE, "algorithm.name=fedprox", "algorithm.mu=0.1"]


def _args(overrides, out):
    return [*[a for o in overrides for a in ("--set", o)], "--out", out, "--quiet"]


def _same_run(a_path, b_path):
    """Bit for bit: final and snapshot models, every non-timing round and client field, and
    the last checkpoint (weights, server state, every client's state)."""
    with h5py.File(a_path, "r", libver="latest", swmr=True) as a, h5py.File(b_path, "r", libver="latest", swmr=True) as b:
        for name in ("model/final", "model/snapshots"):
            assert a[name][:].tobytes() == b[name][:].tobytes(), name
        for group, fields in (("rounds", ROUND_FIELDS), ("clients", CLIENT_FIELDS)):
            for name in fields:
                if name not in TIMING:
                    assert a[group][name][:].tobytes() == b[group][name][:].tobytes(), f"/{group}/{name}"
        slots = [f"checkpoint/slot{int(f['checkpoint/current'][0])}" for f in (a, b)]
        assert int(a["checkpoint/current"][1]) == int(b["checkpoint/current"][1])
        names = []
        a[slots[0]].visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in names:
            assert a[slots[0]][name][()].tobytes() == b[slots[1]][name][()].tobytes(), name


@pytest.fixture(scope="module")
def scaffold_reference_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("scaffold")
    proc = run_job(None, _args(SCAFFOLD, "ref.h5"), cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "ref.h5"


def test_scaffold_with_devices_records_what_each_slot_did(scaffold_reference_run):
    with h5py.File(scaffold_reference_run, "r") as f:
        c = {name: f["clients"][name][:] for name in ("dropped", "steps", "update_norm", "selected", "num_samples")}
        slot = int(f["checkpoint/current"][0])
        last = f[f"checkpoint/slot{slot}/clients/last_round"][:]
        ids, rounds = f["clients/client_id"][:], f["clients/round"][:]
    dropped = c["dropped"] != 0
    assert set(np.unique(c["dropped"])) <= {0, 1, 2} and dropped.sum() >= 3
    assert (c["steps"][dropped] == 0).all() and np.isnan(c["update_norm"][dropped]).all()
    assert not c["selected"][dropped].any() and c["selected"][~dropped].all()
    full = np.ceil(c["num_samples"] / 10).astype(int)
    assert (c["steps"][~dropped] < full[~dropped]).sum() >= 12  # stragglers and the deadline cut work
    # a client's control variate changes in the rounds its update arrived, and only then
    for cid in range(12):
        arrived = rounds[(ids == cid) & ~dropped]
        assert last[cid] == (arrived.max() if len(arrived) else -1)


def test_scaffold_on_2_ranks_with_a_file_store_is_bitwise_the_1_rank_run(tmp_path, scaffold_reference_run):
    proc = run_job(2, _args([*SCAFFOLD, "algorithm.state_store=file"], "r2.h5"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    _same_run(scaffold_reference_run, tmp_path / "r2.h5")
    assert not list(tmp_path.glob("*.client-state"))  # the file store is removed when the run ends


def test_scaffold_resumes_exactly_after_a_crash(tmp_path, scaffold_reference_run):
    """Rounds 0-3 run on 3 ranks, round 4 on 2 after the resume: the file equals the
    1-rank run's, so this is also the 3-rank invariance check."""
    # rank 0 fails in round 4: the checkpoint after round 3 (slots written after rounds 1 and 3) is what is left
    crashed = run_job(3, ["0", "4", "--", *_args(SCAFFOLD, "crash.h5")], tmp_path, script=HELPERS / "fail_on_rank.py")
    assert crashed.returncode != 0
    with h5py.File(tmp_path / "crash.h5", "r", libver="latest", swmr=True) as f:
        assert int(f["checkpoint/current"][1]) == 3
    resumed = run_job(2, ["--resume", "crash.h5", "--set", "algorithm.state_store=file", "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _same_run(scaffold_reference_run, tmp_path / "crash.h5")


def test_fedprox_with_devices_is_rank_invariant_and_resumes_exactly(tmp_path):
    """Rounds 0-3 on 3 ranks, stopped as by SIGTERM, rounds 4.. on 2 ranks: bitwise the 1-rank run."""
    reference = run_job(None, _args(FEDPROX, "ref.h5"), tmp_path)
    assert reference.returncode == 0, reference.stderr
    stopped = run_job(3, ["3", "--", *_args(FEDPROX, "stop.h5")], tmp_path, script=HELPERS / "stop_after_round.py")
    assert stopped.returncode == 75, stopped.stderr
    resumed = run_job(2, ["--resume", "stop.h5", "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _same_run(tmp_path / "ref.h5", tmp_path / "stop.h5")
    with h5py.File(tmp_path / "ref.h5", "r") as f:
        config = yaml.safe_load(f.attrs["config"])
        assert config["devices"]["partial_work"] == "use" and (f["clients/dropped"][:] == 1).any()


# --------------------------------------------------------------------------- the memory check


def test_client_state_of_1000_clients_by_100k_parameters_goes_to_a_file_store(tmp_path):
    """1000 clients x 105,010 parameters (MLP 64-1400-10) = 420 MB of control variates,
    over what a 0.7 GiB budget leaves (after about 0.6 GiB of torch, data and working
    memory): the run keeps them in a file store, and its checkpoint holds only the rows
    of the clients that took part."""
    overrides = ["algorithm.name=scaffold", "clients.total=1000", "clients.per_round=10", "model.hidden=[1400]",
                 "rounds=2", "memory_limit_gb=0.7"]
    proc = run_job(None, _args(overrides, "big.h5"), tmp_path)
    assert proc.returncode == 0, proc.stderr
    with h5py.File(tmp_path / "big.h5", "r") as f:
        assert f.attrs["client_state_store"] == "file"
        assert f["model"].attrs["num_params"] == 105010
        slot = int(f["checkpoint/current"][0])
        group = f[f"checkpoint/slot{slot}/clients"]
        touched = int((group["last_round"][:] >= 0).sum())
        assert 10 <= touched <= 20 and group["control"].shape == (1000, 105010)
        assert group["control"].id.get_storage_size() == touched * 105010 * 4  # one chunk per client row
    assert not (tmp_path / "big.h5.client-state").exists()


def test_client_state_that_fits_neither_memory_nor_disk_is_refused(tmp_path):
    """1000 clients x 1.5e9 parameters: 5.5 TiB of control variates."""
    out = tmp_path / "out.h5"
    overrides = ["algorithm.name=scaffold", "clients.total=1000", "clients.per_round=2", "model.hidden=[20000000]",
                 "memory_limit_gb=200"]
    proc = run_job(2, _args(overrides, out), tmp_path, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedmpi: config error: clients.total = 1000: algorithm.name = scaffold keeps 1 row(s) of "
                               "1500000010 parameters per client: 1000 clients x 1500000010 x 4 bytes = 5587.94 GiB, which "
                               "fits neither rank 0's memory"), lines[0]
    assert "nor the disk" in lines[0] and proc.stdout == ""
    assert not out.exists() and not list(tmp_path.iterdir())
