"""Audit canaries inside real mpirun jobs (fedmpi.canaries), read back from HDF5.

Small runs whose outcome can be computed by hand: one local DP-SGD step per client
(q = 1), so a Dirac canary moves the global model by exactly lr C / N at its
coordinate and nothing else; one round of central DP-FedAvg, where an inserted
canary shifts its cosine by 1/z null standard deviations. The measurements the
issue asks for (soundness, sensitivity, the estimate against the analytic epsilon)
are studies: tools/audit_study.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, run_job
from fedmpi import audit
from fedmpi.canaries import ClientCanaries, schedule
from fedmpi.config import ConfigError, from_mapping
from fedmpi.data import load as load_data
from fedmpi.models import FlatModel, build_model, init_weights
from fedmpi.privacy import client_level, hooks
from fedmpi.results import open_results

# one DP-SGD step per client and round: batch 200 >= every client's ~90 examples, so q = 1
ONE_STEP = ["--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1.0", "--set", "train.batch_size=200",
            "--set", "rounds=1"]


def _audit(f, group: str) -> dict:
    return {name: f[f"audit/{group}/{name}"][()] for name in f[f"audit/{group}"]}


def _initial_weights(f) -> np.ndarray:
    cfg = from_mapping({"model": {"hidden": [200, 200]}})
    module = build_model(cfg.model, tuple(f.attrs["model_input_shape"]), int(f.attrs["model_num_classes"]))
    return init_weights(module, int(f.attrs["seed"]))


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("settings, key, fragment", [
    ({"audit": {"canaries": {"count": 100}}}, "audit.canaries.count = 100", "need privacy.mode = sample"),
    ({"privacy": {"mode": "sample", "noise_multiplier": 1.0, "batch_sampling": "shuffle"},
      "audit": {"canaries": {"count": 100}}}, "audit.canaries.count = 100", "batch_sampling = poisson"),
    ({"privacy": {"mode": "sample", "noise_multiplier": 1.0}, "audit": {"canaries": {"count": 100, "k": 51}}},
     "audit.canaries.k = 51", "must be in 1..50"),
    ({"audit": {"canaries": {"k": 5}}}, "audit.canaries.k = 5", "set audit.canaries.count"),
    ({"privacy": {"mode": "sample", "noise_multiplier": 1.0}, "audit": {"canaries": {"count": 1}}},
     "audit.canaries.count = 1", ">= 2"),
    ({"audit": {"canaries": {"alpha": 1.0}}}, "audit.canaries.alpha = 1.0", "(0, 1)"),
    ({"privacy": {"mode": "sample", "noise_multiplier": 1.0}, "audit": {"client_canaries": {"count": 10}}},
     "audit.client_canaries.count = 10", "client_central or client_local"),
    ({"privacy": {"mode": "client_local", "noise_multiplier": 1.0}, "transport": "reduce",
      "audit": {"client_canaries": {"count": 10}}}, "audit.client_canaries.count = 10", "transport = gather"),
    ({"audit": {"client_canaries": {"scale": 0.5}}}, "audit.client_canaries.scale = 0.5", ">= 1"),
    ({"audit": {"client_canaries": {"repeats": -1}}}, "audit.client_canaries.repeats = -1", ">= 0"),
    ({"rounds": 3, "privacy": {"mode": "client_central", "noise_multiplier": 1.0}, "clients": {"sampling": "poisson"},
      "audit": {"client_canaries": {"count": 10, "repeats": 4}}}, "audit.client_canaries.repeats = 4", "<= rounds (3)"),
])
def test_audit_config_is_validated(settings, key, fragment):
    with pytest.raises(ConfigError) as err:
        from_mapping(settings)
    assert str(err.value).startswith(key) and fragment in str(err.value)


def test_k_defaults_to_a_tenth_and_the_bug_hook_is_no_config_key():
    cfg = from_mapping({"privacy": {"mode": "sample", "noise_multiplier": 1.0}, "audit": {"canaries": {"count": 1000}}})
    assert cfg.audit.canaries.k == 100
    with pytest.raises(ConfigError, match="unknown key"):
        from_mapping({"privacy": {"test_only_noise_scale": 0.1}})


def test_too_many_dirac_canaries_for_the_model_is_one_line(tmp_path):
    out = tmp_path / "out.h5"
    proc = run_job(2, ["--set", "model.name=logreg", "--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1",
                       "--set", "audit.canaries.count=1000", "--out", out, "--quiet"], tmp_path, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and not out.exists(), proc.stderr
    assert "audit.canaries.count = 1000: dirac canaries need a coordinate each, and the model has 650 parameters" in lines[0]


# --------------------------------------------------------------------------- example-level (DP-SGD)


@pytest.fixture(scope="module")
def dirac_runs(tmp_path_factory):
    """The same one-step round with 60 Dirac canaries on 2 ranks and on 1, and without canaries."""
    cwd = tmp_path_factory.mktemp("dirac")
    out = {}
    for name, ranks, extra in (("canaries", 2, ["--set", "audit.canaries.count=60"]),
                               ("canaries1", None, ["--set", "audit.canaries.count=60"]), ("plain", 2, [])):
        proc = run_job(ranks, [*ONE_STEP, *extra, "--out", f"{name}.h5"] + (["--quiet"] if name != "canaries" else []), cwd)
        assert proc.returncode == 0, proc.stderr
        out[name] = (cwd / f"{name}.h5", proc)
    return out


def test_a_dirac_canary_moves_only_its_coordinate_by_lr_c_over_n(dirac_runs):
    with open_results(dirac_runs["canaries"][0]) as f, open_results(dirac_runs["plain"][0]) as g:
        a = _audit(f, "canaries")
        diff = f["model/final"][:].astype(np.float64) - g["model/final"][:].astype(np.float64)
        total = int(f["clients/num_samples"][:].sum())
    moved = np.flatnonzero(diff)
    included = a["coordinate"][a["included"]]
    assert 15 < len(included) < 45
    assert sorted(moved.tolist()) == sorted(included.tolist())  # every other weight is bitwise the same
    # client update -lr (g + C e_k) / n_c, FedAvg weight n_c / N, server lr 1: -lr C / N, in float32 steps
    np.testing.assert_allclose(diff[included], -0.05 * 1.0 / total, rtol=2e-3)


def test_dirac_audit_record_is_consistent_and_rank_invariant(dirac_runs):
    path, proc = dirac_runs["canaries"]
    with open_results(path) as f, open_results(dirac_runs["canaries1"][0]) as g:
        a, b = _audit(f, "canaries"), _audit(g, "canaries")
        initial, final = _initial_weights(f), f["model/final"][:]
        assert f["model/final"][:].tobytes() == g["model/final"][:].tobytes()
    for name in a:
        assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name
    m, k = int(a["count"]), int(a["k"])
    assert (m, k, int(a["guesses"]), a["alpha"], a["delta"]) == (60, 6, 12, 0.05, 1e-5)
    assert len(set(a["coordinate"].tolist())) == m and np.all(a["example"] == -1) and np.all(a["label"] == -1)
    score = initial[a["coordinate"]].astype(np.float64) - final[a["coordinate"]].astype(np.float64)
    np.testing.assert_array_equal(a["score"], score)
    order = np.argsort(-score, kind="stable")
    assert np.all(a["guess"][order[:k]] == 1) and np.all(a["guess"][order[-k:]] == -1)
    assert np.sum(a["guess"] == 0) == m - 2 * k
    right = int(np.sum((a["guess"] == 1) & a["included"]) + np.sum((a["guess"] == -1) & ~a["included"]))
    assert a["correct"] == right
    assert a["epsilon_lower_bound"] == audit.one_run_epsilon(2 * k, right, m, 1e-5, 0.05)
    assert (f"one-run audit lower bound {a['epsilon_lower_bound']:.3g} (60 dirac canaries, {right}/12 guesses right, 95%)"
            in proc.stdout)


def test_input_canaries_are_mislabelled_examples_scored_by_their_loss(tmp_path):
    proc = run_job(2, [*ONE_STEP, "--set", "audit.canaries.count=40", "--set", "audit.canaries.kind=input",
                       "--set", "audit.canaries.k=5", "--out", "input.h5", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open_results(tmp_path / "input.h5") as f:
        a = _audit(f, "canaries")
        final = f["model/final"][:]
    data = load_data(from_mapping({}), need_train=True, need_test=False)
    xs, true = [], []
    for cid, example in zip(a["client_id"], a["example"]):
        x, y = data.client(int(cid))
        assert 0 <= example < len(y)
        xs.append(x[example])
        true.append(int(y[example]))
    assert np.all(a["label"] != np.array(true)) and np.all((a["label"] >= 0) & (a["label"] < 10))
    assert np.all(a["coordinate"] == -1)
    model = FlatModel(build_model(from_mapping({}).model, data.input_shape, data.num_classes))
    model.set_weights(final)
    with torch.no_grad():
        loss = F.cross_entropy(model.module(torch.from_numpy(np.stack(xs))), torch.from_numpy(a["label"]), reduction="none")
    np.testing.assert_allclose(a["score"], -loss.double().numpy(), rtol=1e-6)
    assert a["epsilon_lower_bound"] == audit.one_run_epsilon(10, int(a["correct"]), 40, 1e-5, 0.05)


def test_injected_bug_hook_scales_dp_noise_only_when_set(monkeypatch):
    update = np.zeros(20_000, dtype=np.float32)
    client_level.privatise_update(update, 1.0, 2.0, 0, 0, 0)
    monkeypatch.setenv(hooks.NOISE_SCALE_ENV, "0.1")
    buggy = np.zeros(20_000, dtype=np.float32)
    client_level.privatise_update(buggy, 1.0, 2.0, 0, 0, 0)
    np.testing.assert_allclose(buggy, 0.1 * update, rtol=1e-5)  # the same keyed draw, a tenth of it
    assert float(np.std(update)) == pytest.approx(2.0, rel=0.03)
    monkeypatch.setenv(hooks.NOISE_SCALE_ENV, "-1")
    with pytest.raises(ValueError, match="FEDMPI_TEST_ONLY_NOISE_SCALE = '-1': must be a number > 0"):
        hooks.noise_scale()


def test_injected_bug_is_announced_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(hooks.NOISE_SCALE_ENV, "0.1")
    proc = run_job(2, [*ONE_STEP, "--out", "bug.h5", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "FEDMPI_TEST_ONLY_NOISE_SCALE = 0.1 (test only)" in proc.stderr
    with open_results(tmp_path / "bug.h5") as f:
        assert f.attrs["test_only_noise_scale"] == 0.1


# --------------------------------------------------------------------------- client-level (DP-FedAvg)

CENTRAL = ["--set", "privacy.mode=client_central", "--set", "privacy.noise_multiplier=1.0",
           "--set", "clients.sampling=poisson", "--set", "audit.client_canaries.count=300", "--set", "eval.every=3",
           "--set", "audit.client_canaries.repeats=0", "--set", "output.checkpoint_every=1", "--quiet"]


def test_canary_schedule_presents_each_inserted_canary_exactly_repeats_times():
    cfg = from_mapping({"rounds": 7, "privacy": {"mode": "client_central", "noise_multiplier": 1.0},
                        "clients": {"sampling": "poisson"}, "audit": {"client_canaries": {"count": 200, "repeats": 3}}})
    canaries = ClientCanaries(cfg, np.zeros(5, dtype=np.float32), np.array([10.0]))
    taken = np.zeros((200, 7), dtype=np.int64)
    for t in range(7):
        taken[canaries.cohort(t), t] += 1
    assert 70 < canaries.included.sum() < 130
    # blocks [0, 2), [2, 4), [4, 7) of the 7 rounds: exactly one round in each, inserted canaries only
    for lo, hi in ((0, 2), (2, 4), (4, 7)):
        np.testing.assert_array_equal(taken[:, lo:hi].sum(axis=1), canaries.included.astype(np.int64))
    # within a block of L rounds the 200 positions go to round i L // 200: 100 + 100, and 67 + 67 + 66 for L = 3
    rounds = schedule(cfg.seed, 200, 3, 7)
    assert np.bincount(rounds[:, 0], minlength=7).tolist() == [100, 100, 0, 0, 0, 0, 0]
    assert np.bincount(rounds[:, 1], minlength=7).tolist() == [0, 0, 100, 100, 0, 0, 0]
    assert np.bincount(rounds[:, 2], minlength=7).tolist() == [0, 0, 0, 0, 67, 67, 66]
    assert rounds.tobytes() == schedule(cfg.seed, 200, 3, 7).tobytes() != schedule(cfg.seed + 1, 200, 3, 7).tobytes()


def test_resume_cannot_stretch_a_canary_schedule(tmp_path):
    proc = run_job(2, ["--set", "privacy.mode=client_central", "--set", "privacy.noise_multiplier=1.0", "--set",
                       "clients.sampling=poisson", "--set", "rounds=1", "--set", "audit.client_canaries.count=10",
                       "--out", "one.h5", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_job(2, ["--resume", "one.h5", "--set", "rounds=2", "--quiet"], tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "rounds = 2: cannot change on --resume with audit.client_canaries.repeats = 1" in lines[0]
    with open_results(tmp_path / "one.h5") as f:
        a = _audit(f, "client_canaries")
        assert a["repeats"] == 1 and f["rounds/round"].shape == (1,)
        np.testing.assert_array_equal(a["participations"], a["included"].astype(np.int64))


@pytest.fixture(scope="module")
def central_runs(tmp_path_factory):
    """Central DP-FedAvg (q = 1, z = 1) with 300 canary clients: 3 rounds straight, and 2 rounds
    resumed to 3."""
    cwd = tmp_path_factory.mktemp("central")
    for name, rounds in (("straight", 3), ("resumed", 2)):
        proc = run_job(2, [*CENTRAL, "--set", f"rounds={rounds}", "--out", f"{name}.h5"], cwd)
        assert proc.returncode == 0, proc.stderr
    proc = run_job(2, ["--resume", "resumed.h5", "--set", "rounds=3", "--quiet"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "straight.h5", cwd / "resumed.h5"


def test_canary_clients_shift_their_cosine_by_one_over_z(central_runs):
    with open_results(central_runs[0]) as f:
        a = _audit(f, "client_canaries")
        assert f["rounds/cohort_size"][:].tolist() == [16, 16, 16]  # the canaries are not clients of the run
        assert f["clients/client_id"][:].max() < 16
        eps_run = float(f["privacy/epsilon"][()])
    d = int(a["dim"])
    inserted = a["included"]
    assert d == 55_210 and 120 < inserted.sum() < 180
    np.testing.assert_array_equal(a["participations"], 3 * inserted)  # q = 1: every round
    # T rounds of S u_j under noise z S: the final cosine is (T S + N(0, T z^2 S^2)) / |w_T - w_0|, i.e. about
    # N(sqrt(T) / z, 1) / sqrt(d); absent canaries N(0, 1) / sqrt(d)
    seen, absent = a["final_cosine"][inserted] * math.sqrt(d), a["final_cosine"][~inserted] * math.sqrt(d)
    assert seen.mean() == pytest.approx(math.sqrt(3), abs=4 / math.sqrt(len(seen)))
    assert abs(absent.mean()) < 4 / math.sqrt(len(absent)) and 0.85 < absent.std() < 1.15
    # per round N(1/z, 1) and N(0, 1): the maximum of 3 has mean 1 + 0.846 and 0.846, std 0.75
    top_seen, top_absent = a["max_cosine"][inserted] * math.sqrt(d), a["max_cosine"][~inserted] * math.sqrt(d)
    assert top_seen.mean() == pytest.approx(1.846, abs=4 * 0.75 / math.sqrt(len(seen)))
    assert top_absent.mean() == pytest.approx(0.846, abs=4 * 0.75 / math.sqrt(len(absent)))
    assert a["epsilon_final"] == audit.gaussian_canary_epsilon(a["final_cosine"][inserted], d, 1e-5)
    null = a["max_cosine"][~inserted]
    standardised = (a["max_cosine"][inserted] - null.mean()) / null.std(ddof=1)
    assert a["epsilon_max_cosine"] == pytest.approx(audit.gaussian_canary_epsilon(standardised, 1, 1e-5), rel=1e-12)
    assert 0.3 * eps_run < a["epsilon_final"] < 2 * eps_run


def test_resume_keeps_the_canary_state_exact(central_runs):
    with open_results(central_runs[0]) as f, open_results(central_runs[1]) as g:
        assert f["model/final"][:].tobytes() == g["model/final"][:].tobytes()
        a, b = _audit(f, "client_canaries"), _audit(g, "client_canaries")
    for name in a:
        assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), name


def test_every_audit_dataset_is_documented(dirac_runs, central_runs):
    doc = (REPO / "docs" / "results.md").read_text()
    for path, group in ((dirac_runs["canaries"][0], "canaries"), (central_runs[0], "client_canaries")):
        with open_results(path) as f:
            section = doc.split(f"`/audit/{group}`")[1].split("\n## ")[0]
            for name in f[f"audit/{group}"]:
                assert f"| `{name}` |" in section, f"/audit/{group}/{name} is not in docs/results.md"
    assert "`test_only_noise_scale`" in doc
