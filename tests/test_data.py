"""Datasets and partitioners: determinism, coverage, skew, file formats."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import make_idx_dataset, write_idx
from fedmpi import seeding
from fedmpi.config import from_mapping
from fedmpi.data import (
    DataError,
    download,
    load,
    md5sum,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    read_idx,
)


def _cfg(**sections):
    cfg = from_mapping(sections)
    return cfg


def _labels(n=1000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


def _is_exact_cover(parts, n):
    allidx = np.concatenate(parts)
    return len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_partition_covers_everything_evenly():
    parts = partition_iid(1003, 10, seeding.rng(0, "partition"))
    assert _is_exact_cover(parts, 1003)
    assert {len(p) for p in parts} == {100, 101}


def test_dirichlet_small_alpha_skews_labels_more():
    labels = _labels(5000)

    def mean_classes(alpha):
        parts = partition_dirichlet(labels, 20, alpha, seeding.rng(1, "partition"))
        assert _is_exact_cover(parts, 5000)
        # classes holding at least 5% of a client's samples
        return np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 0.05 * len(p)) for p in parts])

    skewed, mild = mean_classes(0.1), mean_classes(100.0)
    assert skewed < 4 and mild > 9, (skewed, mild)


def test_dirichlet_respects_min_samples():
    parts = partition_dirichlet(_labels(2000), 50, 0.3, seeding.rng(2, "partition"), min_samples=10)
    assert min(len(p) for p in parts) >= 10


def test_shards_give_each_client_few_labels():
    labels = np.sort(_labels(2000))
    parts = partition_shards(labels, 100, 2, seeding.rng(0, "partition"))
    assert _is_exact_cover(parts, 2000)
    assert {len(p) for p in parts} == {20}
    assert max(len(np.unique(labels[p])) for p in parts) <= 4  # 2 shards, each may straddle one class boundary
    assert np.mean([len(np.unique(labels[p])) for p in parts]) < 2.5


def test_partitions_depend_on_seed_only():
    labels = _labels()
    for fn in (lambda g: partition_dirichlet(labels, 10, 0.5, g), lambda g: partition_shards(labels, 10, 2, g),
               lambda g: partition_iid(1000, 10, g)):
        a = fn(seeding.rng(5, "partition"))
        b = fn(seeding.rng(5, "partition"))
        c = fn(seeding.rng(6, "partition"))
        assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_digits_split_and_standard_normalization():
    data = load(_cfg())
    assert len(data.y_train) == 1438 and len(data.y_test) == 359 and data.num_classes == 10
    assert data.input_shape == (1, 8, 8) and data.x_train.dtype == np.float32
    assert abs(float(data.x_train.mean())) < 1e-5 and float(data.x_train.std()) == pytest.approx(1.0, abs=1e-4)
    assert data.norm_mean.shape == (1,)
    sizes = data.client_sizes()
    assert sizes.sum() == 1438 and sizes.max() - sizes.min() <= 1


def test_unit_normalization_scales_digits_to_unit_interval():
    data = load(_cfg(data={"normalize": "unit"}))
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0


def test_synthetic_is_keyed_per_client_and_non_iid():
    cfg = _cfg(data={"name": "synthetic"}, clients={"total": 10, "per_round": 5})
    a, b = load(cfg), load(cfg)
    for cid in range(10):
        xa, ya = a.client(cid)
        xb, yb = b.client(cid)
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    sizes = a.client_sizes()
    assert sizes.min() >= 40 and len(set(sizes)) > 1  # lognormal sizes, 50+ samples before the test split
    hist = np.stack([np.bincount(a.client(c)[1], minlength=10) / len(a.client(c)[1]) for c in range(10)])
    assert np.abs(hist - hist.mean(0)).sum(1).mean() > 0.5  # label mixes differ a lot between clients
    # the test set pools every client's held-out part
    from fedmpi.data import synthetic_client

    held_out = [synthetic_client(cfg, c)[3] for c in range(10)]
    assert np.array_equal(a.y_test, np.concatenate(held_out))
    assert all(len(h) == round(0.2 * (len(h) + s)) for h, s in zip(held_out, sizes))
    assert a.x_test.shape[1] == 60


def test_idx_round_trip_plain_and_gzip(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, images)
        assert np.array_equal(read_idx(str(tmp_path / name)), images)


def test_idx_dataset_loads_as_images(tmp_path):
    make_idx_dataset(tmp_path, n_train=300, n_test=40)
    data = load(_cfg(data={"name": "mnist", "dir": str(tmp_path)}, clients={"total": 10, "per_round": 2}))
    assert data.x_train.shape == (300, 1, 28, 28) and data.x_test.shape == (40, 1, 28, 28)
    assert data.y_train.dtype == np.int64


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.normal(size=(50, 5)), y_train=rng.integers(0, 3, 50),
             x_test=rng.normal(size=(20, 5)), y_test=rng.integers(0, 3, 20))
    data = load(_cfg(data={"name": "npz", "path": str(tmp_path / "d.npz"), "normalize": "none"},
                     clients={"total": 5, "per_round": 5}))
    assert data.input_shape == (5,) and data.num_classes == 3 and data.client_sizes().sum() == 50


def test_download_verifies_checksums(tmp_path):
    """A mirror serving files whose MD5 differs from the published one is rejected and nothing is kept."""
    mirror = tmp_path / "mirror"
    make_idx_dataset(mirror, n_train=20, n_test=5)
    target = tmp_path / "got"
    with pytest.raises(DataError, match="does not match the published f68b3c2dcbeaaa9fbdd348bbdeb94873"):
        download("mnist", str(target), mirror=mirror.as_uri(), log=lambda *_: None)
    assert list(target.iterdir()) == []


def test_download_keeps_verified_files(tmp_path, monkeypatch):
    """Files whose checksums match are accepted (checksums patched to the test files')."""
    from fedmpi import data as data_mod

    mirror = tmp_path / "mirror"
    make_idx_dataset(mirror, n_train=20, n_test=5)
    sums = {p.name: md5sum(str(p)) for p in mirror.iterdir()}
    monkeypatch.setitem(data_mod.DOWNLOADS, "mnist", {"mirrors": [], "md5": sums})
    written = download("mnist", str(tmp_path / "got"), mirror=mirror.as_uri(), log=lambda *_: None)
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == sorted(sums)
    assert all(md5sum(p) == sums[p.rsplit("/", 1)[-1]] for p in written)
