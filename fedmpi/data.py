"""Datasets and how they are split over virtual clients.

Datasets: ``synthetic`` (FedProx's Synthetic(alpha, beta), Li et al. 2020),
``digits`` (UCI handwritten digits, shipped inside scikit-learn), ``mnist`` and
``fashion_mnist`` (standard IDX files in a directory), ``npz`` (user arrays),
``cifar10`` (CIFAR-10's Python pickle batches), and the naturally federated
``femnist`` / ``femnist_digits`` (Federated EMNIST in TensorFlow Federated's
HDF5 files: one client per writer) and ``shakespeare`` (LEAF's JSON files: one
client per speaking role). Each is one :data:`DATASETS` entry: in-memory data
sets give their arrays (then normalised and partitioned here), naturally
federated ones build their clients themselves. A new in-memory data set is one
loader plus one entry.

Partitioners: ``iid``; ``dirichlet`` label skew (Hsu et al. 2019); ``shards``,
k label-sorted shards per client (McMahan et al. 2017).

Everything is drawn from keyed generators (:mod:`fedmpi.seeding`), so every rank
computes the same split without talking to the others.

Command line: ``python -m fedmpi.data download NAME [--dir DIR]`` fetches a data
set's files (mnist, fashion_mnist, cifar10, femnist, femnist_digits,
shakespeare) and verifies their published checksums. Nothing is downloaded at
run time.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import seeding
from .schema import Config, ConfigError, DataConfig


class DataError(ConfigError):
    """Data that cannot be used as configured; ``str()`` is the one-line message."""


# --------------------------------------------------------------------------- container


@dataclass
class FederatedData:
    """Training data per client (workers) and the central test set (server).

    ``client(cid)`` returns that client's (x, y) training arrays. For index-based
    datasets the rows live in ``x_train`` and ``client_indices[cid]`` selects them;
    ``synthetic`` generates each client's data from its key when first asked
    (and keeps it); ``femnist`` reads a writer's group from its HDF5 file each time
    (``cache_clients`` False, ``sizes`` known up front). ``tokens``: inputs are
    integer character codes; ``client_names``: the data set's own name of each
    client id (writer, speaking role), where it has them.
    A membership audit trains on a keyed part of every client's data
    (:func:`fedmpi.membership.restrict`); ``full`` then holds the data before it.
    """

    input_shape: tuple
    num_classes: int
    num_clients: int
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    x_train: np.ndarray | None = None
    y_train: np.ndarray | None = None
    client_indices: list | None = None
    generate: Callable[[int], tuple] | None = None
    norm_mean: np.ndarray | None = None  # data.normalize = standard: per-channel training mean
    norm_std: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    sizes: np.ndarray | None = None
    cache_clients: bool = True
    tokens: bool = False
    client_names: list | None = None
    full: FederatedData | None = field(default=None, repr=False)  # a membership audit's split: the data before it

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        if self.generate is not None:
            if not self.cache_clients:
                return self.generate(cid)[:2]
            if cid not in self._cache:
                self._cache[cid] = self.generate(cid)[:2]
            return self._cache[cid]
        idx = self.client_indices[cid]
        return self.x_train[idx], self.y_train[idx]

    def client_sizes(self) -> np.ndarray:
        if self.sizes is not None:
            return self.sizes
        if self.generate is not None:
            return np.array([len(self.client(c)[1]) for c in range(self.num_clients)])
        return np.array([len(i) for i in self.client_indices])


# --------------------------------------------------------------------------- sources


def _images(x: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, D) and (N, C, H, W) pass through."""
    return x[:, None, :, :] if x.ndim == 3 else x


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 UCI 8x8 digits as (x, shape (N, 1, 8, 8), values 0..16; y).

    Read straight from the CSV scikit-learn ships, without importing scikit-learn
    (which costs over a second per rank); falls back to ``load_digits``.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise DataError("data.name", "digits", "needs scikit-learn, which ships the UCI digits: pip install scikit-learn")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",")
        x, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - layout of a future scikit-learn
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data, bunch.target
    return x.astype(np.float32).reshape(-1, 1, 8, 8), y.astype(np.int64)


CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# What ``python -m fedmpi.data download NAME`` fetches: each file with its published
# checksum (``md5`` or ``sha256``); ``extract``: the archive members unpacked into the
# directory (by base name); ``convert``: a step that writes the layout the loader reads.
# MNIST, Fashion-MNIST: the gzipped IDX files and their published MD5s. CIFAR-10: the
# archive and the MD5 on its page. Federated EMNIST and Shakespeare: TensorFlow
# Federated's archives and the SHA-256s its load_data functions verify.
DOWNLOADS = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        "md5": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion_mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "md5": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
    "cifar10": {
        "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
        "md5": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "extract": (*CIFAR_BATCHES, "batches.meta"),
    },
    "femnist": {
        "mirrors": ["https://storage.googleapis.com/tff-datasets-public/"],
        "sha256": {"fed_emnist.tar.bz2": "fe1ed5a502cea3a952eb105920bff8cffb32836b5173cb18a57a32c3606f3ea0"},
        "extract": ("fed_emnist_train.h5", "fed_emnist_test.h5"),
    },
    "femnist_digits": {
        "mirrors": ["https://storage.googleapis.com/tff-datasets-public/"],
        "sha256": {"fed_emnist_digitsonly.tar.bz2": "55333deb8546765427c385710ca5e7301e16f4ed8b60c1dc5ae224b42bd5b14b"},
        "extract": ("fed_emnist_digitsonly_train.h5", "fed_emnist_digitsonly_test.h5"),
    },
    "shakespeare": {
        "mirrors": ["https://storage.googleapis.com/tff-datasets-public/"],
        "sha256": {"shakespeare.tar.bz2": "0285be9906cb5f268092eee4edeeacfc2af4574f2941f7cc2f08a321d7f5c707"},
        "extract": ("shakespeare_train.h5", "shakespeare_test.h5"),
        "convert": "tff_shakespeare",
    },
}


def idx_path(directory: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def read_idx(path: str) -> np.ndarray:
    """Parse one IDX file (plain or gzipped) of unsigned bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError("data.dir", os.path.dirname(path), f"{os.path.basename(path)} cannot be read: {exc}") from None
    name = os.path.basename(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError("data.dir", os.path.dirname(path), f"{name} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError("data.dir", os.path.dirname(path), f"{name} is truncated or padded: header says {dims}, "
                        f"file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def check_idx_dir(name: str, directory: str) -> dict:
    """Paths of the four IDX files, or a DataError saying how to obtain them."""
    paths = {key: idx_path(directory, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError("data.dir", directory, f"missing {', '.join(m + '[.gz]' for m in missing)}; "
                        f"get them with: python -m fedmpi.data download {name} --dir {directory}")
    return paths


def load_idx_arrays(name: str, directory: str) -> tuple:
    paths = check_idx_dir(name, directory)
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError("data.dir", directory, f"{split} images {x.shape} and labels {y.shape} do not match "
                            "(expected (N, H, W) and (N,))")
    return (_images(arrays["train_x"]), arrays["train_y"].astype(np.int64),
            _images(arrays["test_x"]), arrays["test_y"].astype(np.int64))


def load_npz_arrays(path: str) -> tuple:
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
            if missing:
                raise DataError("data.path", path, f"missing arrays {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")
            arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except DataError:
        raise
    except Exception as exc:  # numpy raises several types for a bad archive
        raise DataError("data.path", path, f"not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    return check_arrays("data.path", path, arrays)


def check_arrays(key: str, value: str, arrays: Mapping[str, np.ndarray]) -> tuple:
    """``arrays`` (x_train, y_train, x_test, y_test) checked for what a run needs, as
    (x_train, y_train, x_test, y_test) with (N, H, W) images made (N, 1, H, W) and int64
    labels; a problem is a DataError naming ``key`` = ``value`` (where the arrays came from)."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (2, 3, 4):
            raise DataError(key, value, f"x_{split} has shape {x.shape}; expected (N, D), (N, H, W) or (N, C, H, W)")
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
            raise DataError(key, value, f"x_{split} has dtype {x.dtype}; inputs must be integers or floats")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(key, value, f"y_{split} has shape {y.shape}; expected ({len(x)},) to match x_{split}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(key, value, f"y_{split} has dtype {y.dtype}; labels must be integers")
        if len(y) and y.min() < 0:
            raise DataError(key, value, f"y_{split} holds negative labels; labels must be 0..C-1")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(key, value, f"x_train samples {arrays['x_train'].shape[1:]} and x_test samples "
                        f"{arrays['x_test'].shape[1:]} differ in shape")
    if len(arrays["y_train"]) == 0 or len(arrays["y_test"]) == 0:
        raise DataError(key, value, "x_train and x_test must each hold at least one sample")
    return (_images(arrays["x_train"]), arrays["y_train"].astype(np.int64),
            _images(arrays["x_test"]), arrays["y_test"].astype(np.int64))


def normalize(x_train: np.ndarray, x_test: np.ndarray, mode: str, value_range: float) -> tuple:
    """Apply ``data.normalize`` to both splits; return (x_train, x_test, mean, std).

    ``unit`` divides by ``value_range``; ``standard`` then subtracts the training
    set's mean and divides by its std, one pair per channel (axis 1 of images;
    vector inputs count as one channel). ``none`` only casts to float32.
    """
    x_train = x_train.astype(np.float32)
    x_test = x_test.astype(np.float32)
    mean = std = None
    if mode in ("unit", "standard"):
        x_train /= value_range
        x_test /= value_range
    if mode == "standard":
        axes = (0,) + tuple(range(2, x_train.ndim)) if x_train.ndim == 4 else None
        mean = x_train.mean(axis=axes, dtype=np.float64)
        std = x_train.std(axis=axes, dtype=np.float64)
        std = np.where(std > 0, std, 1.0)
        shape = (1, -1, 1, 1) if x_train.ndim == 4 else ()
        m32, s32 = np.reshape(mean, shape).astype(np.float32), np.reshape(std, shape).astype(np.float32)
        x_train -= m32
        x_train /= s32
        x_test -= m32
        x_test /= s32
    return x_train, x_test, mean, std


def split_train_test(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple:
    order = seeding.rng(seed, "split").permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def synthetic_client(cfg: Config, cid: int) -> tuple:
    """One FedProx Synthetic(alpha, beta) client: (x_train, y_train, x_test, y_test).

    u_k ~ N(0, alpha), W_k, b_k ~ N(u_k, 1); B_k ~ N(0, beta), v_k ~ N(B_k, 1),
    x ~ N(v_k, diag(j^-1.2)), y = argmax(W_k x + b_k). Sizes are lognormal, as in
    the FedProx generator (alpha and beta are used as standard deviations there too).
    """
    s = cfg.data.synthetic
    g = seeding.rng(cfg.seed, "synthetic", cid)
    u, big_b = g.normal(0.0, s.alpha), g.normal(0.0, s.beta)
    w = g.normal(u, 1.0, (s.dim, s.classes))
    b = g.normal(u, 1.0, s.classes)
    v = g.normal(big_b, 1.0, s.dim)
    n = int(min(s.max_samples, int(g.lognormal(s.samples_mu, s.samples_sigma)) + s.min_samples))
    std = np.arange(1, s.dim + 1, dtype=np.float64) ** -0.6
    x = v + g.standard_normal((n, s.dim)) * std
    y = np.argmax(x @ w + b, axis=1).astype(np.int64)
    n_test = max(1, int(round(n * cfg.data.test_fraction)))
    x = x.astype(np.float32)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


# --------------------------------------------------------------------------- CIFAR-10

class _BatchUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR-10's batches hold (dicts, lists, strings, numbers, numpy
    arrays) and refuses every other global, so a tampered file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"holds {module}.{name}, which a CIFAR-10 batch does not")
        return super().find_class(module, name)


def cifar_paths(directory: str) -> dict:
    """Paths of the six CIFAR-10 batches in ``directory`` (or in its ``cifar-10-batches-py``,
    as the archive unpacks), or a DataError naming the missing ones."""
    for base in (directory, os.path.join(directory, "cifar-10-batches-py")):
        paths = {name: os.path.join(base, name) for name in CIFAR_BATCHES}
        if all(os.path.isfile(p) for p in paths.values()):
            return paths
    missing = [name for name in CIFAR_BATCHES if not os.path.isfile(os.path.join(directory, name))]
    raise DataError("data.dir", directory, f"missing {', '.join(missing)} (CIFAR-10's Python pickle batches); "
                    f"get them with: python -m fedmpi.data download cifar10 --dir {directory}")


def read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: a pickled dict whose ``data`` is a (N, 3072) uint8 array (the
    red, green and blue 32x32 planes of each image, row-major) and ``labels`` N ints
    0..9. Returns (x of shape (N, 3, 32, 32), uint8; y, int64)."""
    where, name = os.path.dirname(path), os.path.basename(path)
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # a damaged pickle raises many types
        raise DataError("data.dir", where, f"{name} is not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DataError("data.dir", where, f"{name} holds a {type(batch).__name__}, not a CIFAR-10 batch (a dict)")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError("data.dir", where, f"{name}: 'data' is {type(data).__name__} {shape}, expected a (N, 3072) "
                        "uint8 array")
    y = np.asarray(labels if labels is not None else [], dtype=np.int64)
    if y.shape != (len(data),) or (len(y) and (y.min() < 0 or y.max() > 9)):
        raise DataError("data.dir", where, f"{name}: 'labels' must be {len(data)} integers 0..9")
    return data.reshape(-1, 3, 32, 32), y


def load_cifar_arrays(directory: str) -> tuple:
    paths = cifar_paths(directory)
    train = [read_cifar_batch(paths[name]) for name in CIFAR_BATCHES[:-1]]
    x_test, y_test = read_cifar_batch(paths["test_batch"])
    return np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), x_test, y_test


# --------------------------------------------------------------------------- naturally federated data

def natural_clients(names: list, cfg: Config, kind: str, where: str) -> list:
    """The clients of a naturally federated data set: all its ``kind`` (writers, roles)
    when ``clients.total`` equals their number, else ``clients.total`` of them drawn
    once from the seed (purpose natural_clients), in the data set's order."""
    n, total = len(names), cfg.clients.total
    if total > n:
        raise DataError("clients.total", total, f"{where} holds {n} {kind} and each is one client; use at most {n} "
                        f"(fewer: that many {kind} drawn from the seed)")
    if total == n:
        return list(names)
    chosen = np.sort(seeding.rng(cfg.seed, "natural_clients").choice(n, total, replace=False))
    return [names[i] for i in chosen]


# Federated EMNIST as TensorFlow Federated distributes it: <prefix>_train.h5 and
# <prefix>_test.h5, group /examples/<writer id> with datasets ``pixels`` (N, 28, 28)
# float32 in [0, 1] (1.0 is the background) and ``label`` (N,) int32.
FEMNIST = {"femnist": ("fed_emnist", 62), "femnist_digits": ("fed_emnist_digitsonly", 10)}


def femnist_paths(name: str, directory: str) -> tuple[str, str]:
    prefix = FEMNIST[name][0]
    paths = [os.path.join(directory, f"{prefix}_{split}.h5") for split in ("train", "test")]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError("data.dir", directory, f"missing {', '.join(missing)} (TensorFlow Federated's HDF5 files); "
                        f"get them with: python -m fedmpi.data download {name} --dir {directory}")
    return paths[0], paths[1]


def open_h5(path: str):
    """An HDF5 file opened read-only with its /examples group, or a DataError."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise DataError("data.dir", os.path.dirname(path), f"{os.path.basename(path)} is not a readable HDF5 file "
                        f"({exc})") from None
    if not isinstance(f.get("examples"), h5py.Group) or not len(f["examples"]):
        f.close()
        raise DataError("data.dir", os.path.dirname(path), f"{os.path.basename(path)} has no /examples/<client> groups "
                        "(TensorFlow Federated's layout)")
    return f


def _writer_arrays(f, writer: str, read_pixels: bool, num_classes: int, path: str, image: tuple) -> tuple:
    """(pixels or None, labels) of one writer's group, checked against the layout and
    the ``image`` shape (H, W) of every writer."""
    where, name = os.path.dirname(path), os.path.basename(path)
    try:
        group = f["examples"][writer]
        pixels, label = group["pixels"], group["label"]
        n = label.shape[0] if label.ndim else -1
        if pixels.shape[1:] != image or pixels.shape[0] != n or label.shape not in ((n,), (n, 1)):
            raise DataError("data.dir", where, f"{name}: writer {writer} has pixels {pixels.shape} and label "
                            f"{label.shape}; expected (N, {image[0]}, {image[1]}) and (N,)")
        if pixels.dtype.kind != "f" or label.dtype.kind not in "iu":
            raise DataError("data.dir", where, f"{name}: writer {writer} has {pixels.dtype} pixels and {label.dtype} "
                            "labels; expected floats in [0, 1] and integers")
        y = label[()].reshape(-1).astype(np.int64)
        x = pixels[()].astype(np.float32) if read_pixels else None
    except DataError:
        raise
    except Exception as exc:  # a damaged file fails in h5py's many ways
        raise DataError("data.dir", where, f"{name}: writer {writer} cannot be read ({type(exc).__name__}: {exc})") from None
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError("data.dir", where, f"{name}: writer {writer} has labels outside 0..{num_classes - 1}")
    return x, y


def _image_shape(f, writer: str, path: str) -> tuple:
    pixels = f["examples"][writer].get("pixels")
    if pixels is None or pixels.ndim != 3:
        raise DataError("data.dir", os.path.dirname(path), f"{os.path.basename(path)}: writer {writer} has no (N, H, W) "
                        "pixels dataset (TensorFlow Federated's layout)")
    return tuple(pixels.shape[1:])


class _WriterReader:
    """Reads one writer's training examples on demand, the file opened once per process."""

    def __init__(self, path: str, writers: list, num_classes: int, image: tuple, mean: float | None, std: float | None):
        self.path, self.writers, self.num_classes, self.image = path, writers, num_classes, image
        self.mean, self.std = mean, std
        self.file = None

    def __call__(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        if self.file is None:
            self.file = open_h5(self.path)
        x, y = _writer_arrays(self.file, self.writers[cid], True, self.num_classes, self.path, self.image)
        x = x[:, None]
        if self.mean is not None:
            x = (x - np.float32(self.mean)) / np.float32(self.std)
        return x, y


def femnist_federated(name: str) -> Callable[[Config, bool], FederatedData]:
    """Federated EMNIST: writer k of the chosen writers (sorted ids) is client k; its
    training examples are read from the file when it trains; the test set is the
    chosen writers' test examples (the whole test file when none of them has any)."""

    def load_femnist(cfg: Config, need_test: bool) -> FederatedData:
        num_classes = FEMNIST[name][1]
        train_path, test_path = femnist_paths(name, cfg.data.dir)
        with open_h5(train_path) as f:
            writers = natural_clients(sorted(f["examples"]), cfg, "writers", os.path.basename(train_path))
            shape = _image_shape(f, writers[0], train_path)
            labels = [_writer_arrays(f, w, False, num_classes, train_path, shape)[1] for w in writers]
            mean = std = None
            if cfg.data.normalize == "standard":
                total, square, count = 0.0, 0.0, 0
                for w in writers:
                    x = _writer_arrays(f, w, True, num_classes, train_path, shape)[0].astype(np.float64)
                    total, square, count = total + x.sum(), square + np.square(x).sum(), count + x.size
                mean = total / count
                std = float(np.sqrt(max(square / count - mean * mean, 0.0))) or 1.0
        reader = _WriterReader(train_path, writers, num_classes, shape, mean, std)
        data = FederatedData(input_shape=(1, *shape), num_classes=num_classes, num_clients=len(writers),
                             generate=reader, sizes=np.array([len(y) for y in labels]), cache_clients=False,
                             client_names=writers,
                             norm_mean=None if mean is None else np.array([mean]),
                             norm_std=None if std is None else np.array([std]))
        if need_test:
            with open_h5(test_path) as f:
                present = [w for w in writers if w in f["examples"]] or sorted(f["examples"])
                parts = [_writer_arrays(f, w, True, num_classes, test_path, shape) for w in present]
            data.x_test = np.concatenate([p[0] for p in parts])[:, None]
            if mean is not None:
                data.x_test = (data.x_test - np.float32(mean)) / np.float32(std)
            data.y_test = np.concatenate([p[1] for p in parts])
        return data

    return load_femnist


# Shakespeare in LEAF's layout: <dir>/train/*.json and <dir>/test/*.json, each
# {"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}
# (plus "hierarchies" in non-IID samples), x: strings of 80 characters, y: the
# character after each. Characters are LEAF's 80 (models/utils/language_utils.py),
# in its order; any other character is one more class.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SHAKESPEARE_CLASSES = len(LEAF_LETTERS) + 1


class _CharCodes(dict):
    """str.translate table: LEAF's letters to their index, every other character to 80."""

    def __missing__(self, key: int) -> int:
        return len(LEAF_LETTERS)


_CHAR_CODES = _CharCodes({ord(c): i for i, c in enumerate(LEAF_LETTERS)})


def encode_chars(text: str) -> np.ndarray:
    """Character codes (uint8) of ``text``."""
    return np.frombuffer(text.translate(_CHAR_CODES).encode("latin1"), dtype=np.uint8)


def leaf_files(directory: str, split: str) -> list[str]:
    folder = os.path.join(directory, split)
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []
    if not files:
        raise DataError("data.dir", directory, f"missing {split}/*.json (LEAF's Shakespeare files: run LEAF's "
                        f"preprocess.sh, or get them with: python -m fedmpi.data download shakespeare --dir {directory})")
    return files


def read_leaf_json(path: str) -> dict:
    """{user: (x codes (n, L) uint8, y codes (n,) uint8)} of one LEAF JSON file, checked
    against LEAF's schema."""
    where, name = os.path.dirname(os.path.dirname(path)) or ".", os.path.relpath(path, os.path.dirname(os.path.dirname(path)))

    def bad(what: str) -> DataError:
        return DataError("data.dir", where, f"{name}: {what}")

    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"not a readable JSON file ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or not all(k in doc for k in ("users", "num_samples", "user_data")):
        raise bad("not LEAF's layout (needs users, num_samples and user_data)")
    users, counts, user_data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
        raise bad("users and num_samples must be lists of the same length")
    out = {}
    for user, count in zip(users, counts):
        entry = user_data.get(user) if isinstance(user_data, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("x"), list) or not isinstance(entry.get("y"), list):
            raise bad(f"user_data has no x and y lists for user {user!r}")
        x, y = entry["x"], entry["y"]
        if len(x) != count or len(y) != count:
            raise bad(f"user {user!r} has {len(x)} x and {len(y)} y, num_samples says {count}")
        if not all(isinstance(s, str) for s in x) or not all(isinstance(c, str) and len(c) == 1 for c in y):
            raise bad(f"user {user!r}: x must be strings and y single characters")
        length = len(x[0]) if x else 0
        if any(len(s) != length for s in x):
            raise bad(f"user {user!r}: the x strings differ in length")
        codes = encode_chars("".join(x)).reshape(count, length) if count else np.zeros((0, 0), np.uint8)
        out[user] = (codes, encode_chars("".join(y)))
    return out


def read_leaf_split(directory: str, split: str) -> dict:
    merged = {}
    for path in leaf_files(directory, split):
        for user, arrays in read_leaf_json(path).items():
            if user in merged:
                raise DataError("data.dir", directory, f"user {user!r} appears in more than one {split}/*.json file")
            merged[user] = arrays
    return merged


def _stack_users(users: list, table: dict, directory: str, split: str) -> tuple[np.ndarray, np.ndarray, list]:
    lengths = {table[u][0].shape[1] for u in users if len(table[u][1])}
    if len(lengths) > 1:
        raise DataError("data.dir", directory, f"{split}/*.json: x strings of different lengths {sorted(lengths)}")
    length = lengths.pop() if lengths else 80
    x = np.concatenate([table[u][0].reshape(-1, length) for u in users])
    y = np.concatenate([table[u][1] for u in users]).astype(np.int64)
    bounds = np.cumsum([0] + [len(table[u][1]) for u in users])
    return x, y, [np.arange(bounds[i], bounds[i + 1]) for i in range(len(users))]


def shakespeare_federated(cfg: Config, need_test: bool) -> FederatedData:
    """LEAF Shakespeare: role k of the chosen roles (sorted) is client k. The test set is
    the chosen roles' test samples (LEAF's per-role split), or the whole test split
    when it holds none of them (LEAF's split by user)."""
    directory = cfg.data.dir
    train = read_leaf_split(directory, "train")
    if not train:
        raise DataError("data.dir", directory, "train/*.json holds no users")
    users = natural_clients(sorted(train), cfg, "speaking roles", os.path.join(directory, "train"))
    x, y, indices = _stack_users(users, train, directory, "train")
    data = FederatedData(input_shape=(x.shape[1],), num_classes=SHAKESPEARE_CLASSES, num_clients=len(users),
                         x_train=x, y_train=y, client_indices=indices, tokens=True, client_names=users)
    if need_test:
        test = read_leaf_split(directory, "test")
        chosen = [u for u in users if u in test] or sorted(test)
        data.x_test, data.y_test, _ = _stack_users(chosen, test, directory, "test")
        if len(data.y_test) == 0:
            raise DataError("data.dir", directory, "test/*.json holds no samples for the chosen roles")
        if data.x_test.shape[1] != x.shape[1]:
            raise DataError("data.dir", directory, f"test x strings have {data.x_test.shape[1]} characters, train "
                            f"{x.shape[1]}")
    return data


def tff_shakespeare_to_leaf(directory: str, log=print) -> list:
    """Write LEAF's layout (``train/`` and ``test/`` JSON) from TensorFlow Federated's
    Shakespeare files (``shakespeare_{train,test}.h5``: /examples/<role>/snippets, the
    role's lines). As LEAF builds its samples: a role's text with line breaks made
    spaces and runs of spaces made one, then every 80-character window and the
    character after it."""
    import h5py

    written = []
    for split in ("train", "test"):
        source = os.path.join(directory, f"shakespeare_{split}.h5")
        users, counts, user_data = [], [], {}
        with h5py.File(source, "r") as f:
            for role in sorted(f["examples"]):
                snippets = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in f["examples"][role]["snippets"][()]]
                text = re.sub(" +", " ", " ".join(snippets).replace("\n", " "))
                if len(text) <= 80:
                    continue
                users.append(role)
                counts.append(len(text) - 80)
                user_data[role] = {"x": [text[i:i + 80] for i in range(len(text) - 80)], "y": list(text[80:])}
        os.makedirs(os.path.join(directory, split), exist_ok=True)
        target = os.path.join(directory, split, f"shakespeare_{split}.json")
        with open(target + ".part", "w", encoding="utf-8") as fh:
            json.dump({"users": users, "num_samples": counts, "user_data": user_data}, fh)
        os.replace(target + ".part", target)
        log(f"wrote    {target} ({len(users)} roles, {sum(counts)} samples, LEAF's layout)")
        written.append(target)
    return written


# --------------------------------------------------------------------------- partitioners


def partition_iid(num_samples: int, clients: int, rng: np.random.Generator) -> list:
    """Shuffle, then cut into ``clients`` near-equal parts."""
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), clients)]


def partition_dirichlet(labels: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
                        min_samples: int = 1, attempts: int = 100) -> list:
    """Label skew: each class is spread over clients by proportions ~ Dir(alpha) (Hsu et al. 2019).

    Redraws (up to ``attempts`` times) until every client holds ``min_samples``.
    """
    classes = np.unique(labels)
    for _ in range(attempts):
        parts = [[] for _ in range(clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(r) for r in result) >= min_samples:
            return result
    raise DataError("data.partition.min_samples", min_samples,
                    f"no Dirichlet(alpha={alpha}) split in {attempts} draws gave every one of {clients} clients that many "
                    "samples; lower it or raise data.partition.alpha")


def partition_shards(labels: np.ndarray, clients: int, shards_per_client: int, rng: np.random.Generator) -> list:
    """Sort by label, cut into clients*k shards, deal k random shards to each client."""
    total = clients * shards_per_client
    if total > len(labels):
        raise DataError("data.partition.shards_per_client", shards_per_client,
                        f"clients.total x shards_per_client = {total} shards but only {len(labels)} training samples")
    shards = np.array_split(np.argsort(labels, kind="stable"), total)
    order = rng.permutation(total)
    return [np.sort(np.concatenate([shards[s] for s in order[c * shards_per_client:(c + 1) * shards_per_client]]))
            for c in range(clients)]


# data.partition.name -> (labels, clients, partition config, rng) -> index arrays per client
PARTITIONS: dict[str, Callable] = {
    "iid": lambda labels, clients, p, rng: partition_iid(len(labels), clients, rng),
    "dirichlet": lambda labels, clients, p, rng: partition_dirichlet(labels, clients, p.alpha, rng, p.min_samples),
    "shards": lambda labels, clients, p, rng: partition_shards(labels, clients, p.shards_per_client, rng),
}


def partition(labels: np.ndarray, cfg: Config) -> list:
    p, n_clients = cfg.data.partition, cfg.clients.total
    if n_clients > len(labels):
        raise DataError("clients.total", n_clients, f"more clients than training samples ({len(labels)})")
    return PARTITIONS[p.name](labels, n_clients, p, seeding.rng(cfg.seed, "partition"))


# --------------------------------------------------------------------------- registry


def digits_arrays(cfg: Config) -> tuple:
    x, y = load_digits_arrays()
    return split_train_test(x, y, cfg.data.test_fraction, cfg.seed)


def idx_arrays(name: str) -> Callable[[Config], tuple]:
    return lambda cfg: load_idx_arrays(name, cfg.data.dir)


def npz_arrays(cfg: Config) -> tuple:
    return load_npz_arrays(cfg.data.path)


def check_idx_files(name: str) -> Callable[[DataConfig], None]:
    return lambda d: check_idx_dir(name, d.dir)


def check_npz_file(d: DataConfig) -> None:
    if not os.path.isfile(d.path):
        raise DataError("data.path", d.path, "file not found")


def cifar_arrays(cfg: Config) -> tuple:
    return load_cifar_arrays(cfg.data.dir)


def check_cifar_files(d: DataConfig) -> None:
    cifar_paths(d.dir)


def check_femnist_files(name: str) -> Callable[[DataConfig], None]:
    return lambda d: femnist_paths(name, d.dir)


def check_leaf_files(d: DataConfig) -> None:
    for split in ("train", "test"):
        leaf_files(d.dir, split)


def synthetic_federated(cfg: Config, need_test: bool) -> FederatedData:
    s = cfg.data.synthetic
    data = FederatedData(input_shape=(s.dim,), num_classes=s.classes, num_clients=cfg.clients.total,
                         generate=lambda cid: synthetic_client(cfg, cid))
    if need_test:
        tests = [synthetic_client(cfg, cid)[2:] for cid in range(cfg.clients.total)]
        data.x_test = np.concatenate([t[0] for t in tests])
        data.y_test = np.concatenate([t[1] for t in tests])
    return data


@dataclass(frozen=True)
class Dataset:
    """One data set.

    ``arrays(cfg) -> (x_train, y_train, x_test, y_test)`` for in-memory data, which
    are normalised (``value_range``: the largest stored value, None: 255 for integer
    arrays, else 1) and split over clients by ``data.partition``; or
    ``federated(cfg, need_test) -> FederatedData`` for data that come split over
    clients. ``reads``: the ``data.*`` keys it uses besides name and normalize;
    ``required``: keys it cannot do without, with what they hold; ``default_dir``:
    ``data.dir`` defaults to data/<name>; ``check_files(data_cfg)``: cheap checks
    run before any MPI traffic."""

    source: str
    arrays: Callable[[Config], tuple] | None = None
    federated: Callable[[Config, bool], FederatedData] | None = None
    value_range: float | None = None
    normalize: tuple[str, ...] = ("standard", "unit", "none")
    reads: tuple[str, ...] = ()
    required: Mapping[str, str] = field(default_factory=dict)
    default_dir: bool = False
    check_files: Callable[[DataConfig], None] | None = None

    @property
    def default_normalize(self) -> str:
        return self.normalize[0]


DATASETS: dict[str, Dataset] = {
    "synthetic": Dataset("FedProx Synthetic(alpha, beta), Li et al. 2020", federated=synthetic_federated,
                         normalize=("none",), reads=("synthetic", "test_fraction")),
    "digits": Dataset("UCI handwritten digits (shipped with scikit-learn)", digits_arrays, value_range=16.0,
                      reads=("test_fraction", "partition")),
    "mnist": Dataset("MNIST, LeCun et al. 1998 (IDX files)", idx_arrays("mnist"), value_range=255.0,
                     reads=("dir", "partition"), default_dir=True, check_files=check_idx_files("mnist")),
    "fashion_mnist": Dataset("Fashion-MNIST, Xiao et al. 2017 (IDX files)", idx_arrays("fashion_mnist"), value_range=255.0,
                             reads=("dir", "partition"), default_dir=True, check_files=check_idx_files("fashion_mnist")),
    "npz": Dataset("user arrays in an .npz file", npz_arrays, reads=("path", "partition"),
                   required={"path": "an .npz file with x_train, y_train, x_test, y_test"}, check_files=check_npz_file),
    "cifar10": Dataset("CIFAR-10, Krizhevsky 2009 (Python pickle batches)", cifar_arrays, value_range=255.0,
                       reads=("dir", "partition"), default_dir=True, check_files=check_cifar_files),
    "femnist": Dataset("Federated EMNIST, Caldas et al. 2018 (LEAF), in TensorFlow Federated's HDF5 files; 62 classes",
                       federated=femnist_federated("femnist"), normalize=("none", "standard"), reads=("dir",),
                       default_dir=True, check_files=check_femnist_files("femnist")),
    "femnist_digits": Dataset("Federated EMNIST, Caldas et al. 2018 (LEAF), TensorFlow Federated's digits-only files",
                              federated=femnist_federated("femnist_digits"), normalize=("none", "standard"),
                              reads=("dir",), default_dir=True, check_files=check_femnist_files("femnist_digits")),
    "shakespeare": Dataset("Shakespeare, McMahan et al. 2017, in LEAF's JSON files (Caldas et al. 2018)",
                           federated=shakespeare_federated, normalize=("none",), reads=("dir",), default_dir=True,
                           check_files=check_leaf_files),
}


# --------------------------------------------------------------------------- entry point


def check_files(cfg: Config, entry: Dataset | None = None) -> None:
    """Cheap existence checks, run on every rank before MPI traffic. ``entry``: the
    data set's registry entry (default: ``DATASETS[data.name]``)."""
    entry = entry or DATASETS[cfg.data.name]
    if entry.check_files is not None:
        entry.check_files(cfg.data)


def load(cfg: Config, need_train: bool = True, need_test: bool = True, entry: Dataset | None = None) -> FederatedData:
    """Load (or generate) the configured data and split it over ``clients.total`` clients.
    ``entry``: the data set's registry entry (default: ``DATASETS[data.name]``)."""
    entry = entry or DATASETS[cfg.data.name]
    if entry.federated is not None:
        return entry.federated(cfg, need_test)
    return from_arrays(cfg, entry.arrays(cfg), entry.value_range, need_train, need_test)


def from_arrays(cfg: Config, arrays: tuple, value_range: float | None = None, need_train: bool = True,
                need_test: bool = True, client_indices: list | None = None) -> FederatedData:
    """In-memory arrays (x_train, y_train, x_test, y_test), normalised by ``data.normalize``
    and split over clients by ``data.partition`` (or by ``client_indices``: the training
    rows of each client, for data that come split)."""
    x_train, y_train, x_test, y_test = arrays
    # integer data are scaled like 8-bit pixels; float data are taken as in [0, 1]
    value_range = value_range or (255.0 if np.issubdtype(x_train.dtype, np.integer) else 1.0)
    x_train, x_test, mean, std = normalize(x_train, x_test, cfg.data.normalize, value_range)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    indices = partition(y_train, cfg) if client_indices is None else client_indices
    data = FederatedData(input_shape=tuple(x_train.shape[1:]), num_classes=num_classes,
                         num_clients=cfg.clients.total, client_indices=indices,
                         norm_mean=None if mean is None else np.atleast_1d(mean),
                         norm_std=None if std is None else np.atleast_1d(std))
    if need_train:
        data.x_train, data.y_train = x_train, y_train
    if need_test:
        data.x_test, data.y_test = x_test, y_test
    return data


# --------------------------------------------------------------------------- download


def file_digest(path: str, algorithm: str = "md5") -> str:
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def md5sum(path: str) -> str:
    return file_digest(path, "md5")


def _fetch_verified(name: str, directory: str, filename: str, algorithm: str, expected: str, mirrors: list,
                    log) -> str:
    """``filename`` in ``directory`` with the published checksum: kept when already there,
    else fetched from the first mirror that serves it whole. A file whose checksum does
    not match is deleted; no mirror with the right bytes raises DataError."""
    target = os.path.join(directory, filename)
    if os.path.isfile(target) and file_digest(target, algorithm) == expected:
        log(f"ok       {target} (already present, checksum verified)")
        return target
    errors = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
        os.close(fd)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except Exception as exc:  # network errors come in many types
            os.unlink(tmp)
            errors.append(f"{url}: {exc}")
            continue
        actual = file_digest(tmp, algorithm)
        if actual != expected:
            os.unlink(tmp)
            errors.append(f"{url}: {algorithm.upper()} {actual} does not match the published {expected}")
            continue
        os.replace(tmp, target)
        log(f"fetched  {target} ({algorithm.upper()} {actual} verified)")
        return target
    raise DataError("download", name, f"could not fetch a verified {filename}: " + "; ".join(errors))


def extract_members(archive: str, members: tuple, directory: str, log) -> list:
    """Unpack the members of a .tar.gz / .tar.bz2 whose base names are ``members`` into
    ``directory`` (flat; nothing else in the archive is written)."""
    found = {}
    try:
        with tarfile.open(archive) as tar:
            for info in tar:
                base = os.path.basename(info.name)
                if info.isfile() and base in members and base not in found:
                    target = os.path.join(directory, base)
                    with tar.extractfile(info) as src, open(target + ".part", "wb") as out:
                        shutil.copyfileobj(src, out)
                    os.replace(target + ".part", target)
                    found[base] = target
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError("download", archive, f"cannot be unpacked ({type(exc).__name__}: {exc})") from None
    missing = [m for m in members if m not in found]
    if missing:
        raise DataError("download", archive, f"does not hold {', '.join(missing)}")
    log(f"unpacked {', '.join(members)} into {directory}")
    return [found[m] for m in members]


CONVERTERS = {"tff_shakespeare": tff_shakespeare_to_leaf}


def download(name: str, directory: str, mirror: str | None = None, log=print) -> list:
    """Fetch the files of ``name`` into ``directory`` and verify their published
    checksums; unpack what the loader reads from an archive, and convert where the
    loader reads another layout. Returns the paths written.

    A file whose checksum does not match is deleted and raises DataError. Files
    already present with the right checksum are kept.
    """
    spec = DOWNLOADS[name]
    mirrors = [mirror] if mirror else spec["mirrors"]
    os.makedirs(directory, exist_ok=True)
    written = []
    for algorithm in ("md5", "sha256"):
        for filename, expected in spec.get(algorithm, {}).items():
            written.append(_fetch_verified(name, directory, filename, algorithm, expected, mirrors, log))
    if "extract" in spec:
        written = [path for archive in written for path in extract_members(archive, spec["extract"], directory, log)]
    if "convert" in spec:
        written = CONVERTERS[spec["convert"]](directory, log)
    return written


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmpi.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch a data set's files and verify their published checksums")
    dl.add_argument("name", choices=sorted(DOWNLOADS))
    dl.add_argument("--dir", help="target directory (default data/<name>)")
    dl.add_argument("--mirror", help="base URL to fetch from instead of the published mirrors")
    args = parser.parse_args(argv)
    try:
        download(args.name, args.dir or os.path.join("data", args.name), args.mirror)
    except DataError as exc:
        print(f"fedmpi: download error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
