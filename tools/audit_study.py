"""Measure the audits of issue 13 with real runs: soundness, sensitivity, and the
client-level estimate against the analytic Gaussian epsilon.

    python tools/audit_study.py [PART ...] [--seeds 5] [--ranks 3] [--first-seed 0] [--json out.json]
                                [--set KEY=VALUE ...] [--only TEXT] [--simulate]

``--set`` adds overrides to every run of the parts (after their own: ``--set rounds=5``
shortens them all); ``--only TEXT`` keeps the runs whose label contains TEXT.

Parts (default: all; each runs ``--seeds`` seeds, one run after another):

``dpsgd_sound``      DP-SGD digits (configs default: MLP 64-200-200-10, 16 clients, 20 rounds)
                     calibrated to epsilon 2, 1000 Dirac canaries: the one-run bound must be <= 2.
``dpsgd_sound_wide`` the same on an MLP 64-1000-1000-10 (1.07M parameters), 10 rounds.
``dpsgd_noise0``     noise multiplier 0, 1000 Dirac canaries, the wide MLP, 10 rounds: bound >= 3.
``dpsgd_noise0_default`` the same on the default MLP, 20 rounds (real training moves its 55k
                     coordinates about as much as a canary does).
``dpsgd_bug``        plain DP-SGD (one client holding all the data, the wide MLP, 3 rounds)
                     calibrated to epsilon 1 with FEDMPI_TEST_ONLY_NOISE_SCALE=0.1 (noise 10x
                     smaller than calibrated), k = 50: bound > 1; ``dpsgd_nobug`` and
                     ``dpsgd_sound_central`` (epsilon 2) the same without the bug. One client,
                     because in federated DP-SGD every client of the cohort adds its own noise to
                     every coordinate while a canary sits in one client: the observer of the global
                     model sees sqrt(K) times more noise than the canary's client added, and the
                     audit of 16 clients cannot reach the per-client epsilon (with 16 clients, 5-10
                     rounds and the bug, 151-163 of 200 and 38-40 of 50 right, bounds 0.57-1.17).
                     k = 50 was fixed before these seeds ran; run them on seeds not used to choose
                     it (``--first-seed 5``).
``dpsgd_input0``     1000 black-box input canaries, noise 0, default MLP, 20 rounds.
``client_gauss``     one round of central DP-FedAvg, Poisson cohorts with q = 1, calibrated to
                     epsilon 1, 2, 4, 8 (PLD: exactly the Gaussian mechanism), 1000 and 2000 canary
                     clients: the estimate against the analytic epsilon of noise multiplier z.
``client_sound``     20 rounds calibrated to epsilon 2, 1000 canary clients, each presented once
                     (audit.client_canaries.repeats = 1, the default): central with the default
                     fixed-size cohorts (RDP), local, and central with Poisson cohorts q = 0.5
                     (PLD); ``client_sound_pld`` the last of these only; ``client_sound_poisson`` the
                     last with repeats = 0 (canaries sampled each round like a client: the
                     estimate is then centred on the accountant's epsilon, see docs/privacy.md).

Prints one line per run and a summary per part; ``--json`` keeps every number. The
numbers in docs/privacy.md ("Auditing") come from this script.

``--simulate`` runs no job: it computes, for central DP-FedAvg with Poisson q = 0.5
calibrated to epsilon 2 over T = 3 and 20 rounds, the exact epsilon of a canary's
final-model cosine (sampled each round, or presented once) and the spread of the
one-shot estimates from 500 inserted and 500 unseen canaries drawn from that model
(the table in docs/privacy.md, "Client level").
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
# plain DP-SGD: one client with all the data, wide MLP, 3 rounds, 1000 Dirac canaries, k = 50
CENTRAL = ["--set", "model.hidden=[1000,1000]", "--set", "clients.total=1", "--set", "clients.per_round=1",
           "--set", "rounds=3", "--set", "audit.canaries.count=1000", "--set", "audit.canaries.k=50"]


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
        "dpsgd_bug": [("eps 1, noise / 10, one client", [*DPSGD, *CENTRAL, "--set", "privacy.target_epsilon=1"],
                       {"FEDMPI_TEST_ONLY_NOISE_SCALE": "0.1"})],
        "dpsgd_nobug": [("eps 1, one client", [*DPSGD, *CENTRAL, "--set", "privacy.target_epsilon=1"], {})],
        "dpsgd_sound_central": [("eps 2, one client", [*DPSGD, *CENTRAL, "--set", "privacy.target_epsilon=2"], {})],
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
    parts["client_sound_pld"] = parts["client_sound"][2:]
    parts["client_sound_poisson"] = [("central, Poisson q = 0.5, canaries sampled", [
        *parts["client_sound"][2][1], "--set", "audit.client_canaries.repeats=0"], {})]
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
                       inserted=int(g["included"][()].sum()), canaries=int(g["count"][()]), repeats=int(g["repeats"][()]),
                       analytic=float(get_epsilon_gaussian(row["noise_multiplier"], 1e-5)))
            if row["repeats"]:  # r presentations among T rounds of noise: the final model's Gaussian, no real clients
                rounds = int(f["rounds/round"].shape[0])
                row["analytic_final"] = float(get_epsilon_gaussian(row["noise_multiplier"] * rounds ** 0.5 / row["repeats"],
                                                                   1e-5))
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
            f"{rows[0]['epsilon']:.3g}, analytic Gaussian eps {rows[0]['analytic']:.3g}"
            + (f", final model with {rows[0]['repeats']} presentation(s) {rows[0]['analytic_final']:.3g}"
               if "analytic_final" in rows[0] else ""))


def simulate(draws: int = 200, canaries: int = 500, delta: float = 1e-5) -> list[str]:
    """The model of docs/privacy.md: per round sqrt(d) cos = N(presented / z, 1), no real clients."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent, pld
    from scipy import optimize, stats

    from fedmpi.audit import _epsilon_two_gaussians

    def accountant(z: float, rounds: int) -> float:
        acc = pld.PLDAccountant()
        acc.compose(SelfComposedDpEvent(PoissonSampledDpEvent(0.5, GaussianDpEvent(z)), rounds))
        return acc.get_epsilon(delta)

    def fitted(x: np.ndarray, null: np.ndarray | None = None) -> float:
        if null is not None:
            x = (x - null.mean()) / null.std(ddof=1)
        return _epsilon_two_gaussians(float(x.mean()), float(x.std(ddof=1)), delta)

    def exact(weights: np.ndarray, shift: float) -> float:  # sum_k w_k N(k shift, 1) against N(0, 1), on a grid
        y = np.linspace(-12, 14, 400_001)
        p0, p1 = stats.norm.pdf(y), sum(w * stats.norm.pdf(y, k * shift) for k, w in enumerate(weights))
        def hockey(eps, p, q):
            return np.maximum(p - np.exp(eps) * q, 0).sum() * (y[1] - y[0])
        return optimize.brentq(lambda e: max(hockey(e, p1, p0), hockey(e, p0, p1)) - delta, 0, 20)

    rng, lines = np.random.default_rng(1), []
    for rounds in (3, 20):
        z = optimize.brentq(lambda z, t=rounds: accountant(z, t) - 2.0, 0.3, 30)
        for repeats in (0, 1):
            weights = stats.binom.pmf(np.arange(rounds + 1), rounds, 0.5) if repeats == 0 else np.eye(rounds + 1)[1]
            final, top = [], []
            for _ in range(draws):
                if repeats == 0:
                    taken = rng.random((canaries, rounds)) < 0.5
                else:
                    taken = np.zeros((canaries, rounds), bool)
                    taken[np.arange(canaries), rng.integers(0, rounds, canaries)] = True
                per_round = rng.standard_normal((canaries, rounds)) + taken / z
                final.append(fitted(per_round.sum(axis=1) / np.sqrt(rounds)))
                top.append(fitted(per_round.max(axis=1), rng.standard_normal((canaries, rounds)).max(axis=1)))
            spread = [f"{np.percentile(v, [5, 50, 95]).round(2).tolist()} ({np.mean(np.array(v) > 2):.0%} above 2)"
                      for v in (final, top)]
            lines.append(f"T = {rounds}, z = {z:.3f}, repeats = {repeats}: exact final-model epsilon "
                         f"{exact(weights, 1 / (np.sqrt(rounds) * z)):.3f}; final-model estimate {spread[0]}; "
                         f"max-cosine estimate {spread[1]}")
    return lines


def main() -> int:
    parts = _runs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=", ".join(parts))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first.. first + seeds - 1")
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--simulate", action="store_true", help="no runs: the simulation of docs/privacy.md")
    parser.add_argument("--only", metavar="TEXT", help="only the runs whose label contains TEXT (e.g. 'eps 4, 1000')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra",
                        help="an override added to every run")
    args = parser.parse_args()
    if args.simulate:
        print("\n".join(simulate()))
        return 0
    unknown = [p for p in args.parts if p not in parts]
    if unknown:
        parser.error(f"unknown part {unknown[0]!r} (choose from {', '.join(parts)})")
    results, lines = {}, []
    with tempfile.TemporaryDirectory() as tmpdir:
        for part in args.parts or list(parts):
            for label, overrides, env in parts[part]:
                if args.only and args.only not in label:
                    continue
                rows = []
                for seed in range(args.first_seed, args.first_seed + args.seeds):
                    extra = [arg for item in args.extra for arg in ("--set", item)]
                    rows.append(run_one([*overrides, *extra], env, seed, args.ranks, Path(tmpdir)))
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
