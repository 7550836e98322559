"""Real `mpirun` jobs of fedmpi, checked through the HDF5 files they write."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch
import yaml

from conftest import CONFIGS, REPO, make_idx_dataset, run_job
from fedmpi.config import from_mapping
from fedmpi.data import load as load_data
from fedmpi.models import FlatModel, build_model
from fedmpi.results import open_results
from fedmpi.training import evaluate


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The reference workload, configs/digits_mlp.yaml, on 3 ranks."""
    cwd = tmp_path_factory.mktemp("digits")
    proc = _ok(run_job(3, ["--config", CONFIGS / "digits_mlp.yaml", "--out", "digits.h5"], cwd))
    return proc, cwd / "digits.h5"


def test_digits_mlp_reaches_target_accuracy(digits_run):
    proc, path = digits_run
    with open_results(path) as f:
        acc = f["rounds/test_accuracy"][:]
        assert f["rounds/round"][:].tolist() == list(range(20))
        assert acc[-1] >= 0.80, f"final accuracy {acc[-1]:.4f}"
        assert acc[-1] > acc[0] + 0.3  # it learned, it did not start there
    # one progress line per round, the last one carrying the final accuracy
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("round ")]
    assert len(lines) == 20
    assert f"acc {acc[-1]:.4f}" in lines[-1]


def test_results_file_layout(digits_run):
    _, path = digits_run
    with open_results(path) as f:
        assert f.attrs["fedmpi_version"]
        assert f.attrs["world_size"] == 3
        assert f.attrs["seed"] == 0
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", f.attrs["start_time"])
        cfg = yaml.safe_load(f.attrs["config"])
        assert cfg["clients"] == {"total": 16, "per_round": 16, "sampling": "fixed"}
        assert cfg["data"]["normalize"] == "standard"  # resolved, not the null default
        # one /clients row per round and cohort slot
        rounds = f["clients/round"][:]
        assert len(rounds) == 20 * 16
        np.testing.assert_array_equal(np.bincount(rounds), np.full(20, 16))
        np.testing.assert_array_equal(f["clients/slot"][:], np.tile(np.arange(16), 20))
        ids = f["clients/client_id"][:].reshape(20, 16)
        assert all(sorted(r) == list(range(16)) for r in ids)  # all 16 clients every round
        samples = f["clients/num_samples"][:].reshape(20, 16)
        assert (samples.sum(axis=1) == 1438).all()  # 80% of the 1797 digits, every round
        assert (f["clients/update_norm"][:] > 0).all()
        assert f["run/finished"][()] == 1
        assert f["model/final_round"][()] == 19
        for name in ("wall_s", "train_s", "comm_s", "aggregate_s", "eval_s"):
            assert (f["rounds"][name][:] >= 0).all()


def test_final_model_rebuilds_from_file_and_reproduces_accuracy(digits_run):
    """The layout in /model is enough to rebuild the model; evaluating /model/final
    on the same test split gives the accuracy recorded for the last round."""
    _, path = digits_run
    with open_results(path) as f:
        cfg = from_mapping(yaml.safe_load(f.attrs["config"]))
        layout = yaml.safe_load(f["model"].attrs["layout"])
        final = f["model/final"][:]
        recorded = f["rounds/test_accuracy"][-1], f["rounds/test_loss"][-1]
    data = load_data(cfg, need_train=False)
    module = build_model(cfg.model, data.input_shape, data.num_classes)
    assert [(s["name"], tuple(s["shape"])) for s in layout] == [(n, tuple(p.shape)) for n, p in module.named_parameters()]
    assert final.dtype == np.float32 and final.size == sum(s["numel"] for s in layout) == 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    torch.set_num_threads(1)
    loss, acc = evaluate(FlatModel(module), final, data.x_test, data.y_test, 1000)
    assert acc == pytest.approx(recorded[0], abs=1e-12)
    assert loss == pytest.approx(recorded[1], rel=1e-6)


def test_bitwise_identical_final_model_across_rank_counts(tmp_path):
    """Same config, 1 process (no mpirun), 2, 3 and 5 ranks: identical bytes.

    The config exercises what could break it: cohort sampling (10 of 20 clients),
    uneven slot splits, momentum and weight decay on the clients, FedAvgM state.
    """
    args = ["--set", "rounds=4", "--set", "clients.total=20", "--set", "clients.per_round=10",
            "--set", "train.momentum=0.9", "--set", "train.weight_decay=0.0001",
            "--set", "server.optimizer=fedavgm", "--set", "data.partition.name=dirichlet", "--quiet"]
    finals, metrics = {}, {}
    for ranks in (None, 2, 3, 5):
        out = tmp_path / f"r{ranks}.h5"
        _ok(run_job(ranks, [*args, "--out", out], tmp_path))
        with open_results(out) as f:
            finals[ranks] = f["model/final"][:].tobytes()
            metrics[ranks] = (f["rounds/test_loss"][:].tobytes(), f["clients/client_id"][:].tolist(),
                              f["clients/update_norm"][:].tobytes())
            assert f.attrs["world_size"] == (ranks or 1)
    for ranks in (2, 3, 5):
        assert finals[ranks] == finals[None], f"{ranks} ranks differ from 1 process"
        assert metrics[ranks] == metrics[None]


def test_mnist_cnn_config_on_generated_idx_files(tmp_path):
    make_idx_dataset(tmp_path / "idx", n_train=1000, n_test=200)
    proc = _ok(run_job(3, ["--config", CONFIGS / "mnist_cnn.yaml", "--set", f"data.dir={tmp_path / 'idx'}",
                           "--set", "rounds=4", "--set", "eval.every=2", "--out", "cnn.h5"], tmp_path, timeout=400))
    with open_results(tmp_path / "cnn.h5") as f:
        assert f["model"].attrs["num_params"] == 1_663_370  # McMahan et al.'s CNN on 28x28
        acc = f["rounds/test_accuracy"][:]
        assert np.isnan(acc[0]) and np.isfinite(acc[1]) and np.isnan(acc[2])  # eval.every = 2
        assert acc[-1] > 0.3, acc  # chance is 0.1
        assert len(f["clients/client_id"]) == 4 * 10
        assert (f["clients/num_samples"][:] == 10).all()  # 1000 samples in 100 clients x 2 shards
    assert proc.stdout.count("round ") == 4


@pytest.mark.parametrize("failing_rank", [2, 0])
def test_exception_on_one_rank_ends_the_job(tmp_path, failing_rank):
    helper = REPO / "tests" / "helpers" / "fail_on_rank.py"
    proc = run_job(3, [failing_rank, 1, "--", "--out", "x.h5", "--set", "rounds=50"], tmp_path, timeout=120,
                   script=helper)
    end = time.time()
    assert proc.returncode != 0
    injected = re.search(r"injecting failure at ([\d.]+)", proc.stderr)
    assert injected, proc.stderr
    assert end - float(injected.group(1)) < 10, "the job took more than 10 s to end after the failure"
    assert "injected failure" in proc.stderr and "Traceback" in proc.stderr
    assert f"rank {failing_rank} failed" in proc.stderr
    # rounds completed before the failure were kept
    with open_results(tmp_path / "x.h5") as f:
        assert len(f["rounds/round"]) >= 1


def test_sixteen_rank_smoke_equals_two_ranks(tmp_path):
    args = ["--set", "rounds=2", "--quiet"]
    _ok(run_job(16, [*args, "--out", "r16.h5"], tmp_path, timeout=400))
    _ok(run_job(2, [*args, "--out", "r2.h5"], tmp_path))
    with open_results(tmp_path / "r16.h5") as a, open_results(tmp_path / "r2.h5") as b:
        assert a.attrs["world_size"] == 16
        assert len(a["rounds/round"]) == 2
        assert a["model/final"][:].tobytes() == b["model/final"][:].tobytes()


def test_reduce_transport_matches_gather(tmp_path):
    """transport: reduce sums weighted updates on the workers (one MPI Reduce); FedAvg
    gives the same model as gathering every row, up to float64 summation order."""
    args = ["--set", "rounds=5", "--set", "clients.total=20", "--set", "clients.per_round=10", "--quiet"]
    for transport, ranks in (("gather", 3), ("reduce", 3), ("reduce", 4)):
        _ok(run_job(ranks, [*args, "--set", f"transport={transport}", "--out", f"{transport}{ranks}.h5"], tmp_path))
    with open_results(tmp_path / "gather3.h5") as g:
        ref = g["model/final"][:]
        ref_norms, ref_ids = g["clients/update_norm"][:], g["clients/client_id"][:]
    for name in ("reduce3.h5", "reduce4.h5"):
        with open_results(tmp_path / name) as f:
            np.testing.assert_allclose(f["model/final"][:], ref, rtol=1e-5, atol=1e-7)
            np.testing.assert_array_equal(f["clients/client_id"][:], ref_ids)  # per-client records are kept
            np.testing.assert_allclose(f["clients/update_norm"][:], ref_norms, rtol=1e-5)
            assert f["clients/selected"][:].all()
