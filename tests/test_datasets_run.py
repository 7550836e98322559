"""Real jobs on the standard federated data sets (miniature files in their real
formats): training reads what the files hold, and a missing or damaged file stops
the job with one line, exit status 2 and no results file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import CONFIGS, expect_rejected, make_cifar_batches, make_femnist_files, make_leaf_shakespeare, run_job
from fedmpi.results import open_results


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("federated")
    make_cifar_batches(root / "cifar", per_batch=8, n_test=10)
    make_femnist_files(root / "femnist", prefix="fed_emnist", classes=62, writers=6)
    make_leaf_shakespeare(root / "shakespeare", roles=4, sizes=(8, 14))
    return root


def _run(ranks, config, files, cwd, *sets, out="r.h5"):
    args = ["--config", CONFIGS / config, "--out", out, "--quiet"]
    for key_value in sets:
        args += ["--set", key_value]
    proc = run_job(ranks, args, cwd)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_femnist_trains_one_client_per_writer_on_any_rank_count(files, tmp_path):
    sets = [f"data.dir={files / 'femnist'}", "clients.total=6", "clients.per_round=3", "rounds=2", "eval.every=1"]
    _run(3, "femnist_cnn.yaml", files, tmp_path, *sets, out="three.h5")
    _run(None, "femnist_cnn.yaml", files, tmp_path, *sets, out="one.h5")
    with open_results(tmp_path / "three.h5") as f, open_results(tmp_path / "one.h5") as g, \
            h5py.File(files / "femnist" / "fed_emnist_train.h5", "r") as src:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["data_client_names"]]
        assert names == sorted(src["examples"])
        ids, samples = f["clients/client_id"][:], f["clients/num_samples"][:]
        assert len(ids) == 6 and f.attrs["model_num_classes"] == 62
        for cid, n in zip(ids, samples):
            assert n == len(src["examples"][names[cid]]["label"])
        assert np.all(np.isfinite(f["rounds/test_loss"][:]))
        assert f["model/final"][:].tobytes() == g["model/final"][:].tobytes()


def test_cifar_cnn_trains_on_the_pickle_batches(files, tmp_path):
    _run(None, "cifar10_cnn.yaml", files, tmp_path, f"data.dir={files / 'cifar'}", "clients.total=4",
         "clients.per_round=2", "rounds=1", "train.epochs=1", "train.batch_size=10")
    with open_results(tmp_path / "r.h5") as f:
        assert f["model"].attrs["num_params"] == 1_756_426
        assert list(f.attrs["model_input_shape"]) == [3, 32, 32]
        assert f["clients/num_samples"][:].sum() == 20  # two of the four IID clients, 10 images each
        assert np.isfinite(f["rounds/test_accuracy"][0])


def test_char_lstm_with_dp_sgd_says_its_per_layer_paths_once(files, tmp_path):
    proc = run_job(2, ["--config", CONFIGS / "shakespeare_lstm_dp.yaml", "--set", f"data.dir={files / 'shakespeare'}",
                       "--set", "clients.total=4", "--set", "clients.per_round=2", "--set", "rounds=1",
                       "--set", "privacy.accountant=rdp", "--out", "dp.h5"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "per-example gradients" in ln]
    assert lines == ["fedmpi: DP-SGD per-example gradients: ghost norm for 1 layer (4: Linear); torch.func vmap for "
                     "3 layers (0: TokenEmbedding, 1: LSTMLayer, 2: LSTMLayer)"]
    with open_results(tmp_path / "dp.h5") as f:
        assert f.attrs["model_num_classes"] == 81 and f["model"].attrs["num_params"] == 820_185
        clipped = f["clients/clipped_fraction"][:]
        assert np.all((clipped >= 0) & (clipped <= 1)) and np.isfinite(f["rounds/epsilon"][0])
        assert np.all(f["clients/steps"][:] > 0)


def _damage(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])


@pytest.mark.parametrize("case", ["femnist missing", "femnist truncated", "cifar missing", "cifar truncated",
                                  "shakespeare missing", "shakespeare truncated"])
def test_missing_or_damaged_files_stop_the_job(files, tmp_path, case):
    name, what = case.split(" ", 1)
    directory = tmp_path / name
    config = {"femnist": "femnist_cnn.yaml", "cifar": "cifar10_cnn.yaml", "shakespeare": "shakespeare_lstm.yaml"}[name]
    maker = {"femnist": lambda: make_femnist_files(directory, prefix="fed_emnist", classes=62, writers=6),
             "cifar": lambda: make_cifar_batches(directory, per_batch=4, n_test=4),
             "shakespeare": lambda: make_leaf_shakespeare(directory, roles=4)}[name]
    maker()
    expected = {
        "femnist missing": ("data.dir", "missing fed_emnist_test.h5", "python -m fedmpi.data download femnist"),
        "femnist truncated": ("fed_emnist_train.h5 is not a readable HDF5 file",),
        "cifar missing": ("missing test_batch (CIFAR-10's Python pickle batches)", "download cifar10"),
        "cifar truncated": ("data_batch_4 is not a readable CIFAR-10 batch",),
        "shakespeare missing": ("missing test/*.json", "download shakespeare"),
        "shakespeare truncated": ("train/all_data_niid_0_keep_0_train_0.json: not a readable JSON file",),
    }[case]
    if case == "femnist missing":
        (directory / "fed_emnist_test.h5").unlink()
    elif case == "femnist truncated":
        _damage(directory / "fed_emnist_train.h5")
    elif case == "cifar missing":
        (directory / "test_batch").unlink()
    elif case == "cifar truncated":
        _damage(directory / "data_batch_4")
    elif case == "shakespeare missing":
        for p in (directory / "test").iterdir():
            p.unlink()
    elif case == "shakespeare truncated":
        _damage(directory / "train" / "all_data_niid_0_keep_0_train_0.json")
    ranks = 2 if what == "missing" else None  # real mpirun jobs and single processes
    expect_rejected(tmp_path, ["--config", CONFIGS / config, "--set", f"data.dir={directory}", "--set",
                               "clients.total=4", "--set", "clients.per_round=2"], "data error", *expected, ranks=ranks)
