"""Shared helpers: start real `mpirun` jobs of fedmpi and write test data files."""

from __future__ import annotations

import gzip
import json
import os
import pickle
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


def expect_rejected(tmp_path: Path, args: list, *fragments: str, ranks: int | None = 2) -> str:
    """Run a job that must stop before any work: exit status 2, one line on stderr that
    starts with "fedmpi: " and holds every fragment, nothing on stdout, no results file.
    ``ranks`` None: one plain process (no mpirun)."""
    out = tmp_path / "out.h5"
    proc = run_job(ranks, [*args, "--out", out, "--quiet"], tmp_path, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert len(lines) == 1, f"expected one line, got:\n{proc.stderr}"
    assert lines[0].startswith("fedmpi: ")
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert not out.exists(), "a results file was left behind"
    assert proc.stdout == ""
    return lines[0]


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


# ------------------------------------------------------------------ miniature files in the real on-disk formats


class _Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote CIFAR-10's batches (protocol 2): strings and
    bytes as byte strings (BINSTRING), numpy's reconstructor under numpy.core.multiarray."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_string
    dispatch[str] = save_py2_string

    def save_global(self, obj, name=None):
        if getattr(obj, "__module__", None) == "numpy._core.multiarray":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def make_cifar_batches(directory: Path, per_batch: int = 20, n_test: int = 40, seed: int = 0) -> None:
    """The six CIFAR-10 batches (and batches.meta), small and learnable: class c brightens
    one colour plane in its own 8x8 square."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 90, (n, 3, 32, 32)).astype(np.uint8)
        for i, c in enumerate(labels):
            row, col = 8 * (c // 4), 8 * (c % 4)
            images[i, c % 3, row:row + 8, col:col + 8] = 230
        batch = {b"batch_label": f"{name} of the test set".encode(), b"labels": [int(c) for c in labels],
                 b"data": images.reshape(n, 3072), b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        with open(directory / name, "wb") as fh:
            _Py2Pickler(fh, protocol=2).dump(batch)
    with open(directory / "batches.meta", "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump({b"label_names": [f"class{c}".encode() for c in range(10)],
                                          b"num_cases_per_batch": per_batch, b"num_vis": 3072})


def make_femnist_files(directory: Path, prefix: str = "fed_emnist_digitsonly", writers: int = 8, classes: int = 10,
                       seed: int = 0, label_column: bool = False) -> list[str]:
    """TensorFlow Federated's Federated EMNIST files: <prefix>_train.h5 / _test.h5 with
    /examples/<writer>/label (N,) int32 (``label_column``: (N, 1)) and pixels (N, 28, 28)
    float32 in [0, 1], background 1.0. Writers hold 6..14 training and 2..4 test
    examples; class c darkens its own 6x6 patch. Returns the writer ids."""
    import h5py

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    ids = [f"f{i:04d}_{int(rng.integers(10, 99))}" for i in range(writers)]
    sizes = {w: (int(rng.integers(6, 15)), int(rng.integers(2, 5))) for w in ids}
    for split, k in (("train", 0), ("test", 1)):
        with h5py.File(directory / f"{prefix}_{split}.h5", "w") as f:
            for w in ids:
                n = sizes[w][k]
                labels = rng.integers(0, classes, n).astype(np.int32)
                pixels = 1.0 - rng.uniform(0, 0.2, (n, 28, 28)).astype(np.float32)
                for i, c in enumerate(labels):
                    row, col = 2 + 6 * ((c % 16) // 4), 2 + 6 * (c % 4)
                    pixels[i, row:row + 6, col:col + 6] = 0.0
                f.create_dataset(f"examples/{w}/label", data=labels[:, None] if label_column else labels)
                f.create_dataset(f"examples/{w}/pixels", data=pixels)
    return ids


SHAKESPEARE_LINES = ["To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer ",
                     "Now is the winter of our discontent made glorious summer by this sun of York; ",
                     "All the world's a stage, and all the men and women merely players; they have their exits ",
                     "O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name; "]


def role_text(role: int, length: int) -> str:
    """A speaking role's text: its own line repeated (so the next character is learnable)."""
    line = SHAKESPEARE_LINES[role % len(SHAKESPEARE_LINES)]
    return (line * (length // len(line) + 2))[:length]


def make_leaf_shakespeare(directory: Path, roles: int = 6, seed: int = 0, split_files: int = 1,
                          sizes: tuple[int, int] = (20, 40)) -> list[str]:
    """LEAF's Shakespeare layout: train/*.json and test/*.json with users, hierarchies,
    num_samples and user_data {user: {x: 80-character strings, y: next characters}};
    each role's samples (``sizes``: how many, low and high) split 80/20 in order (LEAF's -t sample).
    Returns the role names."""
    rng = np.random.default_rng(seed)
    names = [f"THE_PLAY_{i // 2}_ROLE_{i}" for i in range(roles)]
    samples = {}
    for i, name in enumerate(names):
        n = int(rng.integers(*sizes))
        text = role_text(i, n + 80)
        samples[name] = ([text[j:j + 80] for j in range(n)], [text[j + 80] for j in range(n)])
    for split in ("train", "test"):
        (directory / split).mkdir(parents=True, exist_ok=True)
        for part in range(split_files):
            users = names[part::split_files]
            data = {}
            for u in users:
                x, y = samples[u]
                cut = int(0.8 * len(y))
                data[u] = {"x": x[:cut], "y": y[:cut]} if split == "train" else {"x": x[cut:], "y": y[cut:]}
            doc = {"users": users, "hierarchies": [u.split("_ROLE")[0] for u in users],
                   "num_samples": [len(data[u]["y"]) for u in users], "user_data": data}
            (directory / split / f"all_data_niid_0_keep_0_{split}_{part}.json").write_text(json.dumps(doc))
    return names


def make_tff_shakespeare(directory: Path, roles: int = 3) -> None:
    """TensorFlow Federated's Shakespeare files: shakespeare_{train,test}.h5 with
    /examples/<role>/snippets, the role's lines as byte strings."""
    import h5py

    directory.mkdir(parents=True, exist_ok=True)
    for split, length in (("train", 300), ("test", 120)):
        with h5py.File(directory / f"shakespeare_{split}.h5", "w") as f:
            for i in range(roles):
                text = role_text(i, length)
                lines = [text[k:k + 60] + "\n" for k in range(0, length, 60)]
                f.create_dataset(f"examples/ROLE_{i}/snippets", data=np.array([s.encode() for s in lines], dtype=object),
                                 dtype=h5py.string_dtype())


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
