"""transport: sharded on real mpirun jobs: every rule and pre-aggregation step over
column blocks against the rank-0 path, bitwise the same at 2, 3 and 5 ranks; whole
runs (records, model, checkpoint and resume with sharded state); the memory check."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from conftest import REPO, run_job
from fedmpi import aggregation as agg
from fedmpi import attacks
from fedmpi.config import load
from fedmpi.protocol import RECORD, RECORD_FIELDS
from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS
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
    # the rank-0 path: the attack on the rows, their norms, the aggregator over them
    cohort = np.arange(helper.K)
    byzantine = np.isin(cohort, attacks.byzantine_clients(cfg.seed, cfg.clients.total, cfg.attack.fraction,
                                                          cfg.attack.clients))
    attack = attacks.ATTACKS[cfg.attack.name]
    if attack.on_server is not None:
        attack.on_server(rows, byzantine, attacks.resolved_params(cfg.attack.name, cfg.attack.params, helper.K))
    norms = agg.row_norms(rows)
    records = np.zeros((helper.K, len(RECORD_FIELDS)))
    records[:, RECORD["num_samples"]] = samples
    aggregator = RuleAggregator(cfg, helper.D)
    expected = aggregator(Updates(cohort, records, [helper.K], rows=rows.copy()), 0)
    np.testing.assert_allclose(got["row_norms"], norms, rtol=1e-12)
    assert got["finite"].all()
    assert np.array_equal(got["selected"], expected.selected)
    vector = got["vector"]
    if cfg.aggregator.name in ("median", "trimmed_mean", "meamed", "bulyan", "krum") and not cfg.aggregator.pre:
        assert vector.tobytes() == expected.vector.tobytes()  # the same arithmetic on every column
    np.testing.assert_allclose(vector, expected.vector, rtol=1e-12, atol=1e-12 * np.abs(expected.vector).max())
    assert math.isclose(float(got["norm"][0]), float(np.linalg.norm(expected.vector)), rel_tol=1e-12)
    scores = got["scores"]
    finite = np.isfinite(expected.scores)
    assert np.array_equal(np.isfinite(scores), finite)
    # next to the 1e30 rows the others were recentred, so even Krum's sums of squared
    # distances agree to 1e-12 (tests/test_sharded.py covers near-identical rows)
    np.testing.assert_allclose(scores[finite], expected.scores[finite], rtol=1e-12)
    for key, value in aggregator.state.items():
        np.testing.assert_allclose(got[f"state/{key}"], value, rtol=1e-12, atol=1e-12 * np.abs(value).max())
