"""Real mpirun jobs under attack: what the defence decided, read back from HDF5."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CONFIGS, run_job
from fedmpi.protocol import EXIT_DIVERGED
from fedmpi.results import open_results

SIGN_FLIP = ["--set", "clients.total=20", "--set", "clients.per_round=20", "--set", "attack.name=sign_flip",
             "--set", "attack.fraction=0.2", "--set", "attack.params={lambda: 10}", "--quiet"]


@pytest.fixture(scope="module")
def sign_flip_runs(tmp_path_factory):
    """digits, 20 clients all per round, 4 sign-flipping (lambda = 10), 20 rounds."""
    cwd = tmp_path_factory.mktemp("signflip")
    jobs = {
        "fedavg_attacked": SIGN_FLIP,
        "krum_attacked": [*SIGN_FLIP, "--set", "aggregator.name=krum"],
        "fedavg_clean": ["--set", "clients.total=20", "--set", "clients.per_round=20", "--quiet"],
    }
    out = {}
    for name, args in jobs.items():
        proc = run_job(3, [*args, "--out", f"{name}.h5"], cwd)
        # FedAvg under attack diverges: the honest clients' training from its model overflows
        assert proc.returncode == (EXIT_DIVERGED if name == "fedavg_attacked" else 0), proc.stderr
        out[name] = cwd / f"{name}.h5"
    return out


def _final_accuracy(path):
    with open_results(path) as f:
        return float(f["rounds/test_accuracy"][-1])


def test_krum_resists_sign_flipping_where_fedavg_breaks(sign_flip_runs):
    fedavg, krum, clean = (_final_accuracy(sign_flip_runs[k]) for k in ("fedavg_attacked", "krum_attacked", "fedavg_clean"))
    print(f"final accuracy: FedAvg attacked {fedavg:.4f}, Krum attacked {krum:.4f}, FedAvg clean {clean:.4f}")
    assert fedavg <= 0.5
    assert krum >= clean - 0.05
    assert clean >= 0.8


def test_records_show_what_krum_selected(sign_flip_runs):
    with open_results(sign_flip_runs["krum_attacked"]) as f:
        byz_ids = set(f.attrs["byzantine_clients"].tolist())
        assert len(byz_ids) == 4
        cfg_f = f.attrs["config"]
        assert "f: 4" in cfg_f  # f defaulted to the declared attackers
        rounds = f["clients/round"][:]
        selected = f["clients/selected"][:].reshape(20, 20)
        byzantine = f["clients/byzantine"][:].reshape(20, 20)
        ids = f["clients/client_id"][:].reshape(20, 20)
        scores = f["clients/score"][:].reshape(20, 20)
        assert np.array_equal(np.bincount(rounds), np.full(20, 20))
        assert (selected.sum(axis=1) == 1).all()  # Krum picks one slot per round
        assert not (selected & byzantine).any()  # never a Byzantine one
        assert all(set(ids[r][byzantine[r]].tolist()) == byz_ids for r in range(20))
        for r in range(20):  # the selected slot has the lowest score
            assert scores[r][selected[r]][0] == scores[r].min()
        picked = [int(ids[r][selected[r]][0]) for r in range(20)]
        print("Krum picked clients:", picked)
        np.testing.assert_array_equal(f["rounds/byzantine_in_cohort"][:], 4)
        np.testing.assert_array_equal(f["rounds/byzantine_selected"][:], 0)
        # Byzantine rows are sign-flipped x10: their norms dwarf the honest ones
        norms = f["clients/update_norm"][:].reshape(20, 20)
        assert norms[0][byzantine[0]].min() > 5 * norms[0][~byzantine[0]].max()
    with open_results(sign_flip_runs["fedavg_attacked"]) as f:
        nonfinite = f["rounds/nonfinite_updates"][:]
        assert f["run/exit_status"][()] == EXIT_DIVERGED and nonfinite[-1] == 20  # the round it stopped after
        learning = nonfinite == 0  # before its honest clients' training began to overflow
        assert learning.sum() >= 10
        np.testing.assert_array_equal(f["rounds/byzantine_selected"][:][learning], 4)
        assert f["clients/selected"][:][np.repeat(learning, 20)].all()


def test_alie_rows_are_identical_and_runs_are_rank_invariant(tmp_path):
    args = ["--config", CONFIGS / "digits_alie_multikrum.yaml", "--set", "rounds=3", "--quiet"]
    finals = []
    for ranks in (2, 4):
        proc = run_job(ranks, [*args, "--out", f"alie{ranks}.h5"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        with open_results(tmp_path / f"alie{ranks}.h5") as f:
            finals.append(f["model/final"][:].tobytes())
            byz = f["clients/byzantine"][:]
            rounds = f["clients/round"][:]
            norms = f["clients/update_norm"][:]
            for r in range(3):
                in_round = norms[(rounds == r) & byz]
                assert len(in_round) >= 1 and np.all(in_round == in_round[0])  # colluding: one vector
    assert finals[0] == finals[1]
