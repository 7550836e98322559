"""Checkpoint and resume (signals, kill -9), and sweeps, with real mpirun jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import pytest

from conftest import fedmpi_env, mpirun_path, rank_pid, run_job
from fedmpi import sweep as sweep_mod
from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS, load

# a config with state in every place a checkpoint must carry: FedAdam, centered
# clipping's center, the DP accountant; plus sampled cohorts and snapshots
STATEFUL = ["--set", "rounds=14", "--set", "clients.total=20", "--set", "clients.per_round=12",
            "--set", "server.optimizer=fedadam", "--set", "aggregator.name=centered_clipping",
            "--set", "aggregator.tau=0.5", "--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=0.8",
            "--set", "privacy.accountant=rdp", "--set", "output.checkpoint_every=4", "--set", "output.snapshot_every=3",
            "--quiet"]
TIMING = {"wall_s", "train_s", "comm_s", "aggregate_s", "eval_s"}


def _start(ranks, args, cwd):
    cmd = [mpirun_path(), "-n", str(ranks), sys.executable, "-m", "fedmpi.run", *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=fedmpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_rounds(path, count, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(load(str(path)).rounds) >= count:
                return
        except Exception:  # not created yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach {count} rounds")


def _assert_same_run(a_path, b_path):
    """Bit-for-bit: final weights, every non-timing per-round and per-client column, snapshots, epsilon."""
    with h5py.File(a_path, "r", libver="latest", swmr=True) as a, h5py.File(b_path, "r", libver="latest", swmr=True) as b:
        assert a["model/final"][:].tobytes() == b["model/final"][:].tobytes()
        for group, fields in (("rounds", ROUND_FIELDS), ("clients", CLIENT_FIELDS)):
            for name in fields:
                if name in TIMING:
                    continue
                x, y = a[group][name][:], b[group][name][:]
                assert x.shape == y.shape and x.tobytes() == y.tobytes(), f"/{group}/{name} differs"
        assert a["model/snapshots"][:].tobytes() == b["model/snapshots"][:].tobytes()
        assert a["model/snapshot_round"][:].tolist() == b["model/snapshot_round"][:].tolist()
        assert a["privacy/epsilon"][()] == b["privacy/epsilon"][()]
        assert b["run/finished"][()] == 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("reference")
    proc = run_job(3, [*STATEFUL, "--out", "ref.h5"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "ref.h5"


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tmp_path, reference):
    out = tmp_path / "run.h5"
    job = _start(3, [*STATEFUL, "--out", out], tmp_path)
    _wait_for_rounds(out, 5)
    os.kill(job.pid, signal.SIGTERM)  # mpirun passes it on to every rank
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 75, stderr
    assert "SIGTERM received; checkpoint after round" in stderr and "--resume" in stderr
    stopped = load(str(out))
    assert not stopped.finished and 5 <= len(stopped.rounds) < 14
    resumed = run_job(2, ["--resume", out, "--quiet"], tmp_path)  # another rank count, on purpose
    assert resumed.returncode == 0, resumed.stderr
    _assert_same_run(reference, out)
    with h5py.File(out, "r", libver="latest", swmr=True) as f:
        assert len(f.attrs["resumed_at"]) == 1 and f.attrs["world_size"] == 2


def test_kill_9_of_rank_0_resumes_from_the_last_checkpoint(tmp_path, reference):
    out = tmp_path / "run.h5"
    job = _start(3, [*STATEFUL, "--out", out], tmp_path)
    _wait_for_rounds(out, 9)  # checkpoints after rounds 4 and 8
    rank0 = rank_pid(0, "fedmpi.run", str(out))
    os.kill(rank0, signal.SIGKILL)
    job.communicate(timeout=60)
    assert job.returncode != 0
    killed = load(str(out))
    assert not killed.finished
    with h5py.File(out, "r", libver="latest", swmr=True) as f:
        checkpoint_round = int(f["checkpoint/current"][1])
    assert checkpoint_round >= 7 and len(killed.rounds) >= checkpoint_round + 1
    resumed = run_job(3, ["--resume", out], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} after round {checkpoint_round + 1}" in resumed.stdout
    _assert_same_run(reference, out)


def test_resume_with_a_changed_config_is_refused(tmp_path, reference):
    copy = tmp_path / "copy.h5"
    copy.write_bytes(reference.read_bytes())
    before = copy.read_bytes()
    proc = run_job(2, ["--resume", copy, "--set", "train.lr=0.1"], tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1
    assert lines[0] == (f"fedmpi: config error: train.lr = 0.1: differs from the run being resumed (0.05 in {copy}); "
                        "only rounds may change on --resume")
    assert copy.read_bytes() == before


def test_resume_can_extend_a_finished_run(tmp_path, reference):
    copy = tmp_path / "copy.h5"
    copy.write_bytes(reference.read_bytes())
    same = run_job(2, ["--resume", copy], tmp_path)
    assert same.returncode == 0 and "nothing to resume" in same.stderr
    longer = run_job(2, ["--resume", copy, "--set", "rounds=16", "--quiet"], tmp_path)
    assert longer.returncode == 0, longer.stderr
    run = load(str(copy))
    assert run.finished and run.rounds["round"].tolist() == list(range(16))


# --------------------------------------------------------------------------- sweeps


def _grid(tmp_path, **extra):
    spec = {"out": str(tmp_path / "sweep"), "seeds": [0, 1], "set": {"rounds": 2, "clients.total": 8,
                                                                      "clients.per_round": 8},
            "grid": {"aggregator.name": ["fedavg", "median"], "train.lr": [0.05, 0.1]}, **extra}
    path = tmp_path / "grid.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_sweep_expands_grid_and_seeds_in_order(tmp_path):
    grid = sweep_mod.load_grid(str(_grid(tmp_path)))
    entries = sweep_mod.expand(grid)
    assert len(entries) == 8
    assert entries[0]["overrides"] == {"rounds": 2, "clients.total": 8, "clients.per_round": 8,
                                       "aggregator.name": "fedavg", "train.lr": 0.05, "seed": 0}
    assert [(e["overrides"]["aggregator.name"], e["overrides"]["train.lr"], e["overrides"]["seed"]) for e in entries] == [
        ("fedavg", 0.05, 0), ("fedavg", 0.05, 1), ("fedavg", 0.1, 0), ("fedavg", 0.1, 1),
        ("median", 0.05, 0), ("median", 0.05, 1), ("median", 0.1, 0), ("median", 0.1, 1)]
    assert entries[5]["out"].endswith("sweep/run-0005.h5")
    args = sweep_mod.run_args(grid, entries[5])
    assert args == ["--set", "rounds=2", "--set", "clients.total=8", "--set", "clients.per_round=8",
                    "--set", "aggregator.name=median", "--set", "train.lr=0.05", "--set", "seed=1",
                    "--out", entries[5]["out"]]


def test_sweep_rejects_an_invalid_entry_before_running(tmp_path):
    path = _grid(tmp_path, grid={"aggregator.name": ["krum"], "aggregator.f": [1, 3]})
    proc = run_job(None, [path], tmp_path, module="fedmpi.sweep")
    assert proc.returncode == 2
    assert "entry 2" in proc.stderr and "krum needs n >= 2f + 3; got n = 8, f = 3" in proc.stderr


def test_sweep_skips_finished_runs_and_resumes_partial_ones(tmp_path):
    path = _grid(tmp_path)
    first = run_job(None, [path, "--run", "--launcher", f"{mpirun_path()} -n 2"], tmp_path, module="fedmpi.sweep",
                    timeout=600)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "sweep" / "manifest.json").read_text())
    assert [e["index"] for e in manifest["entries"]] == list(range(8))
    files = [tmp_path / "sweep" / f"run-{i:04d}.h5" for i in range(8)]
    assert all(load(str(f)).finished for f in files)
    # make entry 3 partial (interrupted after a checkpoint) and delete entry 6
    config = load(str(files[3])).config
    partial = _start(2, ["--set", f"seed={config['seed']}", "--set", f"aggregator.name={config['aggregator']['name']}",
                         "--set", f"train.lr={config['train']['lr']}", "--set", "clients.total=8",
                         "--set", "clients.per_round=8", "--set", "rounds=60", "--set", "train.epochs=10",
                         "--set", "output.checkpoint_every=1",
                         "--out", tmp_path / "partial.h5", "--quiet"], tmp_path)
    _wait_for_rounds(tmp_path / "partial.h5", 3)
    os.kill(partial.pid, signal.SIGTERM)
    partial.communicate(timeout=60)
    assert partial.returncode == 75
    os.replace(tmp_path / "partial.h5", files[3])
    files[6].unlink()
    stamps = {i: files[i].stat().st_mtime_ns for i in (0, 1, 2, 4, 5, 7)}
    listing = run_job(None, [path], tmp_path, module="fedmpi.sweep")
    assert " 3  partial" in listing.stdout and " 6  pending" in listing.stdout and " 0  done" in listing.stdout
    assert run_job(None, [path, "--args", "0"], tmp_path, module="fedmpi.sweep").returncode == 3
    assert run_job(None, [path, "--args", "3"], tmp_path, module="fedmpi.sweep").stdout.split() == ["--resume",
                                                                                                    str(files[3])]
    second = run_job(None, [path, "--run", "--launcher", f"{mpirun_path()} -n 2"], tmp_path, module="fedmpi.sweep",
                     timeout=600)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("done, skipped") == 6
    assert all(files[i].stat().st_mtime_ns == stamp for i, stamp in stamps.items())  # finished runs untouched
    resumed = load(str(files[3]))
    assert resumed.finished and len(resumed.attrs["resumed_at"]) == 1 and len(resumed.rounds) == 60
    assert load(str(files[6])).finished
