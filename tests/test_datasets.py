"""The standard federated data sets read from miniature files in their real on-disk
formats: CIFAR-10's pickle batches, TensorFlow Federated's Federated EMNIST HDF5
files, LEAF's Shakespeare JSON; and their checksum-verified download."""

from __future__ import annotations

import io
import json
import tarfile

import h5py
import numpy as np
import pytest

from conftest import make_cifar_batches, make_femnist_files, make_leaf_shakespeare, make_tff_shakespeare
from fedmpi import seeding
from fedmpi.config import from_mapping
from fedmpi.data import (
    DOWNLOADS,
    LEAF_LETTERS,
    DataError,
    download,
    encode_chars,
    file_digest,
    load,
    read_cifar_batch,
)


def _cfg(name, directory, total, **data):
    return from_mapping({"data": {"name": name, "dir": str(directory), **data},
                         "clients": {"total": total, "per_round": min(total, 2)}})


# ------------------------------------------------------------------ CIFAR-10


def test_cifar_batches_read_back_pixel_for_pixel(tmp_path):
    make_cifar_batches(tmp_path, per_batch=12, n_test=7, seed=3)
    x, y = read_cifar_batch(str(tmp_path / "data_batch_2"))
    assert x.shape == (12, 3, 32, 32) and x.dtype == np.uint8 and y.dtype == np.int64
    # the generator's pattern: class c sets plane c % 3 of its 8x8 square to 230
    for image, c in zip(x, y):
        row, col = 8 * (c // 4), 8 * (c % 4)
        assert np.all(image[c % 3, row:row + 8, col:col + 8] == 230)
        assert np.all(image[(c + 1) % 3, row:row + 8, col:col + 8] < 90)  # the other planes keep the noise


@pytest.mark.parametrize("partition", [{"name": "iid"}, {"name": "dirichlet", "alpha": 0.3}, {"name": "shards"}])
def test_cifar_loads_all_batches_and_partitions(tmp_path, partition):
    make_cifar_batches(tmp_path, per_batch=20, n_test=9)
    data = load(_cfg("cifar10", tmp_path, 5, partition=partition))
    assert data.x_train.shape == (100, 3, 32, 32) and data.x_test.shape == (9, 3, 32, 32)
    assert data.norm_mean.shape == (3,)  # standard: one mean per colour channel
    parts = data.client_indices
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    if partition["name"] == "shards":  # 2 label-sorted shards of 10 each
        assert {len(p) for p in parts} == {20}
        assert max(len(np.unique(data.y_train[p])) for p in parts) <= 4


def test_cifar_found_inside_the_unpacked_archive_folder(tmp_path):
    make_cifar_batches(tmp_path / "cifar-10-batches-py", per_batch=4, n_test=3)
    assert load(_cfg("cifar10", tmp_path, 2)).x_train.shape[0] == 20


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    make_cifar_batches(tmp_path, per_batch=4, n_test=3)
    (tmp_path / "data_batch_3").write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    with pytest.raises(DataError, match="data_batch_3 is not a readable CIFAR-10 batch .*holds os.system"):
        read_cifar_batch(str(tmp_path / "data_batch_3"))


# ------------------------------------------------------------------ Federated EMNIST


def test_femnist_each_writer_is_one_client_read_from_its_group(tmp_path):
    writers = make_femnist_files(tmp_path, writers=7)
    data = load(_cfg("femnist_digits", tmp_path, 7))
    assert data.client_names == sorted(writers) and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    with h5py.File(tmp_path / "fed_emnist_digitsonly_train.h5", "r") as f, \
            h5py.File(tmp_path / "fed_emnist_digitsonly_test.h5", "r") as t:
        for cid, writer in enumerate(data.client_names):
            x, y = data.client(cid)
            np.testing.assert_array_equal(x[:, 0], f["examples"][writer]["pixels"][()])
            np.testing.assert_array_equal(y, f["examples"][writer]["label"][()])
            assert data.client_sizes()[cid] == len(y)
        test_labels = np.concatenate([t["examples"][w]["label"][()] for w in data.client_names])
    np.testing.assert_array_equal(data.y_test, test_labels)
    assert data.x_test.shape == (len(test_labels), 1, 28, 28)


def test_femnist_fewer_clients_draw_writers_from_the_seed(tmp_path):
    writers = sorted(make_femnist_files(tmp_path, prefix="fed_emnist", writers=9, classes=62, label_column=True))
    data = load(_cfg("femnist", tmp_path, 4))
    expected = np.sort(seeding.rng(0, "natural_clients").choice(9, 4, replace=False))
    assert data.client_names == [writers[i] for i in expected] and data.num_classes == 62
    with h5py.File(tmp_path / "fed_emnist_train.h5", "r") as f:  # labels stored as a (N, 1) column
        np.testing.assert_array_equal(data.client(2)[1], f["examples"][data.client_names[2]]["label"][:, 0])
    assert len(data.y_test) < 40  # only the chosen writers' test examples
    other = load(from_mapping({"seed": 1, "data": {"name": "femnist", "dir": str(tmp_path)},
                               "clients": {"total": 4, "per_round": 2}}))
    assert other.client_names != data.client_names


def test_femnist_more_clients_than_writers_is_refused(tmp_path):
    make_femnist_files(tmp_path, writers=5)
    with pytest.raises(DataError, match=r"clients.total = 6: fed_emnist_digitsonly_train.h5 holds 5 writers .* at most 5"):
        load(_cfg("femnist_digits", tmp_path, 6))


def test_femnist_standard_normalisation_uses_the_chosen_writers_pixels(tmp_path):
    make_femnist_files(tmp_path, writers=6)
    data = load(_cfg("femnist_digits", tmp_path, 6, normalize="standard"))
    pixels = np.concatenate([data.client(c)[0] for c in range(6)])
    assert abs(float(pixels.mean())) < 1e-5 and float(pixels.std()) == pytest.approx(1.0, abs=1e-4)


def test_femnist_labels_out_of_range_are_refused(tmp_path):
    make_femnist_files(tmp_path, writers=3)
    with h5py.File(tmp_path / "fed_emnist_digitsonly_train.h5", "r+") as f:
        writer = sorted(f["examples"])[1]
        f["examples"][writer]["label"][0] = 12
    with pytest.raises(DataError, match=f"writer {writer} has labels outside 0..9"):
        load(_cfg("femnist_digits", tmp_path, 3))


# ------------------------------------------------------------------ Shakespeare


def test_leaf_characters_map_to_leaf_indices_and_others_to_one_class():
    assert len(LEAF_LETTERS) == 80 and LEAF_LETTERS[0] == "\n" and LEAF_LETTERS[-1] == "}"
    np.testing.assert_array_equal(encode_chars("Aa }\n|"), [LEAF_LETTERS.index(c) for c in "Aa }\n"] + [80])


def test_shakespeare_each_role_is_one_client_over_several_files(tmp_path):
    roles = make_leaf_shakespeare(tmp_path, roles=6, split_files=2)
    data = load(_cfg("shakespeare", tmp_path, 6))
    assert data.client_names == sorted(roles) and data.tokens and data.num_classes == 81
    assert data.input_shape == (80,) and data.x_train.dtype == np.uint8
    docs = [json.loads(p.read_text()) for p in sorted((tmp_path / "train").glob("*.json"))]
    for cid, role in enumerate(data.client_names):
        entry = next(d["user_data"][role] for d in docs if role in d["user_data"])
        x, y = data.client(cid)
        assert "".join(LEAF_LETTERS[c] for c in x[3]) == entry["x"][3]
        assert "".join(LEAF_LETTERS[c] for c in y) == "".join(entry["y"])
    assert len(data.y_test) == sum(len(json.loads(p.read_text())["user_data"][r]["y"])
                                   for p in (tmp_path / "test").glob("*.json") for r in json.loads(p.read_text())["users"])


def test_shakespeare_schema_violations_name_the_file_and_user(tmp_path):
    make_leaf_shakespeare(tmp_path, roles=2)
    path = next((tmp_path / "train").glob("*.json"))
    doc = json.loads(path.read_text())
    user = doc["users"][1]
    doc["num_samples"][1] += 1
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=f"train/{path.name}: user '{user}' has .* num_samples says"):
        load(_cfg("shakespeare", tmp_path, 2))
    path.write_text(json.dumps({"users": [], "user_data": {}}))
    with pytest.raises(DataError, match="not LEAF's layout"):
        load(_cfg("shakespeare", tmp_path, 2))


def test_tff_shakespeare_converts_to_leaf_windows(tmp_path):
    make_tff_shakespeare(tmp_path, roles=3)
    from fedmpi.data import tff_shakespeare_to_leaf

    tff_shakespeare_to_leaf(str(tmp_path), log=lambda *_: None)
    doc = json.loads((tmp_path / "train" / "shakespeare_train.json").read_text())
    with h5py.File(tmp_path / "shakespeare_train.h5", "r") as f:
        lines = [s.decode() for s in f["examples"]["ROLE_1"]["snippets"][()]]
    text = " ".join(line.replace("\n", " ") for line in lines)
    while "  " in text:
        text = text.replace("  ", " ")
    x, y = doc["user_data"]["ROLE_1"]["x"], doc["user_data"]["ROLE_1"]["y"]
    assert doc["num_samples"][1] == len(text) - 80 == len(x) == len(y)
    assert x[5] == text[5:85] and y[5] == text[85]
    assert load(_cfg("shakespeare", tmp_path, 3)).client_sizes().sum() == sum(doc["num_samples"])


# ------------------------------------------------------------------ download


def _archive(path, members: dict, mode: str) -> None:
    with tarfile.open(path, mode) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("name", ["cifar10", "femnist_digits", "shakespeare"])
def test_download_verifies_the_archive_and_unpacks_what_the_loader_reads(tmp_path, monkeypatch, name):
    """A local mirror serves an archive in the published layout; with its checksum the
    download unpacks it and the loader reads the result; with the published checksum
    (not these bytes) nothing is kept."""
    source, mirror = tmp_path / "source", tmp_path / "mirror"
    spec = DOWNLOADS[name]
    (algorithm, files), = ((a, f) for a, f in spec.items() if a in ("md5", "sha256"))
    (archive_name, published), = files.items()
    if name == "cifar10":
        make_cifar_batches(source, per_batch=4, n_test=3)
        prefix, mode, total = "cifar-10-batches-py/", "w:gz", 3
    elif name == "femnist_digits":
        make_femnist_files(source, writers=3)
        prefix, mode, total = "", "w:bz2", 3
    else:
        make_tff_shakespeare(source, roles=3)
        prefix, mode, total = "", "w:bz2", 3
    mirror.mkdir()
    _archive(mirror / archive_name, {prefix + m: (source / m).read_bytes() for m in spec["extract"]}, mode)

    with pytest.raises(DataError, match=f"does not match the published {published}"):
        download(name, str(tmp_path / "refused"), mirror=mirror.as_uri(), log=lambda *_: None)
    assert list((tmp_path / "refused").iterdir()) == []

    actual = file_digest(str(mirror / archive_name), algorithm)
    monkeypatch.setitem(DOWNLOADS, name, {**spec, algorithm: {archive_name: actual}})
    target = tmp_path / "got"
    download(name, str(target), mirror=mirror.as_uri(), log=lambda *_: None)
    data = load(_cfg(name, target, total))
    assert data.num_clients == total and len(data.y_test) > 0
    # a second run keeps the verified archive and does not fetch again
    (mirror / archive_name).unlink()
    download(name, str(target), mirror=mirror.as_uri(), log=lambda *_: None)
