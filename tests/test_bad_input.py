"""Bad input stops a real 2-rank job with one clear line, exit status 2, and no results file."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CONFIGS, expect_rejected, make_idx_dataset, run_job, write_idx

_expect_rejected = expect_rejected

CONFIG_CASES = {
    "unknown key": (["--set", "train.lrr=0.1"], "train.lrr = 0.1", "unknown key", "lr"),
    "unknown section": (["--set", "optimiser.lr=1"], "optimiser", "unknown key"),
    "wrong type": (["--set", "train.lr=fast"], "train.lr = 'fast'", "expected a number"),
    "bool expected": (["--set", "output.overwrite=maybe"], "output.overwrite = 'maybe'", "true or false"),
    "per_round above total": (["--set", "clients.per_round=20"], "clients.per_round = 20", "at most clients.total (16)"),
    "negative rounds": (["--set", "rounds=-3"], "rounds = -3", ">= 1"),
    "negative learning rate": (["--set", "train.lr=-0.1"], "train.lr = -0.1", "> 0"),
    "momentum of one": (["--set", "server.momentum=1.0"], "server.momentum = 1.0", "[0, 1)"),
    "unknown dataset": (["--set", "data.name=imagenet"], "data.name = 'imagenet'", "one of synthetic, digits"),
    "unknown model": (["--set", "model.name=resnet"], "model.name = 'resnet'", "logreg, mlp, cnn"),
    "unknown partitioner": (["--set", "data.partition.name=zipf"], "data.partition.name = 'zipf'", "iid, dirichlet, shards"),
    "hidden width zero": (["--set", "model.hidden=[200,0]"], "model.hidden[1] = 0", ">= 1"),
    "set without value": (["--set", "rounds"], "--set = 'rounds'", "KEY=VALUE"),
    "path for a non-npz dataset": (["--set", "data.path=x.npz"], "data.path = 'x.npz'", "only used with data.name = npz"),
    "more clients than samples": (["--set", "clients.total=5000", "--set", "clients.per_round=10"],
                                  "clients.total = 5000", "more clients than training samples (1438)"),
    "too many shards": (["--set", "data.partition.name=shards", "--set", "data.partition.shards_per_client=100"],
                        "data.partition.shards_per_client = 100", "1600 shards", "1438 training samples"),
    "impossible dirichlet minimum": (["--set", "data.partition.name=dirichlet", "--set", "data.partition.min_samples=200"],
                                     "data.partition.min_samples = 200", "lower it or raise data.partition.alpha"),
    "cnn on vector data": (["--set", "data.name=synthetic", "--set", "model.name=cnn"],
                           "model.name = 'cnn'", "needs image inputs", "(60,)"),
    "character model on pixels": (["--set", "model.name=char_lstm"], "model.name = 'char_lstm'",
                                  "takes character codes, but data.name = digits gives real-valued inputs"),
    "krum cannot tolerate f": (["--set", "aggregator.name=krum", "--set", "aggregator.f=7"],
                               "aggregator.f = 7", "krum needs n >= 2f + 3; got n = 16, f = 7"),
    "unknown attack parameter": (["--set", "attack.name=ipm", "--set", "attack.fraction=0.25", "--set", "attack.params={lambda: 2}"],
                                 "attack.params.lambda = 2:", "unknown parameter for ipm (allowed: eps)"),
    "unknown aggregator": (["--set", "aggregator.name=mean"], "aggregator.name = 'mean'", "fedavg, krum, multi_krum"),
    "negative noise": (["--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=-1"],
                       "privacy.noise_multiplier = -1.0", "must be >= 0"),
    "delta of one": (["--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1", "--set", "privacy.delta=1"],
                     "privacy.delta = 1.0", "must be in (0, 1)"),
    "zero clip norm": (["--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1", "--set", "privacy.max_grad_norm=0"],
                       "privacy.max_grad_norm = 0.0", "must be > 0"),
    "non-positive target epsilon": (["--set", "privacy.mode=sample", "--set", "privacy.target_epsilon=0"],
                                    "privacy.target_epsilon = 0.0", "must be > 0"),
    "dp without noise setting": (["--set", "privacy.mode=client_local"], "privacy.mode = 'client_local'",
                                 "needs privacy.noise_multiplier or privacy.target_epsilon"),
    "central dp with krum": (["--set", "privacy.mode=client_central", "--set", "privacy.noise_multiplier=1",
                              "--set", "aggregator.name=krum", "--set", "privacy.accountant=rdp"],
                             "privacy.mode = 'client_central'", "only aggregator.name = fedavg"),
    "memory budget too small": (["--set", "memory_limit_gb=0.05"], "clients.per_round = 16",
                                "over its budget of 0.05 GiB (memory_limit_gb = 0.05)", "transport: reduce"),
    "reduce with a robust rule": (["--set", "transport=reduce", "--set", "aggregator.name=median"],
                                  "transport = 'reduce'", "aggregator.name = median needs every row"),
    "normalizing synthetic data": (["--set", "data.name=synthetic", "--set", "data.normalize=standard"],
                                   "data.normalize = 'standard'", "allowed: none"),
    "sharded with central dp": (["--set", "transport=sharded", "--set", "privacy.mode=client_central",
                                 "--set", "privacy.noise_multiplier=1", "--set", "privacy.accountant=rdp"],
                                "privacy.mode = 'client_central'", "not with transport: sharded"),
    "shard block without sharding": (["--set", "shard_block=64"], "shard_block = 64", "only used with transport = sharded"),
    "inversion of large shards": (["--set", "audit.inversion.method=dlg"], "audit.inversion.max_examples = 8",
                                  "clients hold up to 90 examples"),
    "analytic inversion of a batch": (["--set", "audit.inversion.method=analytic", "--set", "clients.total=700",
                                       "--set", "audit.inversion.max_examples=4"],
                                      "audit.inversion.method = 'analytic'", "clients hold up to 3 examples"),
    "membership audit with sharding": (["--set", "transport=sharded", "--set", "audit.membership.level=example"],
                                       "audit.membership.level = 'example'", "not with transport: sharded"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_value(tmp_path, case):
    args, *fragments = CONFIG_CASES[case]
    _expect_rejected(tmp_path, args, *fragments)


def test_config_file_not_found(tmp_path):
    _expect_rejected(tmp_path, ["--config", "nope.yaml"], "--config = 'nope.yaml'", "file not found")


def test_malformed_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("rounds: 3\ntrain: {lr: 0.1\n")
    _expect_rejected(tmp_path, ["--config", "bad.yaml"], "--config = 'bad.yaml'", "not valid YAML", "line")


def test_config_not_a_mapping(tmp_path):
    (tmp_path / "list.yaml").write_text("- rounds\n- 3\n")
    _expect_rejected(tmp_path, ["--config", "list.yaml"], "mapping of keys")


def test_json_config_with_bad_section(tmp_path):
    (tmp_path / "c.json").write_text('{"rounds": 2, "clients": 16}')
    _expect_rejected(tmp_path, ["--config", "c.json"], "clients = 16", "expected a mapping")


def test_existing_results_file_is_not_overwritten(tmp_path):
    out = tmp_path / "out.h5"
    out.write_bytes(b"precious")
    proc = run_job(2, ["--out", out, "--quiet"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "output.path" in proc.stderr and "file exists" in proc.stderr and "--overwrite" in proc.stderr
    assert out.read_bytes() == b"precious"


def test_missing_mnist_files_say_how_to_get_them(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _expect_rejected(tmp_path, ["--config", CONFIGS / "mnist_cnn.yaml", "--set", f"data.dir={tmp_path / 'empty'}"],
                            "data error", "data.dir", "missing train-images-idx3-ubyte[.gz]",
                            "python -m fedmpi.data download mnist")
    assert "t10k-labels-idx1-ubyte[.gz]" in line


def test_truncated_idx_file(tmp_path):
    make_idx_dataset(tmp_path / "idx", n_train=200, n_test=50)
    raw = tmp_path / "idx" / "train-images-idx3-ubyte"
    write_idx(raw, np.zeros((200, 28, 28)))
    raw.write_bytes(raw.read_bytes()[:-100])
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").unlink()
    _expect_rejected(tmp_path, ["--set", "data.name=mnist", "--set", f"data.dir={tmp_path / 'idx'}"],
                     "data error", "train-images-idx3-ubyte is truncated")


def test_idx_file_with_bad_magic(tmp_path):
    make_idx_dataset(tmp_path / "idx", n_train=200, n_test=50)
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "idx" / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04 not an idx file")
    _expect_rejected(tmp_path, ["--set", "data.name=fashion_mnist", "--set", f"data.dir={tmp_path / 'idx'}"],
                     "t10k-labels-idx1-ubyte is not an IDX file")


def test_npz_file_missing(tmp_path):
    _expect_rejected(tmp_path, ["--set", "data.name=npz", "--set", "data.path=absent.npz"],
                     "data.path = 'absent.npz'", "file not found")


def test_npz_missing_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((10, 4)), y_train=np.zeros(10, int))
    _expect_rejected(tmp_path, ["--set", "data.name=npz", "--set", "data.path=d.npz"],
                     "missing arrays x_test, y_test")


def test_npz_labels_do_not_match_samples(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((10, 4)), y_train=np.zeros(9, int),
             x_test=np.zeros((5, 4)), y_test=np.zeros(5, int))
    _expect_rejected(tmp_path, ["--set", "data.name=npz", "--set", "data.path=d.npz"],
                     "y_train has shape (9,)", "expected (10,)")


def test_npz_float_labels(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((10, 4)), y_train=np.zeros(10),
             x_test=np.zeros((5, 4)), y_test=np.zeros(5, int))
    _expect_rejected(tmp_path, ["--set", "data.name=npz", "--set", "data.path=d.npz"],
                     "y_train has dtype float64", "integers")


def test_npz_not_an_archive(tmp_path):
    (tmp_path / "d.npz").write_text("hello")
    _expect_rejected(tmp_path, ["--set", "data.name=npz", "--set", "data.path=d.npz"],
                     "data.path = 'd.npz'", "not a readable .npz archive")
