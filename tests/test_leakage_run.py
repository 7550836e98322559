"""Leakage audits inside real mpirun jobs: gradient inversion and membership inference, read
back from the HDF5 file; exact after a signal during the shadows and a resume on another rank count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from scipy import stats

from conftest import REPO, fedmpi_env, mpirun_path, run_job
from fedmpi import analyze
from fedmpi.data import load_digits_arrays

# one example per client and one SGD step (digits: 1438 training examples), analytic recovery of the
# first layer's input in rounds 0 and 2; membership of every example, 4 shadows, after rounds 2 and 3
AUDIT = ["--set", "clients.total=1438", "--set", "clients.per_round=8", "--set", "train.batch_size=1",
         "--set", "train.lr=0.1", "--set", "model.hidden=[32]", "--set", "rounds=3",
         "--set", "audit.inversion.method=analytic", "--set", "audit.inversion.rounds=[0,2]",
         "--set", "audit.inversion.slots=8", "--set", "audit.membership.level=example",
         "--set", "audit.membership.shadows=4", "--set", "audit.membership.every=2",
         "--set", "output.checkpoint_every=1"]
TIMING = {"seconds"}


def _audit_datasets(path) -> dict:
    out = {}
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        f["audit"].visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assert_same_audit(a_path, b_path):
    a, b = _audit_datasets(a_path), _audit_datasets(b_path)
    assert sorted(a) == sorted(b)
    for name in a:
        if name.rsplit("/", 1)[-1] not in TIMING:
            assert np.asarray(a[name]).tobytes() == np.asarray(b[name]).tobytes(), f"/audit/{name} differs"
    with h5py.File(a_path, "r", libver="latest", swmr=True) as f, h5py.File(b_path, "r", libver="latest", swmr=True) as g:
        assert f["model/final"][:].tobytes() == g["model/final"][:].tobytes()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("audit")
    proc = run_job(3, [*AUDIT, "--out", "ref.h5"], cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "ref.h5", proc.stdout


def test_inversion_rebuilds_the_clients_examples(reference):
    path, stdout = reference
    audit = _audit_datasets(path)
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        records = {name: f["clients"][name][:] for name in ("round", "slot", "client_id", "num_samples")}
    inv = {k.split("/", 1)[1]: v for k, v in audit.items() if k.startswith("inversion/")}
    # every slot with examples in rounds 0 and 2, and nothing else
    attacked = [(r, s) for r, s, n in zip(records["round"], records["slot"], records["num_samples"])
                if r in (0, 2) and n > 0]
    assert list(zip(inv["round"], inv["slot"])) == attacked and len(attacked) >= 3
    for i, (r, s) in enumerate(attacked):
        row = np.flatnonzero((records["round"] == r) & (records["slot"] == s))[0]
        assert inv["client_id"][i] == records["client_id"][row] and inv["num_examples"][i] == 1
    raw, labels = load_digits_arrays()
    for truth, true_label in zip(inv["truth"][:, 0], inv["true_labels"][:, 0]):
        match = np.flatnonzero(np.abs(raw / 16.0 - truth).reshape(len(raw), -1).max(axis=1) < 1e-6)
        assert len(match) and labels[match[0]] == true_label  # a real digit, pixels k/16, and its label
    assert (inv["psnr"] > 100).all() and (inv["ssim"] > 0.9999).all()  # analytic recovery: measured ~140 dB
    assert (inv["mean_image_psnr"] < 15).all()
    assert (inv["labels"] == inv["true_labels"]).all() and (inv["label_accuracy"] == 1).all()
    assert np.isnan(inv["attack_loss"]).all()
    assert "leakage: gradient inversion (analytic)" in stdout


def test_membership_audit_of_the_run(reference):
    path, stdout = reference
    audit = _audit_datasets(path)
    mem = {k.split("/", 1)[1]: v for k, v in audit.items() if k.startswith("membership/")}
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        cids, samples = f["clients/client_id"][:], f["clients/num_samples"][:]
    # the run trained exactly on the members: a client's sample count is its number of member examples
    for cid, n in zip(cids, samples):
        assert n == mem["member"][mem["unit_client"] == cid].sum()
    assert 0.4 < mem["member"].mean() < 0.6
    assert (mem["shadow_member"].sum(axis=0) == 2).all()  # every example in 2 of the 4 shadows
    assert mem["round"].tolist() == [1, 2] and mem["target/round"].tolist() == [1, 2]
    assert [a.decode() for a in mem["attack"]] == ["loss_threshold", "lira_offline", "lira_online"]
    member = mem["member"]
    for e in range(2):
        for j in range(3):
            scores = mem["scores"][e, j]
            u = stats.mannwhitneyu(scores[member], scores[~member]).statistic
            assert mem["auc"][e, j] == pytest.approx(u / (member.sum() * (~member).sum()), abs=1e-12)
            fpr, tpr = mem["roc_fpr"][e, j], mem["roc_tpr"][e, j]
            n = np.isfinite(fpr).sum()
            assert (fpr[0], tpr[0], fpr[n - 1], tpr[n - 1]) == (0, 0, 1, 1) and np.isnan(fpr[n:]).all()
    assert np.array_equal(mem["scores"][:, 0], -mem["target_loss"])
    assert "leakage: membership inference (example level, 4 shadows" in stdout


def test_sigterm_during_the_shadows_then_resume_on_one_rank_is_exact(reference, tmp_path):
    """Stopped while the workers train the second shadow; resumed in one process (rank 0 then trains
    the shadows itself): the same file as the uninterrupted 3-rank run, bit for bit."""
    out = tmp_path / "run.h5"
    cmd = [mpirun_path(), "-n", "3", sys.executable, "-m", "fedmpi.run", *AUDIT, "--out", str(out)]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=fedmpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    for line in job.stdout:
        if line.startswith("membership: shadow federation 1/"):
            os.kill(job.pid, signal.SIGTERM)
            break
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 75, stderr
    assert "checkpoint after round 3" in stderr
    with h5py.File(out, "r", libver="latest", swmr=True) as f:
        assert f["run/finished"][()] == 0 and np.isnan(f["audit/membership/auc"][:]).all()
    proc = run_job(None, ["--resume", out, "--quiet"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    _assert_same_audit(reference[0], out)


def test_every_audit_dataset_is_documented_and_analyze_reports_it(reference, tmp_path, capsys):
    doc = (REPO / "docs" / "results.md").read_text()
    for name in _audit_datasets(reference[0]):
        assert f"`{name.rsplit('/', 1)[-1]}`" in doc, f"/audit/{name} is not in docs/results.md"
    assert analyze.main([str(reference[0]), "--plot", str(tmp_path), "--csv", str(tmp_path / "s.csv")]) == 0
    import pandas as pd

    row = pd.read_csv(tmp_path / "s.csv").iloc[0]
    audit = _audit_datasets(reference[0])
    assert row["recon_psnr"] == pytest.approx(audit["inversion/psnr"].mean())
    assert row["mia_auc_online"] == pytest.approx(audit["membership/auc"][-1, 2])
    assert (tmp_path / "inversion_0.png").stat().st_size > 0 and (tmp_path / "membership_roc_0.png").stat().st_size > 0
