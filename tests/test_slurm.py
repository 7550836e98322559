"""The jobs/ scripts submitted with sbatch to a real one-node SLURM cluster.

The cluster comes from tests/slurm/cluster.sh (Debian's slurm-wlm and munge;
.ci/run installs and starts it and exports FEDMPI_TEST_SLURM_CONF). Where SLURM
is not installed the tests are skipped, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml

from conftest import CONFIGS, REPO, fedmpi_env, run_job
from fedmpi.results import load

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"


def _slurm_env(conf: str) -> dict:
    env = fedmpi_env()
    env["SLURM_CONF"] = conf
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["FEDMPI_JOBS"] = str(REPO / "jobs")
    env["FEDMPI_PYTHON"] = sys.executable
    return env


def _cluster_up(conf: str) -> bool:
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], env={**os.environ, "SLURM_CONF": conf}, capture_output=True,
                           text=True, timeout=30)
    return probe.returncode == 0 and probe.stdout.strip() in ("idle", "mix", "alloc")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    conf = os.environ.get("FEDMPI_TEST_SLURM_CONF")
    if conf and _cluster_up(conf):
        yield conf
        return
    missing = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here (missing {', '.join(missing)}): apt-get install slurmctld slurmd "
                    "slurm-client munge, as .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("the one-node test cluster runs munged, slurmctld and slurmd as root")
    directory = tmp_path_factory.mktemp("slurm")
    started = subprocess.run([str(CLUSTER), "start", str(directory)], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(CLUSTER), "stop", str(directory)], timeout=60)


def _sbatch(conf, args, cwd, extra_env=""):
    export = "ALL" + (f",{extra_env}" if extra_env else "")
    proc = subprocess.run(["sbatch", "--parsable", f"--chdir={cwd}", f"--export={export}", *map(str, args)],
                          env=_slurm_env(conf), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _job(conf, job_id) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=_slurm_env(conf), capture_output=True,
                         text=True, timeout=30).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines() if line.strip()]


def _wait(conf, job_id, timeout=300, release_requeued=True):
    """Poll until every task of the job has ended. A requeue holds a job for about
    120 s; requeued tasks are released after 3 s instead (the node needs a moment to
    finish the cancelled run: releasing at once can fail the restart)."""
    deadline = time.monotonic() + timeout
    requeued_at: dict = {}
    while time.monotonic() < deadline:
        tasks = _job(conf, job_id)
        for task in tasks:
            if release_requeued and task["JobState"] == "PENDING" and int(task.get("Restarts", "0")) > 0 \
                    and task.get("Reason") == "BeginTime":
                first_seen = requeued_at.setdefault(task["JobId"], time.monotonic())
                if time.monotonic() - first_seen >= 3:
                    subprocess.run(["scontrol", "update", f"JobId={task['JobId']}", "StartTime=now"],
                                   env=_slurm_env(conf), timeout=30)
        if tasks and all(t["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                         for t in tasks):
            return tasks
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end: {_job(conf, job_id)}")


def _show(conf, job_id) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], env=_slurm_env(conf), capture_output=True, text=True,
                          timeout=30).stdout


def test_single_run_job(slurm, tmp_path):
    job = _sbatch(slurm, ["-n", "3", REPO / "jobs" / "run.sbatch", "--config", CONFIGS / "digits_mlp.yaml",
                          "--set", "rounds=4"], tmp_path, f"OUT={tmp_path / 'single.h5'}")
    (task,) = _wait(slurm, job)
    log = (tmp_path / f"fedmpi-fedmpi-{job}.out").read_text()
    print(log, _show(slurm, job), sep="\n")
    assert task["JobState"] == "COMPLETED" and task["ExitCode"] == "0:0", log
    assert "srun --mpi=pmi2" in log and "round 4/4" in log
    run = load(str(tmp_path / "single.h5"))
    assert run.finished and len(run.rounds) == 4
    assert run.attrs["world_size"] == 3  # srun wired the ranks together: not 3 singletons


def test_array_sweep_job_and_resubmission(slurm, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"config": str(CONFIGS / "digits_mlp.yaml"), "out": str(tmp_path / "sweep"),
                                    "seeds": [0, 1], "set": {"rounds": 2},
                                    "grid": {"aggregator.name": ["fedavg", "median"]}}, sort_keys=False))
    count = run_job(None, [grid, "--count"], tmp_path, module="fedmpi.sweep")
    assert count.stdout.strip() == "4"
    job = _sbatch(slurm, ["--array=0-3", "-n", "2", REPO / "jobs" / "sweep.sbatch", grid], tmp_path)
    tasks = _wait(slurm, job)
    assert len(tasks) == 4 and all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    files = [tmp_path / "sweep" / f"run-{i:04d}.h5" for i in range(4)]
    expected = [("fedavg", 0), ("fedavg", 1), ("median", 0), ("median", 1)]
    for path, (aggregator, seed) in zip(files, expected):
        run = load(str(path))
        assert run.finished and len(run.rounds) == 2
        assert (run.config["aggregator"]["name"], run.config["seed"]) == (aggregator, seed)
    stamps = [p.stat().st_mtime_ns for p in files]
    again = _sbatch(slurm, ["--array=0-3", "-n", "2", REPO / "jobs" / "sweep.sbatch", grid], tmp_path)
    tasks = _wait(slurm, again)
    assert all(t["JobState"] == "COMPLETED" for t in tasks)
    assert [p.stat().st_mtime_ns for p in files] == stamps  # finished entries were skipped
    logs = "".join(p.read_text() for p in tmp_path.glob(f"fedmpi-fedmpi-sweep-{again}_*.out"))
    assert logs.count("has finished; skipping") == 4


def _wait_for_rounds(path, count, timeout=120):
    """Until the results file holds ``count`` rounds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(load(str(path)).rounds) >= count:
                return
        except Exception:  # not created yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"{path} did not reach {count} rounds in {timeout} s")


def _usr1_then_requeued(conf, job, log_path) -> str:
    """What SLURM's --signal=B:USR1@... does before a time limit: USR1 to the batch shell.
    The job must then have been requeued once and completed; returns its log."""
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=_slurm_env(conf), check=True, timeout=30)
    (task,) = _wait(conf, job)
    log, shown = log_path.read_text(), _show(conf, job)
    print(log, shown, sep="\n")
    assert task["JobState"] == "COMPLETED" and task["Restarts"] == "1", shown
    return log


def test_signal_checkpoint_requeue_resume(slurm, tmp_path):
    args = ["--config", CONFIGS / "digits_mlp.yaml", "--set", "rounds=60", "--set", "server.optimizer=fedavgm",
            "--quiet"]
    out = tmp_path / "long.h5"
    job = _sbatch(slurm, ["-n", "3", REPO / "jobs" / "run.sbatch", *args], tmp_path, f"OUT={out}")
    _wait_for_rounds(out, 4)
    log = _usr1_then_requeued(slurm, job, tmp_path / f"fedmpi-fedmpi-{job}.out")
    assert "SIGUSR1 received; checkpoint after round" in log and "requeueing job" in log
    assert "(restart 1)" in log and "--resume" in log
    reference = run_job(3, [*args, "--out", tmp_path / "reference.h5"], tmp_path)
    assert reference.returncode == 0, reference.stderr
    with h5py.File(out, "r", libver="latest", swmr=True) as a, \
            h5py.File(tmp_path / "reference.h5", "r", libver="latest", swmr=True) as b:
        assert a["model/final"][:].tobytes() == b["model/final"][:].tobytes()
        assert a["rounds/test_loss"][:].tobytes() == b["rounds/test_loss"][:].tobytes()
        assert len(a.attrs["resumed_at"]) == 1


def test_in_job_sweep_job_requeued_after_usr1_finishes_every_run(slurm, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"config": str(CONFIGS / "digits_mlp.yaml"), "out": str(tmp_path / "sweep"),
                                    "seeds": [0, 1], "set": {"rounds": 30, "clients.total": 8,
                                                             "clients.per_round": 8}}, sort_keys=False))
    files = [tmp_path / "sweep" / f"run-{i:04d}.h5" for i in range(2)]
    job = _sbatch(slurm, ["-n", "2", REPO / "jobs" / "sweep_in_job.sbatch", grid, "--ranks-per-run", "1"], tmp_path)
    _wait_for_rounds(files[0], 2)
    _wait_for_rounds(files[1], 2)
    log = _usr1_then_requeued(slurm, job, tmp_path / f"fedmpi-fedmpi-sweep-in-job-{job}.out")
    assert "srun --mpi=pmi2" in log and "-m fedmpi.sweep" in log and "2 groups of 1 rank;" in log
    # both groups were running: both runs checkpointed, and the requeued job resumed both
    assert log.count("SIGUSR1 received; checkpoint after round") == 2
    assert len(re.findall(r"group \d+: checkpointed after a signal", log)) == 2
    assert "requeueing job" in log and "(restart 1)" in log and log.count("resumed, done") == 2
    assert "in-job sweep: 2 done" in log
    runs = [load(str(f)) for f in files]
    assert all(run.finished and len(run.rounds) == 30 and len(run.attrs["resumed_at"]) == 1 for run in runs)
