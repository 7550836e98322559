"""Shared helpers: start real `mpirun` jobs of fedmpi and write test data files."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
collect_ignore = ["helpers"]  # scripts started by tests, not test modules
CONFIGS = REPO / "configs"


def mpirun_path() -> str:
    local = Path(sys.executable).parent / "mpirun"
    found = str(local) if local.exists() else shutil.which("mpirun")
    if not found:
        pytest.fail("mpirun not found: install the test extra (pip install '.[test]'), which brings the mpich wheel")
    return found


def fedmpi_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_job(ranks: int | None, args: list, cwd: Path, timeout: float = 300, module: str = "fedmpi.run",
            script: Path | None = None) -> subprocess.CompletedProcess:
    """Run fedmpi under `mpirun -n ranks` (or as one plain process when ranks is None)."""
    target = [str(script)] if script else ["-m", module]
    cmd = [sys.executable, *target, *map(str, args)]
    if ranks is not None:
        cmd = [mpirun_path(), "-n", str(ranks), *cmd]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=fedmpi_env(), capture_output=True, text=True, timeout=timeout)
    proc.wall_s = time.monotonic() - start
    return proc


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an IDX file of unsigned bytes (gzipped when the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())


def make_idx_dataset(directory: Path, n_train: int = 1000, n_test: int = 200, seed: int = 0) -> None:
    """Small learnable 28x28 MNIST-style IDX files: class c lights a 6x6 patch at its own place."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            row, col = 2 + 8 * (c // 4), 2 + 8 * (c % 4)
            images[i, row:row + 6, col:col + 6] = 200 + rng.integers(0, 55)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def rank_pid(rank: int, *markers: str) -> int:
    """The process of MPI rank ``rank`` (PMI_RANK) whose command line holds every one of ``markers``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env and all(m.encode() in cmdline for m in markers):
            return int(entry)
    raise AssertionError(f"rank {rank} not found")
