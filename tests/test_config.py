"""Config building, overrides and validation (pure, no MPI)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from conftest import CONFIGS
from fedmpi.config import Config, ConfigError, apply_override, from_dict, load, read_file, validate


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
    cfg = from_dict(data)
    assert isinstance(cfg, Config)


def test_overrides_parse_values_as_yaml():
    data = {}
    for assignment in ("train.lr=0.25", "model.hidden=[32, 16]", "output.overwrite=true", "data.name=synthetic",
                       "server.lr=null"):
        apply_override(data, assignment)
    cfg = from_dict(data)
    assert cfg.train.lr == 0.25 and cfg.model.hidden == [32, 16] and cfg.output.overwrite is True
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
        cfg = from_dict({"server": {"optimizer": optimizer}})
        validate(cfg)
        assert cfg.server.lr == lr
    cfg = from_dict({"server": {"optimizer": "fedadam", "lr": 0.5}})
    validate(cfg)
    assert cfg.server.lr == 0.5


def test_resolved_defaults_for_data():
    cfg = from_dict({"data": {"name": "mnist"}})
    validate(cfg)
    assert cfg.data.dir == "data/mnist" and cfg.data.normalize == "standard"
    cfg = from_dict({"data": {"name": "synthetic"}})
    validate(cfg)
    assert cfg.data.normalize == "none"


def test_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"rounds": 3, "clients": {"total": 8, "per_round": 4}}))
    cfg = load(str(path), ["train.lr=0.2"])
    assert (cfg.rounds, cfg.clients.total, cfg.clients.per_round, cfg.train.lr) == (3, 8, 4, 0.2)


def test_resolved_config_round_trips_through_yaml():
    cfg = load(None, ["rounds=7", "model.hidden=[10]"])
    again = from_dict(yaml.safe_load(cfg.to_yaml()))
    validate(again)
    assert again == cfg


def test_error_names_key_value_and_allowed():
    with pytest.raises(ConfigError) as info:
        load(None, ["clients.per_round=17"])
    assert str(info.value) == "clients.per_round = 17: must be at most clients.total (16)"
    assert info.value.key == "clients.per_round" and info.value.value == 17


def test_mutable_defaults_are_not_shared():
    a, b = Config(), Config()
    a.model.hidden.append(5)
    assert b.model.hidden == [200, 200]
    assert all(f.default is dataclasses.MISSING or not isinstance(f.default, (list, dict))
               for f in dataclasses.fields(Config))
