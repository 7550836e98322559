"""transport: sharded on real mpirun jobs: every rule and pre-aggregation step over
column blocks against the rank-0 path, bitwise the same at 2, 3 and 5 ranks; whole
runs (records, model, checkpoint and resume with sharded state); the memory check."""

from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
import yaml

from conftest import REPO, run_job
from fedmpi import aggregation as agg
from fedmpi import attacks
from fedmpi.config import load
from fedmpi.protocol import RECORD, RECORD_FIELDS
from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS, read_checkpoint
from fedmpi.rounds import RuleAggregator, Updates

HELPER = REPO / "tests" / "helpers" / "sharded_rules.py"
TIMING = {"wall_s", "train_s", "comm_s", "aggregate_s", "eval_s"}


def _helper():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sharded_rules_helper", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rule_runs(tmp_path_factory):
    """The helper's decisions at 2, 3 and 5 ranks."""
    cwd = tmp_path_factory.mktemp("sharded_rules")
    out = {}
    for ranks in (2, 3, 5):
        proc = run_job(ranks, [cwd / f"r{ranks}.npz"], cwd, script=HELPER)
        assert proc.returncode == 0, proc.stderr
        out[ranks] = dict(np.load(cwd / f"r{ranks}.npz"))
    return out


def test_every_rule_and_step_is_bitwise_the_same_at_2_3_and_5_ranks(rule_runs):
    helper = _helper()
    assert {k.split("/")[0] for k in rule_runs[2]} == set(helper.CASES)
    for key, value in rule_runs[2].items():
        for ranks in (3, 5):
            assert value.tobytes() == rule_runs[ranks][key].tobytes(), f"{key} differs at {ranks} ranks"


@pytest.mark.parametrize("case", sorted(_helper().CASES))
def test_every_rule_and_step_over_blocks_matches_the_rank_0_path(rule_runs, case):
    helper = _helper()
    rows, samples = helper.rows_and_samples()
    cfg = load(None, helper.COMMON[:2] + helper.CASES[case])
    got = {k.split("/", 1)[1]: v for k, v in rule_runs[3].items() if k.startswith(case + "/")}
    # the rank-0 path: the attack on the rows, their check, the aggregator over the finite ones
    cohort = np.arange(helper.K)
    byzantine = np.isin(cohort, attacks.byzantine_clients(cfg.seed, cfg.clients.total, cfg.attack.fraction,
                                                          cfg.attack.clients))
    attack = attacks.ATTACKS[cfg.attack.name]
    if attack.on_server is not None:
        arrived = agg.norms_and_finite(rows)[1]
        attack.on_server(rows, byzantine, attacks.resolved_params(cfg),
                         attacks.ServerContext(round_index=0, cohort=cohort, finite=arrived, honest=~byzantine & arrived,
                                               f=cfg.aggregator.f, aggregate=None, rng=None))
    norms, finite = agg.norms_and_finite(rows)
    records = np.zeros((helper.K, len(RECORD_FIELDS)))
    records[:, RECORD["num_samples"]] = samples
    aggregator = RuleAggregator(cfg, helper.D)
    expected = aggregator(Updates(cohort, records, [helper.K], rows=rows.copy(), finite=finite), 0)
    sent = np.array([i in (9, 13) and not (attack.on_server is not None and byzantine[i]) for i in cohort])
    assert np.array_equal(got["finite"], finite) and np.array_equal(~finite, sent)  # a rank-0 attack replaces its rows
    np.testing.assert_allclose(got["row_norms"][finite], norms[finite], rtol=1e-12)
    assert np.array_equal(np.isnan(got["row_norms"]), sent & (cohort == 9)) and np.isinf(got["row_norms"][sent & (cohort == 13)]).all()
    assert str(got["skipped"]) == (expected.skipped or "")
    if expected.skipped is not None:  # every rank skipped it: nothing moved
        assert case == "skipped" and not got["vector"].any() and not got["selected"].any()
        return
    assert np.array_equal(got["selected"], expected.selected)
    vector = got["vector"]
    if cfg.aggregator.name in ("median", "trimmed_mean", "meamed", "bulyan", "krum") and not cfg.aggregator.pre \
            and attack.on_server is None:
        assert vector.tobytes() == expected.vector.tobytes()  # the same arithmetic on every column
    np.testing.assert_allclose(vector, expected.vector, rtol=1e-12, atol=1e-12 * np.abs(expected.vector).max())
    assert math.isclose(float(got["norm"][0]), float(np.linalg.norm(expected.vector)), rel_tol=1e-12)
    scores = got["scores"]
    scored = np.isfinite(expected.scores)
    assert np.array_equal(np.isfinite(scores), scored)
    # next to the 1e30 rows the others were recentred, so even Krum's sums of squared
    # distances agree to 1e-12 (tests/test_sharded.py covers near-identical rows)
    np.testing.assert_allclose(scores[scored], expected.scores[scored], rtol=1e-12)
    assert np.isinf(scores[~finite]).all()  # the non-finite rows: left out, scored +inf
    for key, value in aggregator.state.items():
        np.testing.assert_allclose(got[f"state/{key}"], value, rtol=1e-12, atol=1e-12 * np.abs(value).max())


# ---------------------------------------------------------------------------- whole runs

# Centered clipping after ARC and NNM, FedAdam, 3 of 12 clients sending NaN rows (left out,
# counting against f): distances, non-finite rows, and state in the optimizer and in
# the rule; 75 blocks of 16 columns (d = 1210). ALIE and IPM on columns: the helper's cases.
RUN_SET = {"clients.total": 12, "clients.per_round": 12, "model.hidden": [16], "aggregator.name": "centered_clipping",
           "aggregator.tau": 0.5, "aggregator.iterations": 2, "aggregator.pre": [{"name": "arc"}, {"name": "nnm"}],
           "attack.name": "nonfinite", "attack.fraction": 0.25, "server.optimizer": "fedadam", "shard_block": 16}
RUN = [*(arg for key, value in RUN_SET.items() for arg in ("--set", f"{key}={json.dumps(value)}")), "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sharded_runs")
    out = {}
    for name, ranks, transport in (("s2", 2, "sharded"), ("s3", 3, "sharded"), ("s5", 5, "sharded"),
                                   ("g3", 3, "gather")):
        proc = run_job(ranks, [*RUN, "--set", "rounds=3", "--set", f"transport={transport}",
                               *([] if transport == "sharded" else ["--set", "shard_block=4096"]), "--out", f"{name}.h5"], cwd)
        assert proc.returncode == 0, proc.stderr
        out[name] = cwd / f"{name}.h5"
    out["cwd"] = cwd
    return out


def _fields(path):
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        values = {f"{g}/{k}": f[g][k][:] for g, fields in (("rounds", ROUND_FIELDS), ("clients", CLIENT_FIELDS))
                  for k in fields if k not in TIMING}
        values["model/final"] = f["model/final"][:]
    round_index, weights, state = read_checkpoint(str(path))["history"]["checkpoint"]
    values.update({f"checkpoint/{k}": np.asarray(v) for k, v in state.items()})
    values["checkpoint/weights"], values["checkpoint/round"] = weights, np.array([round_index])
    return values


def test_sharded_runs_are_bitwise_the_same_at_2_3_and_5_ranks(runs):
    reference = _fields(runs["s3"])
    assert {"checkpoint/optimizer/m", "checkpoint/optimizer/v", "checkpoint/aggregator/center"} <= set(reference)
    for name in ("s2", "s5"):
        other = _fields(runs[name])
        for key, value in reference.items():
            assert value.tobytes() == other[key].tobytes(), f"{key} differs between 3 ranks and {name}"


def test_a_sharded_run_decides_as_the_gathered_run(runs):
    sharded, gathered = _fields(runs["s3"]), _fields(runs["g3"])
    for key in ("clients/selected", "clients/byzantine", "clients/client_id", "rounds/byzantine_selected",
                "clients/finite", "rounds/nonfinite_updates"):
        assert np.array_equal(sharded[key], gathered[key]), key
    assert (sharded["rounds/nonfinite_updates"] == 3).all() and not sharded["clients/finite"][sharded["clients/byzantine"]].any()
    for key in ("clients/score", "clients/update_norm", "rounds/update_norm"):
        np.testing.assert_allclose(sharded[key], gathered[key], rtol=1e-12, err_msg=key)  # inf and NaN where they are
    np.testing.assert_allclose(sharded["model/final"], gathered["model/final"], rtol=1e-6, atol=1e-7)
    for key in ("checkpoint/optimizer/m", "checkpoint/optimizer/v", "checkpoint/aggregator/center"):
        # the state gathered from the ranks' columns, in the layout of the whole model
        np.testing.assert_allclose(sharded[key], gathered[key], rtol=1e-6, atol=1e-12, err_msg=key)
    assert np.isfinite(sharded["rounds/test_accuracy"]).all()


def test_resume_with_sharded_state_on_another_rank_count_is_exact(runs):
    cwd = runs["cwd"]
    first = run_job(2, [*RUN, "--set", "rounds=2", "--set", "transport=sharded", "--out", "part.h5"], cwd)
    assert first.returncode == 0, first.stderr
    resumed = run_job(5, ["--resume", "part.h5", "--set", "rounds=3", "--quiet"], cwd)
    assert resumed.returncode == 0, resumed.stderr
    reference, other = _fields(runs["s3"]), _fields(cwd / "part.h5")
    for key, value in reference.items():
        assert value.tobytes() == other[key].tobytes(), f"{key} differs after resuming"


def test_sharded_runs_in_an_in_job_sweep_are_the_stand_alone_run(runs):
    """Two groups of 2 ranks in one 4-rank job (python -m fedmpi.sweep --in-job): the
    column transfers and block tree on each group's private communicator; seed 0's file
    holds what the stand-alone sharded run holds."""
    cwd = runs["cwd"] / "in_job"
    cwd.mkdir()
    grid = cwd / "grid.yaml"
    grid.write_text(yaml.safe_dump({"out": str(cwd / "sweep"), "seeds": [0, 1],
                                    "set": {**RUN_SET, "rounds": 3, "transport": "sharded"}}, sort_keys=False))
    proc = run_job(4, [grid, "--in-job", "--ranks-per-run", 2], cwd, module="fedmpi.sweep")
    assert proc.returncode == 0, proc.stderr
    reference, ours = _fields(runs["s3"]), _fields(cwd / "sweep" / "run-0000.h5")
    for key, value in reference.items():
        assert value.tobytes() == ours[key].tobytes(), f"{key} differs in the in-job sweep"
    assert _fields(cwd / "sweep" / "run-0001.h5")["rounds/round"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------- memory


MEMORY = ["--set", "clients.total=100", "--set", "clients.per_round=100", "--set", "model.hidden=[14000]",
          "--set", "rounds=1", "--set", "memory_limit_gb=0.55", "--quiet"]


def test_the_memory_check_accepts_on_sharded_ranks_what_rank_0_cannot_hold(tmp_path):
    """d = 1,050,010 and a cohort of 100: 0.39 GiB of rows. Rank 0 alone is refused at
    0.55 GiB; over 4 ranks each holds a quarter of the columns (rank 0 trains nothing,
    each worker a third of the cohort) and the run goes ahead."""
    refused = run_job(None, [*MEMORY, "--out", "g.h5"], tmp_path)
    assert refused.returncode == 2 and not (tmp_path / "g.h5").exists()
    assert "rank 0 would need about" in refused.stderr and "0.39 GiB of update rows" in refused.stderr
    accepted = run_job(4, [*MEMORY, "--set", "transport=sharded", "--out", "s.h5"], tmp_path)
    assert accepted.returncode == 0, accepted.stderr
    with h5py.File(tmp_path / "s.h5", "r", libver="latest", swmr=True) as f:
        assert f["rounds/round"].shape == (1,) and f["model/final"].shape == (1_050_010,)
    tight = run_job(4, [*MEMORY, "--set", "transport=sharded", "--set", "memory_limit_gb=0.4", "--out", "t.h5"], tmp_path)
    assert tight.returncode == 2 and "rank 1 of 4 would need about" in tight.stderr and "(on rank 1)" in tight.stderr
