"""Tables and figures of docs/privacy.md's "What an attacker learns", from the leakage sweeps.

    for s in methods noise batch steps membership membership_dp; do
        mpirun -n 2 python -m fedmpi.sweep configs/sweeps/leakage_$s.yaml --in-job --ranks-per-run 1
    done
    python tools/leakage_study.py            # prints the tables, writes the two figures

(``--in-job`` keeps the interpreters warm: two one-process runs at a time; ``--run``
starts each run as its own ``mpirun`` and writes the same files.)

Reads each sweep's results directory (``out`` in the sweep file, found through its
manifest.json), prints one markdown table per study, and draws
docs/images/leakage_inversion_noise.png (reconstruction PSNR against the noise
multiplier) and docs/images/leakage_membership_epsilon.png (membership AUC and TPR at
1% FPR against epsilon). A sweep whose directory is missing is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmpi.analyze import read_leakage  # noqa: E402
from fedmpi.results import load, open_results  # noqa: E402

ATTACKS = ("loss_threshold", "lira_offline", "lira_online")


def runs(out: str) -> list[tuple[dict, dict, object]]:
    """(overrides, leakage arrays, RunResults) of every finished run of a sweep directory."""
    manifest = Path(out) / "manifest.json"
    if not manifest.exists():
        return []
    found = []
    for entry in json.loads(manifest.read_text())["entries"]:
        if os.path.exists(entry["out"]):
            run = load(entry["out"])
            if run.finished:
                found.append((entry["overrides"], read_leakage(entry["out"]), run))
    return found


def inversion_numbers(leak: dict) -> dict:
    inv = leak["inversion"]
    filled = np.isfinite(inv["psnr"])
    return {"psnr": float(inv["psnr"][filled].mean()), "psnr_min": float(inv["psnr"][filled].min()),
            "mse_max": float(inv["mse"][filled].max()), "ssim": float(inv["ssim"][filled].mean()),
            "labels": float(inv["label_accuracy"].mean()), "reference": float(inv["mean_image_psnr"][filled].mean()),
            "seconds": float(inv["seconds"].mean()), "updates": len(inv["round"]), "images": int(filled.sum())}


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def methods(results: Path) -> None:
    rows = []
    for overrides, leak, _ in runs(results / "leakage-methods"):
        n = inversion_numbers(leak)
        rows.append([overrides["audit.inversion.method"], f"{n['psnr']:.1f} (min {n['psnr_min']:.1f})",
                     f"{n['mse_max']:.1e}", f"{n['ssim']:.4f}", f"{n['labels']:.2f}", f"{n['reference']:.1f}",
                     f"{n['seconds']:.1f}"])
    if rows:
        print("\nMethods, no DP, one-digit updates (300 iterations):\n")
        print(table(["method", "PSNR dB (min)", "max MSE", "SSIM", "labels right", "mean image dB", "s / update"], rows))


def noise(results: Path, images: Path) -> None:
    found = runs(results / "leakage-noise")
    if not found:
        return
    curves: dict[str, list] = {}
    reference = []
    for overrides, leak, _ in found:
        n = inversion_numbers(leak)
        curves.setdefault(overrides["privacy.mode"], []).append((overrides["privacy.noise_multiplier"], n["psnr"],
                                                                 n["psnr_min"], n["ssim"]))
        reference.append(n["reference"])
    levels = sorted({z for points in curves.values() for z, *_ in points})
    rows = [[mode] + [f"{p:.1f}" for _, p, _, _ in sorted(points)] for mode, points in curves.items()]
    print("\nReconstruction PSNR (dB, mean over the attacked updates) against the noise multiplier, clip 1; "
          f"the mean image scores {np.mean(reference):.1f} dB:\n")
    print(table(["mode"] + [f"{z:g}" for z in levels], rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = {"sample": "DP-SGD (per-example clip, client noise)", "client_local": "DP-FedAvg, noise added by the client",
             "client_central": "DP-FedAvg, noise added by the server"}
    for mode, points in curves.items():
        points = sorted(points)
        ax.plot([max(z, 1e-3) for z, *_ in points], [p for _, p, _, _ in points], marker="o", label=names.get(mode, mode))
    ax.axhline(np.mean(reference), color="grey", linestyle=":", label="dataset mean image (nothing leaked)")
    ax.set_xscale("log")
    ticks = [max(z, 1e-3) for z in levels]
    ax.set_xticks(ticks, ["0" if z == 0 else f"{z:g}" for z in levels])
    ax.set(xlabel="noise multiplier (0 = clipping only)", ylabel="reconstruction PSNR (dB)",
           title="Inverting Gradients on one-digit updates (digits, MLP 200-200)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    path = images / "leakage_inversion_noise.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"\nwrote {path}")


def batch(results: Path) -> None:
    rows = []
    for overrides, leak, _ in runs(results / "leakage-batch"):
        n = inversion_numbers(leak)
        size = int(leak["inversion"]["num_examples"].max())
        rows.append([size, overrides["audit.inversion.labels"], f"{n['psnr']:.1f} (min {n['psnr_min']:.1f})",
                     f"{n['ssim']:.3f}", f"{n['labels']:.2f}", f"{n['reference']:.1f}"])
    if rows:
        print("\nOne SGD step on a batch of 1 or 8 (Inverting Gradients, 1000 iterations):\n")
        print(table(["batch", "labels", "PSNR dB (min)", "SSIM", "labels right", "mean image dB"], rows))


def steps(results: Path) -> None:
    found = runs(results / "leakage-steps")
    if not found:
        return
    by_method: dict[str, dict] = {}
    for overrides, leak, _ in found:
        n = inversion_numbers(leak)
        by_method.setdefault(overrides["audit.inversion.method"], {})[overrides["train.epochs"]] = n
    epochs = sorted({e for values in by_method.values() for e in values})
    print("\nLocal steps on one digit (PSNR dB, mean over the attacked updates (min), SSIM; 200 iterations):\n")
    print(table(["method"] + [f"{e} step(s)" for e in epochs],
                [[m] + [f"{values[e]['psnr']:.1f} (min {values[e]['psnr_min']:.1f}), {values[e]['ssim']:.3f}" for e in epochs]
                 for m, values in by_method.items()]))


def membership_rows(found) -> list[dict]:
    rows = []
    for overrides, leak, run in found:
        mem = leak["membership"]
        rows.append({"seed": overrides.get("seed", 0), "epsilon": run.privacy.get("epsilon", math.inf),
                     "target": overrides.get("privacy.target_epsilon", math.inf),
                     "accuracy": float(run.rounds["test_accuracy"].iloc[-1]),
                     "auc": mem["auc"][-1], "tpr1": mem["tpr_at_fpr_0.01"][-1], "tpr01": mem["tpr_at_fpr_0.001"][-1],
                     "advantage": mem["advantage"][-1]})
    return rows


def membership(results: Path, images: Path) -> None:
    rows = membership_rows(runs(results / "leakage-membership")) + membership_rows(runs(results / "leakage-membership-dp"))
    if not rows:
        return
    groups: dict[float, list] = {}
    for row in rows:
        groups.setdefault(row["target"], []).append(row)
    print("\nMembership inference, final model, mean ± std over seeds (loss threshold / LiRA offline / LiRA online):\n")
    lines = []
    summary = {}
    measured = {}  # target -> the accountant's epsilon, mean over seeds (the calibration may miss the target)
    for target in sorted(groups):
        g = groups[target]

        def ms(key, j=None, g=g):
            values = np.array([r[key] if j is None else r[key][j] for r in g], dtype=float)
            return values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0

        eps = [r["epsilon"] for r in g]
        summary[target] = {k: [ms(k, j) for j in range(3)] for k in ("auc", "tpr1", "advantage")}
        measured[target] = float(np.mean(eps))
        bound = "-" if math.isinf(target) else f"{math.exp(max(eps)) - 1:.3g}"
        lines.append(["none" if math.isinf(target) else f"{np.mean(eps):.3g}", len(g), f"{ms('accuracy')[0]:.3f}"]
                     + [" / ".join(f"{m:.3f}±{s:.3f}" for m, s in summary[target][k]) for k in ("auc", "tpr1")]
                     + [" / ".join(f"{max(r['advantage'][j] for r in g):.3f}" for j in range(3)), bound])
    print(table(["epsilon", "seeds", "test acc", "AUC", "TPR at 1% FPR", "max advantage", "e^eps - 1"], lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted(t for t in summary if not math.isinf(t))
    xs = finite + ([finite[-1] * 4 if finite else 1.0] if math.inf in summary else [])
    keys = finite + ([math.inf] if math.inf in summary else [])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "auc", "ROC AUC"), (axes[1], "tpr1", "TPR at 1% FPR")):
        for j, name in enumerate(ATTACKS):
            means = [summary[k][key][j][0] for k in keys]
            stds = [summary[k][key][j][1] for k in keys]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=name)
        ax.axhline(0.5 if key == "auc" else 0.01, color="grey", linestyle=":", label="chance")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{measured[t]:.3g}" for t in finite] + (["no DP"] if math.inf in summary else []))
        ax.set(xlabel="epsilon (DP-SGD, delta 1e-5, mean over seeds)", ylabel=label)
        ax.legend(fontsize=7)
    fig.suptitle("Membership inference on an overfit federation (digits, 180 examples, 2 clients), mean and std "
                 "over seeds", fontsize=9)
    path = images / "leakage_membership_epsilon.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print(f"\nwrote {path}")


def membership_client(results: Path) -> None:
    found = runs(results / "leakage-membership-client")
    if not found:
        return
    rows = []
    for overrides, leak, run in sorted(found, key=lambda f: f[0]["privacy.noise_multiplier"]):
        mem = leak["membership"]
        rows.append([f"{overrides['privacy.noise_multiplier']:g}", f"{run.privacy.get('epsilon', math.inf):.3g}",
                     f"{float(run.rounds['test_accuracy'].iloc[-1]):.3f}", int(mem["member"].sum()),
                     " / ".join(f"{v:.3f}" for v in mem["auc"][-1]), " / ".join(f"{v:.3f}" for v in mem["tpr_at_fpr_0.01"][-1]),
                     " / ".join(f"{v:.3f}" for v in mem["advantage"][-1])])
    print("\nClient-level membership, 32 clients, central DP-FedAvg (loss threshold / LiRA offline / LiRA online):\n")
    print(table(["z", "epsilon", "test acc", "member clients", "AUC", "TPR at 1% FPR", "advantage"], rows))


def membership_large(results: Path) -> None:
    """DP-SGD at epsilon 1 on about 900 audited examples (leakage_membership_dp_large.yaml), per seed."""
    found = runs(results / "leakage-membership-dp-large")
    if not found:
        return
    rows = []
    for row, (_, leak, _) in zip(membership_rows(found), found):
        rows.append([row["seed"], f"{row['epsilon']:.3f}", f"{row['accuracy']:.3f}", int(leak["membership"]["member"].sum()),
                     " / ".join(f"{v:.3f}" for v in row["auc"]), " / ".join(f"{v:.3f}" for v in row["tpr1"]),
                     " / ".join(f"{v:.3f}" for v in row["advantage"]), f"{math.expm1(row['epsilon']):.2f}"])
    print("\nMembership at epsilon 1 on the larger audited set (loss threshold / LiRA offline / LiRA online):\n")
    print(table(["seed", "epsilon", "test acc", "members", "AUC", "TPR at 1% FPR", "advantage", "e^eps - 1"], sorted(rows)))


def run_time(results: Path) -> None:
    """Seconds each sweep's runs took (the sum of /run/wall_s, file creation to the end of each run)."""
    print("\nRun time per sweep (sum of /run/wall_s over its runs):\n")
    rows = []
    for name in ("leakage-methods", "leakage-noise", "leakage-batch", "leakage-steps", "leakage-membership",
                 "leakage-membership-dp", "leakage-membership-dp-large", "leakage-membership-client"):
        found = runs(results / name)
        if found:
            total = 0.0
            for _, _, run in found:
                with open_results(run.path) as f:
                    total += float(f["run/wall_s"][()])
            rows.append([name, len(found), f"{total:.0f}"])
    print(table(["sweep", "runs", "seconds"], rows))


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results", help="the directory holding the sweeps' out directories")
    parser.add_argument("--images", default=str(REPO / "docs" / "images"), help="where the figures go")
    args = parser.parse_args(argv)
    results, images = Path(args.results), Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    methods(results)
    noise(results, images)
    batch(results)
    steps(results)
    membership(results, images)
    membership_large(results)
    membership_client(results)
    run_time(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
