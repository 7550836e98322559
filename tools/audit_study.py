"""Measure the audits of issue 13 with real runs: soundness, sensitivity, and the
client-level estimate against the analytic Gaussian epsilon.

    python tools/audit_study.py [PART ...] [--seeds 5] [--ranks 3] [--json out.json]

Parts (default: all; each runs ``--seeds`` seeds, one run after another):

``dpsgd_sound``      DP-SGD digits (configs default: MLP 64-200-200-10, 16 clients, 20 rounds)
                     calibrated to epsilon 2, 1000 Dirac canaries: the one-run bound must be <= 2.
``dpsgd_sound_wide`` the same on an MLP 64-1000-1000-10 (1.07M parameters), 10 rounds.
``dpsgd_noise0``     noise multiplier 0, 1000 Dirac canaries, the wide MLP, 10 rounds: bound >= 3.
``dpsgd_noise0_default`` the same on the default MLP, 20 rounds (real training moves its 55k
                     coordinates about as much as a canary does).
``dpsgd_bug``        the wide MLP calibrated to epsilon 1 with FEDMPI_TEST_ONLY_NOISE_SCALE=0.1
                     (noise 10x smaller than calibrated): bound > 1; ``dpsgd_nobug`` the same
                     without the bug.
``dpsgd_input0``     1000 black-box input canaries, noise 0, default MLP, 20 rounds.
``client_gauss``     one round of central DP-FedAvg, Poisson cohorts with q = 1, calibrated to
                     epsilon 1, 2, 4, 8 (PLD: exactly the Gaussian mechanism), 1000 and 2000 canary
                     clients: the estimate against the analytic epsilon of noise multiplier z.
``client_sound``     20 rounds calibrated to epsilon 2, 1000 canary clients: central with the
                     default fixed-size cohorts (RDP), local, and central with Poisson cohorts
                     q = 0.5 (PLD).

Prints one line per run and a summary per part; ``--json`` keeps every number. The
numbers in docs/privacy.md ("Auditing") come from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WIDE = ["--set", "model.hidden=[1000,1000]", "--set", "rounds=10"]
DPSGD = ["--set", "privacy.mode=sample"]


def _runs() -> dict:
    """part -> list of (label, overrides, environment additions)."""
    parts = {
        "dpsgd_sound": [("eps 2", [*DPSGD, "--set", "privacy.target_epsilon=2", "--set", "audit.canaries.count=1000"], {})],
        "dpsgd_sound_wide": [("eps 2, wide", [*DPSGD, *WIDE, "--set", "privacy.target_epsilon=2",
                                              "--set", "audit.canaries.count=1000"], {})],
        "dpsgd_noise0": [("noise 0, wide", [*DPSGD, *WIDE, "--set", "privacy.noise_multiplier=0",
                                            "--set", "audit.canaries.count=1000"], {})],
        "dpsgd_noise0_default": [("noise 0", [*DPSGD, "--set", "privacy.noise_multiplier=0",
                                              "--set", "audit.canaries.count=1000"], {})],
        "dpsgd_bug": [("eps 1, noise / 10, wide", [*DPSGD, *WIDE, "--set", "privacy.target_epsilon=1",
                                                   "--set", "audit.canaries.count=1000"],
                       {"FEDMPI_TEST_ONLY_NOISE_SCALE": "0.1"})],
        "dpsgd_nobug": [("eps 1, wide", [*DPSGD, *WIDE, "--set", "privacy.target_epsilon=1",
                                         "--set", "audit.canaries.count=1000"], {})],
        "dpsgd_input0": [("noise 0, input", [*DPSGD, "--set", "privacy.noise_multiplier=0", "--set",
                                             "audit.canaries.count=1000", "--set", "audit.canaries.kind=input"], {})],
        "client_gauss": [(f"eps {eps}, {count} canaries", ["--set", "privacy.mode=client_central", "--set",
                                                           f"privacy.target_epsilon={eps}", "--set",
                                                           "clients.sampling=poisson", "--set", "rounds=1", "--set",
                                                           f"audit.client_canaries.count={count}"], {})
                         for count in (1000, 2000) for eps in (1, 2, 4, 8)],
        "client_sound": [
            ("central, fixed cohorts (RDP)", ["--set", "privacy.mode=client_central", "--set", "privacy.accountant=rdp",
                                              "--set", "privacy.target_epsilon=2",
                                              "--set", "audit.client_canaries.count=1000"], {}),
            ("local", ["--set", "privacy.mode=client_local", "--set", "privacy.target_epsilon=2",
                       "--set", "audit.client_canaries.count=1000"], {}),
            ("central, Poisson q = 0.5 (PLD)", ["--set", "privacy.mode=client_central", "--set", "clients.sampling=poisson",
                                                "--set", "clients.per_round=8", "--set", "privacy.target_epsilon=2",
                                                "--set", "audit.client_canaries.count=1000"], {}),
        ],
    }
    return parts


def run_one(overrides: list, env_extra: dict, seed: int, ranks: int, tmp: Path) -> dict:
    import h5py

    out = tmp / f"run-{time.monotonic_ns()}.h5"
    mpirun = str(Path(sys.executable).parent / "mpirun")
    cmd = [mpirun, "-n", str(ranks), sys.executable, "-m", "fedmpi.run", *overrides, "--set", f"seed={seed}",
           "--out", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    row = {"seed": seed, "wall_s": round(time.monotonic() - start, 1)}
    with h5py.File(out, "r", libver="latest", swmr=True) as f:
        row["epsilon"] = float(f["privacy/epsilon"][()])
        row["accountant"] = f["privacy/accountant"][()].decode()
        row["noise_multiplier"] = float(f.attrs["dp_noise_multiplier"])
        row["test_accuracy"] = float(f["rounds/test_accuracy"][-1])
        if "audit/canaries" in f:
            g = f["audit/canaries"]
            row.update(bound=float(g["epsilon_lower_bound"][()]), correct=int(g["correct"][()]),
                       guesses=int(g["guesses"][()]), canaries=int(g["count"][()]))
        if "audit/client_canaries" in f:
            from dp_accounting import get_epsilon_gaussian

            g = f["audit/client_canaries"]
            row.update(estimate_final=float(g["epsilon_final"][()]), estimate_max=float(g["epsilon_max_cosine"][()]),
                       inserted=int(g["included"][()].sum()), canaries=int(g["count"][()]),
                       analytic=float(get_epsilon_gaussian(row["noise_multiplier"], 1e-5)))
    out.unlink()
    return row


def summary(part: str, label: str, rows: list) -> str:
    if "bound" in rows[0]:
        b = [r["bound"] for r in rows]
        return (f"{part:22s} {label:32s} bound {min(b):.2f}..{max(b):.2f} (median {np.median(b):.2f}); correct "
                f"{[r['correct'] for r in rows]} of {rows[0]['guesses']}; accountant eps {rows[0]['epsilon']:.3g}")
    e = [r["estimate_final"] for r in rows]
    m = [r["estimate_max"] for r in rows]
    ratio = [r["estimate_final"] / r["analytic"] for r in rows]
    return (f"{part:22s} {label:32s} final-model estimate {min(e):.2f}..{max(e):.2f} (median {np.median(e):.2f}), "
            f"max-cosine {min(m):.2f}..{max(m):.2f}; /analytic {min(ratio):.2f}..{max(ratio):.2f}; accountant eps "
            f"{rows[0]['epsilon']:.3g}, analytic Gaussian eps {rows[0]['analytic']:.3g}")


def main() -> int:
    parts = _runs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=", ".join(parts))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    unknown = [p for p in args.parts if p not in parts]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r} (choose from {', '.join(parts)})")
    results, lines = {}, []
    with tempfile.TemporaryDirectory() as tmpdir:
        for part in args.parts or list(parts):
            for label, overrides, env in parts[part]:
                rows = []
                for seed in range(args.seeds):
                    rows.append(run_one(overrides, env, seed, args.ranks, Path(tmpdir)))
                    print(f"{part} | {label} | {json.dumps(rows[-1])}", flush=True)
                results[f"{part} | {label}"] = rows
                lines.append(summary(part, label, rows))
                print(lines[-1], flush=True)
    print("\n".join(["", *lines]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
