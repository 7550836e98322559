"""Datasets and how they are split over virtual clients.

Datasets: ``synthetic`` (FedProx's Synthetic(alpha, beta), Li et al. 2020),
``digits`` (UCI handwritten digits, shipped inside scikit-learn), ``mnist`` and
``fashion_mnist`` (standard IDX files in a directory), ``npz`` (user arrays).
Each is one :data:`DATASETS` entry: in-memory data sets give their arrays
(then normalised and partitioned here), naturally federated ones build their
clients themselves. A new in-memory data set is one loader plus one entry.

Partitioners: ``iid``; ``dirichlet`` label skew (Hsu et al. 2019); ``shards``,
k label-sorted shards per client (McMahan et al. 2017).

Everything is drawn from keyed generators (:mod:`fedmpi.seeding`), so every rank
computes the same split without talking to the others.

Command line: ``python -m fedmpi.data download mnist --dir data/mnist`` fetches
the IDX files and verifies their published MD5 checksums.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import os
import shutil
import sys
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
    ``synthetic`` generates each client's data from its key when first asked.
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
    full: FederatedData | None = field(default=None, repr=False)  # a membership audit's split: the data before it

    def client(self, cid: int) -> tuple[np.ndarray, np.ndarray]:
        if self.generate is not None:
            if cid not in self._cache:
                self._cache[cid] = self.generate(cid)[:2]
            return self._cache[cid]
        idx = self.client_indices[cid]
        return self.x_train[idx], self.y_train[idx]

    def client_sizes(self) -> np.ndarray:
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


IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

# Published MD5 checksums of the gzipped IDX files.
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
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim not in (2, 3, 4):
            raise DataError("data.path", path, f"x_{split} has shape {x.shape}; expected (N, D), (N, H, W) or (N, C, H, W)")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError("data.path", path, f"y_{split} has shape {y.shape}; expected ({len(x)},) to match x_{split}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError("data.path", path, f"y_{split} has dtype {y.dtype}; labels must be integers")
        if len(y) and y.min() < 0:
            raise DataError("data.path", path, f"y_{split} holds negative labels; labels must be 0..C-1")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError("data.path", path, f"x_train samples {arrays['x_train'].shape[1:]} and x_test samples "
                        f"{arrays['x_test'].shape[1:]} differ in shape")
    if len(arrays["y_train"]) == 0 or len(arrays["y_test"]) == 0:
        raise DataError("data.path", path, "x_train and x_test must each hold at least one sample")
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
}


# --------------------------------------------------------------------------- entry point


def check_files(cfg: Config) -> None:
    """Cheap existence checks, run on every rank before MPI traffic."""
    entry = DATASETS[cfg.data.name]
    if entry.check_files is not None:
        entry.check_files(cfg.data)


def load(cfg: Config, need_train: bool = True, need_test: bool = True) -> FederatedData:
    """Load (or generate) the configured data and split it over ``clients.total`` clients."""
    d = cfg.data
    entry = DATASETS[d.name]
    if entry.federated is not None:
        return entry.federated(cfg, need_test)
    x_train, y_train, x_test, y_test = entry.arrays(cfg)
    # integer data are scaled like 8-bit pixels; float data are taken as in [0, 1]
    value_range = entry.value_range or (255.0 if np.issubdtype(x_train.dtype, np.integer) else 1.0)
    x_train, x_test, mean, std = normalize(x_train, x_test, d.normalize, value_range)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    indices = partition(y_train, cfg)
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


def md5sum(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(name: str, directory: str, mirror: str | None = None, log=print) -> list:
    """Fetch the four gzipped IDX files of ``name`` into ``directory``; verify MD5s.

    A file whose checksum does not match is deleted and raises DataError. Files
    already present with the right checksum are kept.
    """
    spec = DOWNLOADS[name]
    mirrors = [mirror] if mirror else spec["mirrors"]
    os.makedirs(directory, exist_ok=True)
    written = []
    for filename, expected in spec["md5"].items():
        target = os.path.join(directory, filename)
        if os.path.isfile(target) and md5sum(target) == expected:
            log(f"ok       {target} (already present, checksum verified)")
            written.append(target)
            continue
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
            actual = md5sum(tmp)
            if actual != expected:
                os.unlink(tmp)
                errors.append(f"{url}: MD5 {actual} does not match the published {expected}")
                continue
            os.replace(tmp, target)
            log(f"fetched  {target} (MD5 {actual} verified)")
            written.append(target)
            break
        else:
            raise DataError("download", name, f"could not fetch a verified {filename}: " + "; ".join(errors))
    return written


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmpi.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch MNIST-style IDX files and verify their checksums")
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
