"""Real mpirun jobs with clients that send anything: every rule (FedAvg and central DP
included) keeps a finite, learning model when 20% of the clients send NaN or inf; the
workers check rows before pre-summing (transport: reduce); a diverging run stops with
exit status 4 and a readable file; the backdoor's success rate is recorded."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, run_job
from fedmpi.aggregation import RULES
from fedmpi.protocol import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OK
from fedmpi.results import open_results, status

BASE = ["--set", "rounds=3", "--set", "clients.total=15", "--set", "clients.per_round=15", "--set", "model.hidden=[32]",
        "--set", "attack.fraction=0.2"]
PATTERNS = ["nan", "inf", "-inf", "mixed", "one_nan"]
CASES = {rule: ["--set", f"aggregator.name={rule}", "--set", "attack.name=nonfinite",
                "--set", f"attack.params={{pattern: {PATTERNS[i % len(PATTERNS)]}}}"] for i, rule in enumerate(RULES)}
CASES["central_dp"] = ["--set", "attack.name=nonfinite", "--set", "attack.params={pattern: mixed}",
                       "--set", "privacy.mode=client_central", "--set", "privacy.noise_multiplier=0.1",
                       "--set", "privacy.max_grad_norm=5", "--set", "privacy.accountant=rdp"]
CASES["reduce"] = ["--set", "attack.name=nonfinite", "--set", "attack.params={pattern: one_nan}", "--set", "transport=reduce"]
CASES["gather"] = ["--set", "attack.name=nonfinite", "--set", "attack.params={pattern: one_nan}"]
CASES["overflow"] = ["--set", "attack.name=nonfinite", "--set", "attack.params={pattern: max}", "--set", "server.lr=10"]
CASES["backdoor"] = ["--set", "attack.name=backdoor", "--set", "eval.every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case as one run of a single mpirun -n 3 job (tests/helpers/several_runs.py)."""
    cwd = tmp_path_factory.mktemp("byzantine")
    args = []
    for name, case in CASES.items():
        args += [*BASE, *case, "--out", f"{name}.h5", "++"]
    proc = run_job(3, args[:-1], cwd, script=REPO / "tests" / "helpers" / "several_runs.py")
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("status "))
    print(f"{len(CASES)} runs in one job: {proc.wall_s:.1f} s")
    return {name: (cwd / f"{name}.h5", int(statuses[str(i)])) for i, name in enumerate(CASES)}, proc.stderr


def _read(path):
    with open_results(path) as f:
        return {name: f[name][()] for name in ("rounds/test_accuracy", "rounds/nonfinite_updates",
                                               "rounds/byzantine_in_cohort", "rounds/aggregation_skipped",
                                               "rounds/backdoor_accuracy", "clients/finite", "clients/byzantine",
                                               "clients/selected", "clients/score", "clients/update_norm",
                                               "model/final", "run/exit_status", "run/finished")}


@pytest.mark.parametrize("case", [*RULES, "central_dp", "reduce"])
def test_every_rule_keeps_a_finite_learning_model_when_20_percent_send_nan_or_inf(runs, case):
    files, _ = runs
    path, exit_status = files[case]
    r = _read(path)
    acc = r["rounds/test_accuracy"]
    print(f"{case}: accuracy per round {np.round(acc, 3).tolist()}")
    assert exit_status == EXIT_OK and r["run/exit_status"] == 0 and r["run/finished"] == 1
    assert np.isfinite(r["model/final"]).all()
    assert (np.diff(acc) > 0).all() and acc[-1] > 0.25  # it learns, round after round
    byz = r["clients/byzantine"]
    assert byz.sum() == 3 * 3  # 3 of 15 clients in each of 3 rounds
    np.testing.assert_array_equal(r["clients/finite"], ~byz)
    assert not r["clients/selected"][byz].any() and np.isinf(r["clients/score"][byz]).all()
    assert not np.isfinite(r["clients/update_norm"][byz]).any()
    np.testing.assert_array_equal(r["rounds/nonfinite_updates"], r["rounds/byzantine_in_cohort"])
    assert not r["rounds/aggregation_skipped"].any()


def test_workers_check_rows_before_pre_summing(runs):
    files, _ = runs
    reduce, gather = _read(files["reduce"][0]), _read(files["gather"][0])
    # the worker-side check (one row at a time) finds what rank 0 finds on the gathered rows
    np.testing.assert_array_equal(reduce["clients/finite"], gather["clients/finite"])
    np.testing.assert_allclose(reduce["clients/update_norm"][reduce["clients/finite"]],
                               gather["clients/update_norm"][gather["clients/finite"]], rtol=1e-12)
    # FedAvg of the same finite rows, summed on the workers or on rank 0
    np.testing.assert_allclose(reduce["model/final"], gather["model/final"], rtol=0, atol=1e-6)


def test_a_model_that_overflows_stops_the_run_after_that_round(runs):
    files, stderr = runs
    path, exit_status = files["overflow"]
    r = _read(path)
    assert exit_status == EXIT_DIVERGED and r["run/exit_status"] == EXIT_DIVERGED and r["run/finished"] == 0
    assert len(r["rounds/test_accuracy"]) == 1  # the round that made the model non-finite is kept
    assert status(str(path)) == ("diverged", 1)
    assert "fedmpi: the run diverged in round 1: the global model holds NaN or infinite values" in stderr


def test_backdoor_success_rate_is_measured_every_evaluated_round(runs):
    files, _ = runs
    r = _read(files["backdoor"][0])
    asr = r["rounds/backdoor_accuracy"]
    assert np.isnan(asr[0]) and np.isfinite(asr[1:]).all() and ((asr[1:] >= 0) & (asr[1:] <= 1)).all()
    assert r["clients/finite"].all()


def test_a_diverging_run_stops_every_rank_with_status_4(tmp_path):
    proc = run_job(2, ["--set", "rounds=5", "--set", "train.lr=1000", "--out", "d.h5", "--quiet"], tmp_path)
    assert proc.returncode == EXIT_DIVERGED, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "diverged" in ln]
    assert lines == ["fedmpi: the run diverged in round 1: no honest client's update was finite (local training "
                     "diverged); check the learning rates (train.lr = 1000, server.lr = 1); stopped after it (exit "
                     "status 4); its rounds are in d.h5"]
    assert "warning: round 1: the local training loss of 16 of 16 honest clients is not finite" in proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    r = _read(tmp_path / "d.h5")
    assert len(r["rounds/test_accuracy"]) == 1 and r["run/exit_status"] == EXIT_DIVERGED
    assert r["rounds/nonfinite_updates"].tolist() == [16] and r["rounds/aggregation_skipped"].tolist() == [True]
    resumed = run_job(None, ["--resume", "d.h5"], tmp_path)
    assert resumed.returncode == EXIT_BAD_INPUT
    assert resumed.stderr.strip().splitlines()[-1] == ("fedmpi: config error: --resume = 'd.h5': the run diverged and "
                                                       "stopped (exit status 4); resuming it would diverge again")
