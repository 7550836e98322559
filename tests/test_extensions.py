"""User code named by import path (fedmpi.extensions), in real runs: the tutorial's
package (examples/fedmpi_ext) on 2 and 3 ranks and resumed, fedmpi.simulate against
mpirun, user code written like the built-ins giving their bytes, state that a resume
restores, bad extensions refused before any MPI traffic, and a rule that breaks its
contract mid-run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import REPO, expect_rejected, run_job
from fedmpi.results import CLIENT_FIELDS, ROUND_FIELDS, load, open_results

EXAMPLES = REPO / "examples"
HELPERS = REPO / "tests" / "helpers"  # userext.py, usermodels.py: test-only user code
TUTORIAL = ["--config", EXAMPLES / "extension_run.yaml", "--set", "rounds=4", "--set", "output.checkpoint_every=2",
            "--quiet"]
TIMING = {"wall_s", "train_s", "comm_s", "aggregate_s", "eval_s"}


@pytest.fixture(scope="module", autouse=True)
def user_code_on_path():
    """examples/ and tests/helpers importable, here and in the jobs started (PYTHONPATH)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(EXAMPLES), str(HELPERS), os.environ.get("PYTHONPATH", "")]))
        mp.syspath_prepend(str(EXAMPLES))
        mp.syspath_prepend(str(HELPERS))
        yield


def _same_run(a_path, b_path) -> None:
    """Bit for bit: the final weights and every non-timing column of /rounds and /clients."""
    with open_results(a_path) as a, open_results(b_path) as b:
        assert a["model/final"][:].tobytes() == b["model/final"][:].tobytes()
        for group, fields in (("rounds", ROUND_FIELDS), ("clients", CLIENT_FIELDS)):
            for name in fields:
                if name not in TIMING:
                    assert a[group][name][:].tobytes() == b[group][name][:].tobytes(), f"/{group}/{name} differs"


@pytest.fixture(scope="module")
def tutorial_three_ranks(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("tutorial")
    proc = run_job(3, [*TUTORIAL, "--out", "three.h5"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "three.h5"


def test_tutorial_package_is_bitwise_identical_on_2_and_3_ranks_and_resumes_exactly(tmp_path, tutorial_three_ranks):
    """Half the rounds on 2 ranks, resumed on 2 ranks, equals all of them on 3 ranks:
    rank-count invariance and an exact resume (fedmpi.simulate adds 1 process below)."""
    half = run_job(2, [*TUTORIAL, "--set", "rounds=2", "--out", "resumed.h5"], tmp_path)
    assert half.returncode == 0, half.stderr
    assert len(load(str(tmp_path / "resumed.h5")).rounds) == 2
    resumed = run_job(2, ["--resume", "resumed.h5", "--set", "rounds=4", "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _same_run(tutorial_three_ranks, tmp_path / "resumed.h5")

    run = load(str(tutorial_three_ranks))
    records = {r["key"]: r for r in json.loads(run.attrs["extensions"])}
    files = {"data.name": "data.py", "model.name": "models.py", "aggregator.name": "rules.py", "attack.name": "attacks.py"}
    assert set(records) == set(files)
    for key, name in files.items():
        assert records[key]["version"] == "0.1.0"
        assert records[key]["sha256"] == hashlib.sha256((EXAMPLES / "fedmpi_ext" / name).read_bytes()).hexdigest()
    assert run.clients["byzantine"].any()
    assert run.clients.groupby("round")["selected"].sum().tolist() == [10 - 2] * 4  # DnC keeps n - ceil(c f) = 10 - 2


def test_tutorial_rule_and_attack_do_what_their_papers_say():
    from fedmpi_ext.attacks import byzmean_rows
    from fedmpi_ext.rules import dnc

    from fedmpi.attacks import alie

    honest = np.random.default_rng(3).normal(size=(7, 40)).astype(np.float32)
    for f in (1, 2, 3):
        target, balance = byzmean_rows(honest, f)
        m1 = f // 2
        everything = np.vstack([honest, np.repeat(target[None], m1, 0), np.repeat(balance[None], f - m1, 0)])
        np.testing.assert_allclose(everything.mean(axis=0), target, rtol=0, atol=1e-12)  # ByzMean: the mean is the target
        np.testing.assert_array_equal(target, alie(honest, 7 + f, f))
    rows = np.vstack([honest, 30 * np.ones((1, 40), np.float32)])  # one row far along one direction
    result = dnc(rows, f=2, rng=np.random.default_rng(0), subsample=25)
    assert 7 not in result.selected and len(result.selected) == 6 and result.scores.argmax() == 7
    np.testing.assert_allclose(result.vector, rows[result.selected].astype(np.float64).mean(axis=0))


def test_simulate_gives_the_bytes_of_mpirun(tmp_path, tutorial_three_ranks):
    import torch

    import fedmpi

    threads = torch.get_num_threads()
    run = fedmpi.simulate(EXAMPLES / "extension_run.yaml", overrides=["rounds=4", "output.checkpoint_every=2"],
                          out=tmp_path / "simulated.h5")
    assert torch.get_num_threads() == threads
    assert run.finished and len(run.rounds) == 4 and run.path == str(tmp_path / "simulated.h5")
    with h5py.File(tutorial_three_ranks, "r") as f:
        assert run.final_model.tobytes() == f["model/final"][:].tobytes()
    _same_run(tutorial_three_ranks, tmp_path / "simulated.h5")


def test_user_code_written_like_the_built_ins_gives_their_bytes(tmp_path):
    """Data set (arrays), model, rule, pre-aggregation step, attack and optimizer as user
    code get exactly what the built-ins get, keyed randomness and state included."""
    import fedmpi

    common = {"rounds": 2, "clients": {"total": 16, "per_round": 12}, "output": {"checkpoint_every": 0}}
    builtin = {**common, "data": {"name": "digits"}, "model": {"name": "logreg"},
               "server": {"optimizer": "fedavgm", "momentum": 0.8},
               "aggregator": {"name": "krum", "pre": [{"name": "clip", "max_norm": 0.5}]},
               "attack": {"name": "alie", "fraction": 0.25}}
    user = {**common, "data": {"name": "userext:digits"}, "model": {"name": "usermodels:logreg"},
            "server": {"optimizer": "userext:server_momentum", "params": {"beta": 0.8}},
            "aggregator": {"name": "userext:krum_rule", "pre": [{"name": "userext:clip_step", "params": {"max_norm": 0.5}}]},
            "attack": {"name": "userext:alie_attack", "fraction": 0.25}}
    a = fedmpi.simulate(builtin, out=tmp_path / "builtin.h5")
    b = fedmpi.simulate(user, out=tmp_path / "user.h5")
    assert a.final_model.tobytes() == b.final_model.tobytes()
    assert not a.clients["selected"].all()  # Krum selected one row per round
    _same_run(tmp_path / "builtin.h5", tmp_path / "user.h5")
    assert json.loads(b.attrs["extensions"])[0]["key"] == "data.name" and "extensions" not in a.attrs


def test_rule_state_is_checkpointed_and_restored_on_resume(tmp_path):
    import fedmpi

    config = {"aggregator": {"name": "userext:smoothed_median", "params": {"beta": 0.7}}, "model": {"name": "logreg"},
              "clients": {"per_round": 8}}
    fedmpi.simulate(config, overrides=["rounds=4"], out=tmp_path / "full.h5")
    fedmpi.simulate(config, overrides=["rounds=2"], out=tmp_path / "half.h5")
    with open_results(tmp_path / "half.h5") as f:  # the running mean after round 1 is in the checkpoint
        slot, round_index = f["checkpoint/current"][:]
        average = f[f"checkpoint/slot{slot}/aggregator/average"][:]
        assert round_index == 1 and np.isfinite(average).all() and np.abs(average).max() > 0
    resumed = run_job(None, ["--resume", "half.h5", "--set", "rounds=4", "--quiet"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _same_run(tmp_path / "full.h5", tmp_path / "half.h5")


def test_resume_refuses_user_code_that_changed(tmp_path):
    import fedmpi

    package = tmp_path / "changing"
    package.mkdir()
    shutil.copy(HELPERS / "userext.py", package / "changing_rule.py")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join([str(package), os.environ["PYTHONPATH"]]))
        mp.syspath_prepend(str(package))
        fedmpi.simulate({"aggregator": {"name": "changing_rule:krum_rule"}, "rounds": 1, "model": {"name": "logreg"}},
                        out=tmp_path / "run.h5")
        with open(package / "changing_rule.py", "a") as fh:
            fh.write("\n# edited after the run started\n")
        again = run_job(None, ["--resume", "run.h5", "--set", "rounds=2", "--quiet"], tmp_path)
    assert again.returncode == 2
    assert "aggregator.name = 'changing_rule:krum_rule': the user code changed since the run started (sha256" in again.stderr
    assert len(load(str(tmp_path / "run.h5")).rounds) == 1


@pytest.mark.parametrize("overrides, key, message", [
    (["aggregator.name=userext:needs_threshold"], "aggregator.params", "userext:needs_threshold needs threshold"),
    (["aggregator.name=userext:needs_threshold", "aggregator.params={threshold: yes}"], "aggregator.params.threshold",
     "expected a number (the annotation in userext:needs_threshold)"),
    (["aggregator.name=userext:needs_threshold", "aggregator.params={threshold: 1, label: 2}"], "aggregator.params.label",
     "expected a string"),
    (["aggregator.name=userext:needs_threshold", "aggregator.params={threshold: 1, f: 2}"], "aggregator.params.f",
     "f is passed by fedmpi to userext:needs_threshold; it is not a parameter"),
    (["aggregator.name=userext:takes_state_undeclared"], "aggregator.name", "takes 'state' but declares none"),
    (["attack.name=userext:not_an_attack", "attack.fraction=0.25"], "attack.name", "an attack is a fedmpi.attacks.Attack"),
    (["server.optimizer=userext:no_rows"], "server.optimizer", "wrong signature (); a server optimizer is direction("),
    (["aggregator.name=userext"], "aggregator.name", "must be one of fedavg"),
])
def test_config_checks_user_code_against_its_contract(overrides, key, message):
    from fedmpi.config import ConfigError, load

    with pytest.raises(ConfigError) as info:
        load(None, overrides)
    assert info.value.key == key and message in str(info.value)


def test_params_are_passed_as_annotated():
    from fedmpi import extensions
    from fedmpi.config import load

    cfg = load(None, ["aggregator.name=userext:needs_threshold", "aggregator.params={threshold: 2}"])
    assert extensions.bind(extensions.load("rule", cfg.aggregator.name, "aggregator.name"), "aggregator",
                           cfg.aggregator.params) == {"threshold": 2.0}
    assert isinstance(extensions.bind(extensions.load("rule", cfg.aggregator.name, "aggregator.name"), "aggregator",
                                      cfg.aggregator.params)["threshold"], float)


# case: (overrides, fragments of the one line); every one is refused before MPI starts
BAD_EXTENSIONS = {
    "missing module": (["aggregator.name=no_such_package.rules:robust"], "aggregator.name = 'no_such_package.rules:robust'",
                       "cannot import no_such_package.rules: no module named 'no_such_package'", "PYTHONPATH"),
    "missing attribute": (["aggregator.name=fedmpi_ext.rules:krum"], "aggregator.name = 'fedmpi_ext.rules:krum'",
                          "module fedmpi_ext.rules has no attribute 'krum'"),
    "wrong signature": (["aggregator.name=userext:no_rows"], "aggregator.name = 'userext:no_rows'", "wrong signature ()",
                        "rule(rows, *, weights, f, rng, state, **params)"),
    "wrong hook signature": (["attack.name=userext:wrong_hook", "attack.fraction=0.25"], "attack.name = 'userext:wrong_hook'",
                             "on_update(update, params)", "called as on_update(update, params, rng)"),
    "bad parameter type": (["aggregator.name=fedmpi_ext.rules:dnc", "aggregator.params={iterations: many}"],
                           "aggregator.params.iterations = 'many'", "expected an integer (the annotation in fedmpi_ext.rules:dnc)"),
    "unknown parameter": (["model.name=fedmpi_ext.models:group_norm_cnn", "model.params={depth: 3}"],
                          "model.params.depth = 3", "not a parameter of fedmpi_ext.models:group_norm_cnn (its parameters: "
                          "width, groups)"),
    "bad parameter value": (["aggregator.name=fedmpi_ext.rules:dnc", "aggregator.params={filter_fraction: 0}"],
                            "aggregator.name = 'fedmpi_ext.rules:dnc'", "raised ValueError: dnc needs", "on a probe input"),
    "params for a built-in": (["aggregator.name=krum", "aggregator.params={m: 3}"], "aggregator.params = {\"m\": 3}",
                              "only used by user code named by import path"),
    "model output does not match the classes": (["model.name=usermodels:wrong_classes"],
                                                "model.name = 'usermodels:wrong_classes'",
                                                "to shape (2, 13); expected logits of shape (2, 10)"),
    "model with running statistics": (["model.name=usermodels:batch_norm"], "model.name = 'usermodels:batch_norm'",
                                      "buffer 2.running_mean changes in a training step"),
    "data set with mismatched lengths": (["data.name=userext:mismatched", "model.name=logreg"], "data error",
                                         "data.name = 'userext:mismatched'", "y_train has shape (99,); expected (100,)"),
    "rule result of the wrong shape": (["aggregator.name=userext:short_vector"], "aggregator.name = 'userext:short_vector'",
                                       "returned the aggregate of shape (5,); expected (6,) on a probe input of 16 rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXTENSIONS))
def test_bad_extension_is_one_line_before_any_mpi_traffic(tmp_path, case):
    overrides, *fragments = BAD_EXTENSIONS[case]
    args = [a for override in overrides for a in ("--set", override)]
    # two of them on 2 ranks (the line comes from the status exchange), the rest in one process
    ranks = 2 if case in ("missing module", "rule result of the wrong shape") else None
    line = expect_rejected(tmp_path, args, *fragments, ranks=ranks)
    assert "Traceback" not in line


def test_rule_that_returns_non_finite_values_mid_run_stops_with_one_line(tmp_path):
    proc = run_job(2, ["--set", "aggregator.name=userext:nan_after_first", "--set", "rounds=4", "--set", "model.name=logreg",
                       "--out", "run.h5", "--quiet"], tmp_path, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, proc.stderr
    assert lines == ["fedmpi: aggregator.name = 'userext:nan_after_first' returned non-finite values: 217 of 650 "
                     "coordinates of the aggregate are NaN or inf in round 1 (0-based); the run stopped, round 0 is in "
                     "run.h5"]
    run = load(str(tmp_path / "run.h5"))
    assert len(run.rounds) == 1 and not run.finished and np.isfinite(run.rounds["test_accuracy"]).all()


def test_user_model_mixing_ghost_norm_and_vmap_layers_clips_like_a_per_example_float64_loop():
    """DP-SGD on the tutorial's CNN: Conv2d and Linear on the ghost-norm path, GroupNorm
    on the generic torch.func path; the clipped sum against a loop over examples."""
    import torch
    import torch.nn.functional as F
    from fedmpi_ext.models import group_norm_cnn

    from fedmpi.privacy.dpsgd import clipped_grad_sum, per_example_plan

    torch.manual_seed(0)
    model = group_norm_cnn(input_shape=(1, 8, 8), num_classes=10, width=8, groups=4).double()
    plan = {p.name: p.path for p in per_example_plan(model)}
    assert plan == {"features.0": "ghost", "features.1": "vmap", "features.4": "ghost", "features.5": "vmap",
                    "classifier": "ghost"}
    x, y = 3 * torch.randn(12, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (12,))
    per_example = []
    for i in range(12):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        per_example.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
    norms = torch.stack([g.norm() for g in per_example])
    clip = float(norms.median())  # some examples clipped, some not
    expected = sum(g * min(1.0, clip / float(n)) for g, n in zip(per_example, norms))
    torch.testing.assert_close(clipped_grad_sum(model, F.cross_entropy, x, y, clip), expected, rtol=1e-10, atol=1e-12)


def test_user_model_trains_with_dp_sgd_and_the_log_names_its_paths_once(tmp_path, capsys):
    import fedmpi

    run = fedmpi.simulate(EXAMPLES / "extension_run.yaml", overrides=[
        "rounds=1", "clients.per_round=4", "attack.name=none", "attack.fraction=null", "aggregator.name=fedavg",
        "aggregator.params={}", "privacy.mode=sample", "privacy.noise_multiplier=1.0"], out=tmp_path / "dp.h5", quiet=False)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "per-example gradients" in ln]
    assert lines == ["fedmpi: DP-SGD per-example gradients: ghost norm for 3 layers (features.0: Conv2d, features.4: "
                     "Conv2d, classifier: Linear); torch.func vmap for 2 layers (features.1: GroupNorm, features.5: GroupNorm)"]
    assert np.isfinite(run.rounds["epsilon"]).all() and 0 < run.rounds["clipped_fraction"].iloc[0] <= 1
