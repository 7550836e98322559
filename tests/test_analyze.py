"""python -m fedmpi.analyze and fedmpi.results.load on files written by real runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import fedmpi_env, mpirun_path, run_job
from fedmpi.results import load

ATTACK = ["--set", "clients.total=20", "--set", "clients.per_round=20", "--set", "attack.name=sign_flip",
          "--set", "attack.fraction=0.2", "--set", "attack.params={lambda: 10}", "--set", "rounds=4", "--quiet"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two seeds x {fedavg, krum} under a known attacker set, plus one DP run."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "runs").mkdir()
    for seed in (0, 1):
        for agg in ("fedavg", "krum"):
            proc = run_job(None, [*ATTACK, "--set", f"seed={seed}", "--set", f"aggregator.name={agg}",
                                  "--out", f"runs/{agg}-{seed}.h5"], root)
            assert proc.returncode == 0, proc.stderr
    proc = run_job(None, ["--set", "rounds=3", "--set", "privacy.mode=sample", "--set", "privacy.noise_multiplier=1",
                          "--set", "privacy.accountant=rdp", "--out", "dp.h5", "--quiet"], root)
    assert proc.returncode == 0, proc.stderr
    return root


def _analyze(args, cwd, timeout=120):
    return run_job(None, args, cwd, module="fedmpi.analyze", timeout=timeout)


def _expected(path):
    """Numbers computed straight from the HDF5 arrays, independently of fedmpi.analyze."""
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        acc = f["rounds/test_accuracy"][:]
        byz = f["clients/byzantine"][:].astype(bool)
        excluded = ~f["clients/selected"][:].astype(bool)
    caught = np.sum(byz & excluded)
    precision = caught / excluded.sum() if excluded.sum() else np.nan
    return acc[-1], acc.max(), precision, caught / byz.sum()


def test_summary_rows_match_the_files(sweep):
    proc = _analyze(["runs", "--no-group", "--csv", "summary.csv"], sweep)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 4
    assert set(table.columns) >= {"aggregator.name", "seed", "final_accuracy", "best_accuracy", "rounds", "epsilon",
                                  "wall_s", "byzantine_precision", "byzantine_recall"}
    assert "clients.total" not in table.columns  # same in every run: not a differing key
    for _, row in table.iterrows():
        final, best, precision, recall = _expected(sweep / row["file"])
        assert row["final_accuracy"] == pytest.approx(final, abs=1e-12)
        assert row["best_accuracy"] == pytest.approx(best, abs=1e-12)
        assert row["rounds"] == 4
        assert row["byzantine_recall"] == pytest.approx(recall)
        if np.isnan(precision):
            assert np.isnan(row["byzantine_precision"])
        else:
            assert row["byzantine_precision"] == pytest.approx(precision)
    krum = table[table["aggregator.name"] == "krum"]
    # Krum keeps 1 of 20 slots a round and 4 of 20 are Byzantine: all 4 x 4 excluded, 16 of 76 exclusions
    assert (krum["byzantine_recall"] == 1.0).all()
    assert krum["byzantine_precision"].tolist() == pytest.approx([16 / 76] * 2)
    fedavg = table[table["aggregator.name"] == "fedavg"]
    assert (fedavg["byzantine_recall"] == 0.0).all() and fedavg["byzantine_precision"].isna().all()
    # the printed table carries the same final accuracies
    for value in table["final_accuracy"]:
        assert f"{value:.4g}" in proc.stdout


def test_sweep_groups_seeds_with_mean_and_spread(sweep):
    proc = _analyze(["runs", "--csv", "grouped.csv"], sweep)
    assert proc.returncode == 0, proc.stderr
    grouped = pd.read_csv(sweep / "grouped.csv")
    assert sorted(grouped["aggregator.name"]) == ["fedavg", "krum"]
    for _, row in grouped.iterrows():
        finals = [_expected(sweep / "runs" / f"{row['aggregator.name']}-{s}.h5")[0] for s in (0, 1)]
        assert row["runs"] == 2
        assert row["final_accuracy"] == pytest.approx(np.mean(finals))
        assert row["final_accuracy_std"] == pytest.approx(np.std(finals, ddof=1), abs=1e-12)
    assert "±" in proc.stdout


def test_epsilon_column_for_dp_runs(sweep):
    proc = _analyze(["dp.h5", "runs/krum-0.h5", "--csv", "dp.csv"], sweep)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(sweep / "dp.csv")
    with h5py.File(sweep / "dp.h5", "r", libver="latest", swmr=True) as f:
        eps = float(f["privacy/epsilon"][()])
    assert table["epsilon"].iloc[0] == pytest.approx(eps) and np.isnan(table["epsilon"].iloc[1])


@pytest.mark.parametrize("fmt, magic", [("png", b"\x89PNG\r\n\x1a\n"), ("pdf", b"%PDF")])
def test_every_plot_kind_is_a_valid_image(sweep, fmt, magic):
    proc = _analyze(["runs", "dp.h5", "--plot", f"plots_{fmt}", "--format", fmt], sweep)
    assert proc.returncode == 0, proc.stderr
    files = sorted(os.listdir(sweep / f"plots_{fmt}"))
    expected = {"accuracy_loss", "accuracy_epsilon", "update_norms", "backdoor"} | {f"selection_{i}" for i in range(5)}
    assert {f.rsplit(".", 1)[0] for f in files} == expected
    for name in files:
        data = (sweep / f"plots_{fmt}" / name).read_bytes()
        assert data.startswith(magic) and len(data) > 5000, name
        if fmt == "png":
            import matplotlib.image

            image = matplotlib.image.imread(sweep / f"plots_{fmt}" / name)
            assert image.shape[0] > 200 and image.shape[1] > 300
            assert image[..., :3].std() > 0.02  # not a blank canvas


def test_follow_sees_every_round_exactly_once(tmp_path):
    out = tmp_path / "live.h5"
    follower = subprocess.Popen([sys.executable, "-m", "fedmpi.analyze", "--follow", str(out), "--timeout", "120"],
                                cwd=tmp_path, env=fedmpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    run = run_job(2, ["--set", "rounds=12", "--out", out, "--quiet"], tmp_path)
    assert run.returncode == 0, run.stderr
    stdout, stderr = follower.communicate(timeout=120)
    assert follower.returncode == 0, stderr
    rounds = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith("round ")]
    assert rounds == list(range(1, 13)), stdout
    assert "finished: 12 rounds" in stdout
    with h5py.File(out, "r", libver="latest", swmr=True) as f:
        acc = f["rounds/test_accuracy"][:]
    for r, a in enumerate(acc, start=1):
        assert f"round {r}  acc {a:.4f}" in stdout


def test_load_a_file_left_by_a_killed_job(tmp_path):
    out = tmp_path / "killed.h5"
    cmd = [mpirun_path(), "-n", "2", sys.executable, "-m", "fedmpi.run", "--set", "rounds=500",
           "--set", "output.snapshot_every=2", "--out", str(out), "--quiet"]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=fedmpi_env(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                if len(load(str(out)).rounds) >= 5:
                    break
            except Exception:  # not created yet
                continue
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.wait(timeout=30)
    run = load(str(out))
    assert not run.finished and len(run.rounds) >= 5
    assert list(run.rounds["round"]) == list(range(len(run.rounds)))
    assert len(run.clients) == 16 * len(run.rounds)
    assert run.final_model is not None and run.final_model_round >= 3
    assert run.final_model_round % 2 == 1  # a snapshot: every 2 rounds
    proc = _analyze([str(out), "--csv", "k.csv"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert pd.read_csv(tmp_path / "k.csv")["finished"].tolist() == [False]


def _garbage_files(tmp_path, sweep):
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5 at all\n")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(10)
    truncated = tmp_path / "truncated.h5"
    data = (sweep / "runs" / "krum-0.h5").read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    return {"not an HDF5 file": text, "not fedmpi results": foreign, "truncated": truncated}


def test_garbage_input_gets_one_line_naming_the_file(tmp_path, sweep):
    for expected, path in _garbage_files(tmp_path, sweep).items():
        proc = _analyze([str(path)], tmp_path)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, (expected, proc.stderr)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert str(path) in lines[0]
        assert expected in lines[0], lines[0]


def test_tensorboard_export_has_one_scalar_per_round_per_metric(tmp_path, capsys):
    """Read back with tensorboard's own event reader: every metric of a private,
    attacked run, one point per round at step = round, the values of /rounds; the
    config as hyperparameters; a second export into the same directory is refused."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    import fedmpi
    from fedmpi import analyze
    from fedmpi.results import ROUND_FIELDS

    run = fedmpi.simulate({"rounds": 3, "model": {"name": "logreg"}, "aggregator": {"name": "krum"},
                           "attack": {"name": "sign_flip", "fraction": 0.25},
                           "privacy": {"mode": "sample", "noise_multiplier": 1.0}}, out=tmp_path / "dp krum.h5")
    assert analyze.main([str(tmp_path / "dp krum.h5"), "--tensorboard", str(tmp_path / "tb")]) == 0
    events = EventAccumulator(str(tmp_path / "tb" / "dp krum"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval/test_accuracy", "eval/test_loss", "train/train_loss", "privacy/epsilon", "byzantine/byzantine_in_cohort",
            "byzantine/byzantine_selected", "time/wall_s", "time/train_s", "time/comm_s"} <= tags
    # every /rounds field but the round itself and backdoor_accuracy (NaN without a backdoor)
    assert tags == {f"{analyze.TENSORBOARD_GROUPS.get(f, 'rounds')}/{f}" for f in ROUND_FIELDS
                    if f not in ("round", "backdoor_accuracy")}
    for tag in tags:
        points = events.Scalars(tag)
        assert [p.step for p in points] == [0, 1, 2], tag
        field = tag.split("/")[1]
        assert [p.value for p in points] == run.rounds[field].astype(np.float32).tolist(), tag
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    start = metadata.parse_session_start_info_plugin_data(content)
    assert start.hparams["aggregator.name"].string_value == "krum" and start.hparams["rounds"].number_value == 3
    capsys.readouterr()
    assert analyze.main([str(tmp_path / "dp krum.h5"), "--tensorboard", str(tmp_path / "tb")]) == 2
    assert "already holds TensorBoard events" in capsys.readouterr().err


def test_robustness_tables_by_hand(tmp_path):
    import pandas as pd

    from fedmpi.analyze import robustness_heatmap, robustness_tables

    rows = []
    for setting, shift in (("data.partition.name=iid", 0.0), ("data.partition.name=dirichlet", -0.1)):
        for rule in ("krum", "nnm + krum"):
            for attack, accs in (("none", [0.9, 0.8]), ("sign_flip", [0.5, 0.7]), ("backdoor", [0.85, 0.85])):
                for seed, acc in enumerate(accs):
                    rows.append({"setting": setting, "rule": rule, "attack": attack, "seed": seed,
                                 "final_accuracy": acc + shift, "backdoor_accuracy": 0.25 if attack == "backdoor" else np.nan,
                                 "diverged": rule == "krum" and attack == "sign_flip" and seed == 1})
    grids, text = robustness_tables(pd.DataFrame(rows))
    lines = text.splitlines()
    assert lines[0].startswith("**data.partition.name=iid**: final test accuracy")
    assert lines[2] == "| rule | none | sign_flip | backdoor | worst |"
    # mean and sample std of (0.9, 0.8): 0.85 +- 0.07; of (0.5, 0.7): 0.60 +- 0.14, a seed diverged;
    # the worst attack of krum is sign_flip at 0.60
    assert lines[4] == "| krum | 0.85±0.07 | 0.60±0.14† | 0.85±0.00 | 0.60 (sign_flip) |"
    assert lines[5] == "| nnm + krum | 0.85±0.07 | 0.60±0.14 | 0.85±0.00 | 0.60 (sign_flip) |"
    assert "| krum | 0.25±0.00 | 0.85±0.00 | 0.85±0.07 |" in lines  # backdoor: ASR, clean accuracy, without attack
    assert "| krum | 0.75±0.07 | 0.50±0.14† | 0.75±0.00 | 0.50 (sign_flip) |" in lines  # dirichlet: 0.1 lower
    rules, attacks, means = grids["data.partition.name=dirichlet"]
    np.testing.assert_allclose(means, [[0.75, 0.5, 0.75], [0.75, 0.5, 0.75]])
    written = robustness_heatmap(grids, str(tmp_path / "heat"))
    assert [p.rsplit(".", 1)[1] for p in written] == ["png", "pdf"]
    assert (tmp_path / "heat.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "heat.pdf").read_bytes()[:4] == b"%PDF"
