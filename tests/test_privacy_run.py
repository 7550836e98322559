"""Real mpirun jobs with differential privacy, read back from HDF5."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CONFIGS, run_job
from fedmpi.privacy import accounting
from fedmpi.results import open_results

DP_SGD = ["--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1.0", "--set", "privacy.max_grad_norm=1.0"]


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory):
    """digits, 16 clients, DP-SGD sigma = 1, C = 1, on 2 and 3 ranks; and the same run without DP."""
    cwd = tmp_path_factory.mktemp("dp")
    out = {}
    for name, ranks, args in (("dp3", 3, DP_SGD), ("dp2", 2, DP_SGD), ("plain", 3, [])):
        proc = run_job(ranks, ["--config", CONFIGS / "digits_mlp.yaml", *args, "--out", f"{name}.h5", "--quiet"], cwd)
        assert proc.returncode == 0, proc.stderr
        out[name] = (cwd / f"{name}.h5", proc)
    return out


def test_epsilon_recorded_every_round_and_growing(dp_runs):
    path, proc = dp_runs["dp3"]
    with open_results(path) as f:
        eps = f["rounds/epsilon"][:]
        assert len(eps) == 20 and np.all(np.isfinite(eps)) and np.all(eps > 0)
        assert np.all(np.diff(eps) > 0)
        assert np.all(f["rounds/epsilon_median"][:] <= eps)
        np.testing.assert_array_equal(f["rounds/noise_multiplier"][:], 1.0)
        np.testing.assert_array_equal(f["rounds/clip_norm"][:], 1.0)
        np.testing.assert_array_equal(f["rounds/delta"][:], 1e-5)
        clipped = f["rounds/clipped_fraction"][:]
        assert np.all((clipped > 0) & (clipped <= 1))
        assert f.attrs["dp_mode"] == "sample" and "pld" in f.attrs["dp_accountant"]
        final_pld = float(f["privacy/epsilon"][()])
        assert f["privacy/accountant"][()] == b"pld"
        acc_dp = float(f["rounds/test_accuracy"][-1])
        # each client holds 89 or 90 samples: q = 10/n, 9 steps per round, all 20 rounds
        q = 10 / f["clients/num_samples"][:].min()
        assert eps[-1] == pytest.approx(accounting.epsilon(1.0, q, 20 * 9, 1e-5, "rdp"), rel=1e-9)
        assert 0 < final_pld <= eps[-1]  # PLD is tighter than RDP
    with open_results(dp_runs["plain"][0]) as f:
        acc_plain = float(f["rounds/test_accuracy"][-1])
        assert np.all(np.isnan(f["rounds/epsilon"][:]))
    print(f"DP-SGD sigma=1 C=1: accuracy {acc_dp:.4f}, epsilon {eps[-1]:.3f} (RDP) / {final_pld:.3f} (PLD) at "
          f"delta 1e-5; without DP: accuracy {acc_plain:.4f}")
    assert acc_dp > 0.5 and acc_plain > acc_dp


def test_dp_runs_are_rank_invariant(dp_runs):
    with open_results(dp_runs["dp3"][0]) as a, open_results(dp_runs["dp2"][0]) as b:
        assert a["model/final"][:].tobytes() == b["model/final"][:].tobytes()
        assert a["rounds/epsilon"][:].tobytes() == b["rounds/epsilon"][:].tobytes()


def test_central_client_dp_with_poisson_cohorts(tmp_path):
    args = ["--set", "clients.total=40", "--set", "clients.per_round=10", "--set", "clients.sampling=poisson",
            "--set", "privacy.mode=client_central", "--set", "privacy.noise_multiplier=0.8",
            "--set", "privacy.max_grad_norm=0.5", "--set", "rounds=6", "--set", "privacy.accountant=rdp"]
    proc = run_job(3, [*args, "--out", "c.h5", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open_results(tmp_path / "c.h5") as f:
        sizes = f["rounds/cohort_size"][:]
        assert len(set(sizes.tolist())) > 1  # Poisson cohorts vary
        assert len(f["clients/client_id"]) == sizes.sum()
        eps = f["rounds/epsilon"][:]
        expected = [accounting.epsilon(0.8, 0.25, r + 1, 1e-5, "rdp") for r in range(6)]
        np.testing.assert_allclose(eps, expected, rtol=1e-12)
        assert f["privacy/epsilon"][()] == pytest.approx(expected[-1])


def test_target_epsilon_is_met_by_the_run(tmp_path):
    args = ["--set", "privacy.mode=sample", "--set", "privacy.target_epsilon=4", "--set", "privacy.accountant=rdp",
            "--set", "rounds=5"]
    proc = run_job(2, [*args, "--out", "t.h5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "calibrated for epsilon 4" in proc.stdout
    with open_results(tmp_path / "t.h5") as f:
        final = float(f["privacy/epsilon"][()])
        assert final <= 4.0 and final == pytest.approx(4.0, rel=0.01)
        sigma = float(f.attrs["dp_noise_multiplier"])
        assert f"noise multiplier {sigma:.4f}" in proc.stdout


def test_dp_with_robust_aggregator(tmp_path):
    args = ["--set", "privacy.mode=client_local", "--set", "privacy.noise_multiplier=0.01",
            "--set", "privacy.max_grad_norm=5", "--set", "aggregator.name=trimmed_mean", "--set", "aggregator.f=2",
            "--set", "attack.name=sign_flip", "--set", "attack.fraction=0.125", "--set", "rounds=4"]
    proc = run_job(3, [*args, "--out", "r.h5", "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with open_results(tmp_path / "r.h5") as f:
        assert np.all(np.isfinite(f["rounds/epsilon"][:]))
        byz = f["clients/byzantine"][:]
        clipped = f["clients/clipped_fraction"][:]
        assert np.all(np.isnan(clipped[byz])) and np.all(np.isin(clipped[~byz], [0.0, 1.0]))
        assert f["rounds/test_accuracy"][-1] > 0.5
