"""The algorithm comparison of docs/comparison.md, from the sweeps' results files.

    mpirun -n 2 python -m fedmpi.sweep configs/sweeps/compare_synthetic.yaml --in-job
    mpirun -n 2 python -m fedmpi.sweep configs/sweeps/compare_digits.yaml --in-job
    python tools/compare_algorithms.py results/compare-synthetic results/compare-digits \\
        --plot docs/images/comparison.png --table results/comparison.md

For every run (one sweep directory per data set; the runs keep a snapshot of the
global model every round): the *global* training loss of every round's model,
the mean cross-entropy over the union of all clients' training samples (what
FedProx and SCAFFOLD report), recomputed here from ``/model/snapshots``; the
test accuracy the run recorded. Runs that differ only in the seed are averaged.
For each data set and straggler setting the table gives the final global
training loss and test accuracy (mean +- std over seeds), and the first round
at which each algorithm's mean global training loss is at or below FedAvg's
final one ("rounds to FedAvg's final loss"; "-" when it never is), with how
many seeds reach their own FedAvg run's final loss by then.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmpi.config import from_mapping  # noqa: E402
from fedmpi.data import load as load_data  # noqa: E402
from fedmpi.models import FlatModel, build_model  # noqa: E402
from fedmpi.results import load  # noqa: E402
from fedmpi.training import evaluate  # noqa: E402

ORDER = ("fedavg", "fedprox", "scaffold")
COLORS = {"fedavg": "tab:orange", "fedprox": "tab:blue", "scaffold": "tab:green"}


def global_train_loss(path: Path) -> tuple[dict, np.ndarray, np.ndarray, float]:
    """(config, global training loss per round, test accuracy per round, wall seconds) of one run."""
    import h5py
    import torch

    torch.set_num_threads(1)
    run = load(str(path))
    cfg = from_mapping(run.config)
    data = load_data(cfg, need_train=True, need_test=False)
    parts = [data.client(c) for c in range(cfg.clients.total)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    model = FlatModel(build_model(cfg.model, data.input_shape, data.num_classes))
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        snapshots = f["model/snapshots"][:]
        wall = float(f["run/wall_s"][()])
    losses = np.array([evaluate(model, w, x, y, 4096)[0] for w in snapshots])
    return run.config, losses, run.rounds["test_accuracy"].to_numpy(), wall


def collect(directories: list[str]) -> dict:
    """{(data set, stragglers): {algorithm: [(seed, losses, accuracy, wall)]}}."""
    groups: dict = defaultdict(lambda: defaultdict(list))
    for directory in directories:
        for path in sorted(Path(directory).glob("run-*.h5")):
            config, losses, accuracy, wall = global_train_loss(path)
            label = Path(directory).name
            key = (label, float(config["devices"]["stragglers"]))
            groups[key][config["algorithm"]["name"]].append((config["seed"], losses, accuracy, wall))
            print(f"{path}: {config['algorithm']['name']} stragglers {key[1]} seed {config['seed']}: final global train "
                  f"loss {losses[-1]:.4f}, test accuracy {accuracy[-1]:.4f}, {wall:.0f} s", flush=True)
    return groups


def rounds_to(curve: np.ndarray, target: float) -> int | None:
    """1-based round at which ``curve`` first is <= ``target``."""
    hits = np.flatnonzero(curve <= target)
    return int(hits[0]) + 1 if len(hits) else None


def table(groups: dict) -> str:
    lines = ["| data | stragglers | algorithm | final global train loss | final test accuracy | rounds to FedAvg's final "
             "loss (mean curve) | seeds reaching their FedAvg's final loss | rounds to it per seed | wall s per run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (label, stragglers), algorithms in sorted(groups.items()):
        base = {seed: losses for seed, losses, _, _ in algorithms["fedavg"]}
        target = np.mean([losses for losses in base.values()], axis=0)[-1]
        for name in ORDER:
            runs = sorted(algorithms.get(name, []), key=lambda run: run[0])
            if not runs:
                continue
            losses = np.array([r[1] for r in runs])
            accuracy = np.array([r[2][-1] for r in runs])
            mean_curve = losses.mean(axis=0)
            reached = rounds_to(mean_curve, target)
            per_seed = [rounds_to(r[1], base[r[0]][-1]) for r in runs]
            lines.append(
                f"| {label} | {stragglers:g} | {name} | {losses[:, -1].mean():.4f} +- {losses[:, -1].std():.4f} | "
                f"{accuracy.mean():.4f} +- {accuracy.std():.4f} | {reached if reached is not None else '-'} of "
                f"{len(mean_curve)} | {sum(p is not None for p in per_seed)}/{len(runs)} | "
                f"{', '.join('-' if p is None else str(p) for p in per_seed)} | {np.mean([r[3] for r in runs]):.0f} |")
    return "\n".join(lines) + "\n"


def plot(groups: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(groups)
    labels = sorted({k[0] for k in keys})
    settings = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(2 * len(labels), len(settings), figsize=(5 * len(settings), 3.2 * 2 * len(labels)),
                             squeeze=False, sharex=True)
    for (label, stragglers), algorithms in groups.items():
        col = settings.index(stragglers)
        for offset, (what, index, scale) in enumerate((("global training loss", 1, "log"), ("test accuracy", 2, "linear"))):
            ax = axes[2 * labels.index(label) + offset][col]
            for name in ORDER:
                runs = algorithms.get(name)
                if not runs:
                    continue
                values = np.array([r[index] for r in runs])
                x = np.arange(1, values.shape[1] + 1)
                mean = values.mean(axis=0)
                ax.plot(x, mean, color=COLORS[name], label=name, lw=1.4)
                ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=COLORS[name], alpha=0.2, lw=0)
            ax.set_yscale(scale)
            ax.set_title(f"{label}, stragglers {stragglers:g}: {what}", fontsize=9)
            ax.grid(alpha=0.3)
            if offset == 1 and 2 * labels.index(label) + offset == 2 * len(labels) - 1:
                ax.set_xlabel("round")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", help="sweep output directories, one per data set")
    parser.add_argument("--plot", help="PNG of the loss and accuracy curves (mean over seeds, band: min to max)")
    parser.add_argument("--table", help="write the markdown table here (it is printed either way)")
    args = parser.parse_args()
    groups = collect(args.directories)
    text = table(groups)
    print(text)
    if args.table:
        Path(args.table).write_text(text)
    if args.plot:
        plot(groups, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
