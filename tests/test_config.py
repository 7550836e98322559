"""Config building, overrides and validation (pure, no MPI)."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import yaml

from conftest import CONFIGS
from fedmpi.config import Config, ConfigError, apply_override, build, from_dict, from_mapping, load, read_file, resolve


def test_default_yaml_is_the_embedded_default():
    assert from_dict(read_file(str(CONFIGS / "default.yaml"))) == Config()


def test_default_yaml_lists_every_key():
    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    assert keys(read_file(str(CONFIGS / "default.yaml"))) == keys(Config().to_dict())


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_parse(name):
    data = read_file(str(CONFIGS / name))
    cfg = from_mapping(data)
    assert isinstance(cfg, Config)


def test_overrides_parse_values_as_yaml():
    data = {}
    for assignment in ("train.lr=0.25", "model.hidden=[32, 16]", "output.overwrite=true", "data.name=synthetic",
                       "server.lr=null"):
        apply_override(data, assignment)
    cfg = from_dict(data)
    assert cfg.train.lr == 0.25 and cfg.model.hidden == (32, 16) and cfg.output.overwrite is True
    assert cfg.data.name == "synthetic" and cfg.server.lr is None


def test_override_into_a_scalar_is_refused():
    data = {"rounds": 3}
    with pytest.raises(ConfigError, match=r"rounds = 3: is not a section"):
        apply_override(data, "rounds.x=1")


def test_integers_accepted_for_floats_but_not_the_reverse():
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"rounds = 2.5: expected an integer"):
        from_dict({"rounds": 2.5})
    with pytest.raises(ConfigError, match=r"rounds = True: expected an integer"):
        from_dict({"rounds": True})


def test_non_finite_numbers_refused():
    with pytest.raises(ConfigError, match=r"train.lr = nan: expected a finite number"):
        from_dict({"train": {"lr": float("nan")}})


def test_server_lr_default_depends_on_optimizer():
    for optimizer, lr in (("avg", 1.0), ("fedavgm", 1.0), ("fedadam", 0.01)):
        assert from_dict({"server": {"optimizer": optimizer}}).server.lr is None  # unresolved
        cfg = from_mapping({"server": {"optimizer": optimizer}})
        assert cfg.server.lr == lr
    cfg = from_mapping({"server": {"optimizer": "fedadam", "lr": 0.5}})
    assert cfg.server.lr == 0.5


def test_resolved_defaults_for_data():
    cfg = from_mapping({"data": {"name": "mnist"}})
    assert cfg.data.dir == "data/mnist" and cfg.data.normalize == "standard"
    cfg = from_mapping({"data": {"name": "synthetic"}})
    assert cfg.data.normalize == "none"


def test_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rounds": 3, "clients": {"total": 8, "per_round": 4}}))
    cfg = load(str(path), ["train.lr=0.2"])
    assert (cfg.rounds, cfg.clients.total, cfg.clients.per_round, cfg.train.lr) == (3, 8, 4, 0.2)


def test_resolved_config_round_trips_through_yaml():
    cfg = load(None, ["rounds=7", "model.hidden=[10]"])
    again = from_mapping(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_error_names_key_value_and_allowed():
    with pytest.raises(ConfigError) as info:
        load(None, ["clients.per_round=17"])
    assert str(info.value) == "clients.per_round = 17: must be at most clients.total (16)"
    assert info.value.key == "clients.per_round" and info.value.value == 17


def test_validated_config_is_immutable():
    cfg = load(None, ["attack.name=ipm", "attack.clients=[1, 2]", "aggregator.pre=[{name: nnm}]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(AttributeError):
        cfg.model.hidden.append(5)  # lists are tuples
    with pytest.raises(TypeError):
        cfg.attack.params["eps"] = 1.0  # mappings are read-only
    assert cfg.attack.clients == (1, 2) and cfg.aggregator.pre[0].name == "nnm"
    assert Config().model.hidden == (200, 200)
    assert cfg.to_dict()["attack"]["clients"] == [1, 2]  # plain YAML data again


def test_resolve_returns_a_new_config_and_leaves_the_input_alone():
    built = build({"server": {"optimizer": "fedadam"}, "data": {"name": "mnist"}})
    resolved = resolve(built)
    assert (built.server.lr, built.data.dir, built.data.normalize, built.aggregator.f) == (None, None, None, None)
    assert (resolved.server.lr, resolved.data.dir, resolved.data.normalize, resolved.aggregator.f) == \
        (0.01, "data/mnist", "standard", 0)


def test_renamed_key_names_the_new_one():
    with pytest.raises(ConfigError, match=r"aggregator.pre\[0\].s = 2: renamed: use aggregator.pre\[0\].bucket_size"):
        load(None, ["aggregator.pre=[{name: bucketing, s: 2}]"])


@pytest.mark.parametrize("key, value, user", [
    ("aggregator.tau", "2.0", "aggregator.name = centered_clipping"),
    ("aggregator.m", "3", "aggregator.name = multi_krum"),
    ("server.momentum", "0.5", "server.optimizer = fedavgm"),
    ("model.hidden", "[3]", "model.name = mlp"),
    ("data.dir", "x", "data.name = mnist or fashion_mnist"),
])
def test_key_only_another_entry_reads_is_refused(key, value, user):
    base = ["model.name=logreg"] if key == "model.hidden" else []
    with pytest.raises(ConfigError, match=f"only used with {user}"):
        load(None, [*base, f"{key}={value}"])


def test_registry_names_are_the_allowed_names():
    from fedmpi.aggregation import RULES

    with pytest.raises(ConfigError) as info:
        load(None, ["aggregator.name=mean"])
    assert info.value.allowed == "must be one of " + ", ".join(RULES) + ", or user code as 'package.module:attribute'"


@pytest.mark.parametrize("content", [b"\x89HDF\r\n\x1a\n\x00\x00binary", b"rounds: 3\n\xff\xfe\n", "rounds: \u00e9".encode("latin-1")])
def test_unreadable_config_file_is_one_error(tmp_path, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"--config = .*: not a YAML text file"):
        read_file(str(path))


def test_config_directory_and_permissions(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        read_file(str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 3\n")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: nothing to test
        assert read_file(str(path)) == {"rounds": 3}
    else:
        with pytest.raises(ConfigError, match="cannot be read"):
            read_file(str(path))
