"""``python -m fedmpi.analyze FILE_OR_DIR ... [--csv PATH] [--plot DIR] [--robustness DIR] [--tensorboard DIR] [--follow FILE]``

Post-hoc analysis of results files:

- a summary table, one row per run: the config keys that differ between the
  runs, final and best test accuracy, rounds, epsilon, wall time, and for
  attacked runs the aggregator's precision and recall at excluding Byzantine
  updates (precision: excluded updates that were Byzantine / excluded updates;
  recall: Byzantine updates excluded / Byzantine updates), and a backdoor's
  final success rate where a run has one;
- sweeps: runs that differ only in ``seed`` are grouped, with mean and standard
  deviation over the seeds (``--no-group`` to list every run);
- ``--plot DIR``: accuracy and loss per round (runs overlaid, labelled by their
  differing keys), accuracy against epsilon, a rounds x cohort-slot map of what
  the aggregator kept with Byzantine slots marked, update-norm distributions of
  honest and Byzantine clients, a backdoor's success rate per round;
- leakage audits (``audit.inversion``, ``audit.membership``): the summary gains
  the reconstruction PSNR, SSIM and label accuracy against the mean-image
  reference, and each membership attack's AUC and TPR at 1% FPR and the best
  advantage on the final model; ``--plot`` draws true examples over their
  reconstructions and the attacks' ROC curves;
- ``--robustness DIR``: a sweep of rules against attacks as rules-by-attacks
  tables of final accuracy (mean and std over seeds, worst attack per rule), the
  backdoor table, and a heatmap (PNG and PDF);
- ``--tensorboard DIR``: the per-round metrics as TensorBoard event files, one
  run (subdirectory) per results file, the config as its hyperparameters
  (needs the ``tensorboard`` extra: ``pip install "fedmpi[tensorboard]"``);
- ``--follow FILE``: print each round of a run as it is written, until it ends.

A file that cannot be used gets one line naming it (exit status 2).
"""

from __future__ import annotations

import argparse
import calendar
import json
import math
import os
import sys
import textwrap
import time
from typing import Any

import numpy as np

from .protocol import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_OK
from .results import ResultsError, RoundFollower, RunResults, load, progress_line
from .schema import flatten

IGNORED_KEYS = ("output.path", "output.overwrite")


# --------------------------------------------------------------------------- loading


def find_files(paths: list[str]) -> list[str]:
    """Expand directories into the .h5 files below them (sorted); files pass through."""
    out = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                           if name.endswith((".h5", ".hdf5")))
            if not found:
                raise ResultsError(f"{path}: directory holds no .h5 results files")
            out.extend(found)
        else:
            out.append(path)
    return out


def differing_keys(runs: list[RunResults]) -> list[str]:
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    return [k for k in keys if k not in IGNORED_KEYS and len({repr(f.get(k)) for f in flats}) > 1]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return str(value).replace(" ", "")
    return str(value)


def label(run: RunResults, keys: list[str]) -> str:
    flat = flatten(run.config)
    text = ", ".join(f"{k}={_fmt(flat.get(k))}" for k in keys)
    return text or os.path.basename(run.path)


# --------------------------------------------------------------------------- summary


def exclusion_scores(clients) -> tuple[float, float]:
    """(precision, recall) of the aggregator at excluding Byzantine updates, over
    every (round, slot) record; NaN where undefined."""
    if clients.empty or "byzantine" not in clients or "selected" not in clients:
        return math.nan, math.nan
    byz = clients["byzantine"].to_numpy(bool)
    excluded = ~clients["selected"].to_numpy(bool)
    caught = int((byz & excluded).sum())
    precision = caught / excluded.sum() if excluded.sum() else math.nan
    recall = caught / byz.sum() if byz.sum() else math.nan
    return precision, recall


def summarise(run: RunResults) -> dict:
    """The numbers of one run's summary row."""
    rounds = run.rounds
    acc = rounds["test_accuracy"].to_numpy() if "test_accuracy" in rounds else np.array([])
    evaluated = acc[np.isfinite(acc)]
    precision, recall = exclusion_scores(run.clients)
    attacked = bool(run.attrs.get("byzantine_clients")) if run.attrs.get("byzantine_clients") is not None else False
    eps = run.privacy.get("epsilon", math.nan) if run.finished else math.nan
    if not np.isfinite(eps) and "epsilon" in rounds and len(rounds):
        eps = float(rounds["epsilon"].iloc[-1])
    wall = float(rounds["wall_s"].sum()) if "wall_s" in rounds else math.nan
    return {
        "file": run.path,
        "rounds": len(rounds),
        "finished": run.finished,
        "final_accuracy": float(evaluated[-1]) if len(evaluated) else math.nan,
        "best_accuracy": float(evaluated.max()) if len(evaluated) else math.nan,
        "epsilon": float(eps),
        "wall_s": wall,
        "byzantine_precision": precision if attacked else math.nan,
        "byzantine_recall": recall if attacked else math.nan,
        "backdoor_accuracy": _last_finite(rounds.get("backdoor_accuracy")),
    }


def _last_finite(column) -> float:
    """The last finite value of a /rounds column (NaN when none, or no such column)."""
    values = np.asarray(column if column is not None else [], dtype=float)
    values = values[np.isfinite(values)]
    return float(values[-1]) if len(values) else math.nan


NUMERIC = ("final_accuracy", "best_accuracy", "epsilon", "wall_s", "byzantine_precision", "byzantine_recall",
           "backdoor_accuracy")
OPTIONAL = ("backdoor_accuracy",)  # shown only where some run has it
LEAKAGE = ("recon_psnr", "recon_ssim", "mean_image_psnr", "label_accuracy", "mia_auc_loss", "mia_auc_offline",
           "mia_auc_online", "mia_tpr1_loss", "mia_tpr1_offline", "mia_tpr1_online", "mia_advantage")


def read_leakage(path: str) -> dict:
    """The leakage audits a results file holds: ``inversion`` (per attacked slot and image,
    /audit/inversion) and ``membership`` (/audit/membership), each a dict of arrays, or
    absent; empty for a run without audits. Membership arrays are absent until written."""
    from .results import open_checked

    out = {}
    with open_checked(path) as f:
        for name in ("inversion", "membership"):
            if f"audit/{name}" not in f:
                continue
            group, arrays = f[f"audit/{name}"], {}
            for key, ds in group.items():
                if hasattr(ds, "shape"):
                    ds.refresh()
                    arrays[key] = ds[()]
            out[name] = arrays
    return out


def leakage_numbers(leak: dict) -> dict:
    """The summary's leakage columns (NaN where a run has no such audit): over every
    attacked image, the mean reconstruction PSNR and SSIM, the mean-image PSNR and the
    mean per-slot label accuracy; per membership attack on the final model, AUC and TPR
    at 1% FPR, and the best advantage of any attack."""
    row = dict.fromkeys(LEAKAGE, math.nan)
    inv = leak.get("inversion")
    if inv is not None and len(inv["round"]):
        filled = np.isfinite(inv["psnr"])
        row.update(recon_psnr=float(inv["psnr"][filled].mean()), recon_ssim=float(inv["ssim"][filled].mean()),
                   mean_image_psnr=float(inv["mean_image_psnr"][filled].mean()),
                   label_accuracy=float(inv["label_accuracy"].mean()))
    mem = leak.get("membership")
    if mem is not None and np.isfinite(mem["auc"]).any():
        attacks = [a.decode() for a in mem["attack"]]
        short = {"loss_threshold": "loss", "lira_offline": "offline", "lira_online": "online"}
        for j, name in enumerate(attacks):
            row[f"mia_auc_{short[name]}"] = float(mem["auc"][-1, j])
            row[f"mia_tpr1_{short[name]}"] = float(mem["tpr_at_fpr_0.01"][-1, j])
        row["mia_advantage"] = float(np.nanmax(mem["advantage"][-1]))
    return row


def summary_table(runs: list[RunResults], group: bool = True):
    """One row per run (or per group of runs that differ only in seed, with
    mean and std over the seeds), with the differing config keys as columns."""
    import pandas as pd

    keys = differing_keys(runs)
    rows = []
    leaks = [read_leakage(run.path) for run in runs]
    for run, leak in zip(runs, leaks):
        flat = flatten(run.config)
        row = {k: _fmt(flat.get(k)) for k in keys}
        row.update(summarise(run))
        if any(leaks):
            row.update(leakage_numbers(leak))
        rows.append(row)
    table = pd.DataFrame(rows)
    table = table.drop(columns=[c for c in OPTIONAL if table[c].isna().all()])
    group_keys = [k for k in keys if k != "seed"]
    if not group or "seed" not in keys:
        return table
    numeric = NUMERIC + (LEAKAGE if any(leaks) else ())
    grouped = table.groupby(group_keys, sort=False, dropna=False) if group_keys else [((), table)]
    out = []
    for values, part in grouped:
        values = values if isinstance(values, tuple) else (values,)
        row = dict(zip(group_keys, values))
        row["runs"] = len(part)
        row["seeds"] = ",".join(part["seed"])
        row["rounds"] = int(part["rounds"].max())
        for col in numeric:
            if col not in part:
                continue
            column = part[col].astype(float)
            row[col] = column.mean()
            row[f"{col}_std"] = column.std(ddof=1) if len(part) > 1 else math.nan
        out.append(row)
    return pd.DataFrame(out)


def _display(table):
    """Merge "x" and "x_std" columns into "x" cells reading mean±std."""
    table = table.copy()
    for col in NUMERIC + LEAKAGE:
        std = f"{col}_std"
        if std in table.columns:
            table[col] = [("-" if math.isnan(m) else f"{m:.4g}" + ("" if math.isnan(s) else f"±{s:.2g}"))
                          for m, s in zip(table[col].astype(float), table[std].astype(float))]
            table = table.drop(columns=std)
    return table


def format_table(table) -> str:
    """The summary as aligned text (file paths last)."""
    table = _display(table)
    columns = [c for c in table.columns if c != "file"] + (["file"] if "file" in table.columns else [])
    cells = [[_fmt(v) if not (isinstance(v, float) and math.isnan(v)) else "-" for v in table[c]] for c in columns]
    widths = [max(len(c), *(len(x) for x in col)) if len(col) else len(c) for c, col in zip(columns, cells)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    for i in range(len(table)):
        lines.append("  ".join(cells[j][i].ljust(w) for j, w in enumerate(widths)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def make_plots(runs: list[RunResults], directory: str, fmt: str = "png") -> list[str]:
    """Write every plot kind into ``directory``; return the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    keys = differing_keys(runs)
    written = []

    def save(fig, name):
        path = os.path.join(directory, f"{name}.{fmt}")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        r = run.rounds
        evaluated = r[np.isfinite(r["test_accuracy"])]
        axes[0].plot(evaluated["round"] + 1, evaluated["test_accuracy"], marker=".", label=label(run, keys))
        axes[1].plot(evaluated["round"] + 1, evaluated["test_loss"], marker=".", label=label(run, keys))
    axes[0].set(xlabel="round", ylabel="test accuracy", title="Test accuracy")
    axes[1].set(xlabel="round", ylabel="test loss", title="Test loss", yscale="log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=8, frameon=False)
    save(fig, "accuracy_loss")

    fig, ax = plt.subplots(figsize=(6, 4))
    private = [run for run in runs if "epsilon" in run.rounds and np.isfinite(run.rounds["epsilon"]).any()]
    for run in private:
        r = run.rounds[np.isfinite(run.rounds["test_accuracy"]) & np.isfinite(run.rounds["epsilon"])]
        ax.plot(r["epsilon"], r["test_accuracy"], marker=".", label=label(run, keys))
    ax.set(xlabel="epsilon (RDP, per round)", ylabel="test accuracy", title="Accuracy against privacy spent")
    if private:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    else:
        ax.text(0.5, 0.5, "no run with differential privacy", ha="center", va="center", transform=ax.transAxes)
    save(fig, "accuracy_epsilon")

    fig, ax = plt.subplots(figsize=(6, 4))
    backdoored = [run for run in runs if "backdoor_accuracy" in run.rounds and np.isfinite(run.rounds["backdoor_accuracy"]).any()]
    for run in backdoored:
        r = run.rounds[np.isfinite(run.rounds["backdoor_accuracy"])]
        ax.plot(r["round"] + 1, r["backdoor_accuracy"], marker=".", label=label(run, keys))
    ax.set(xlabel="round", ylabel="attack success rate", title="Backdoor: triggered test inputs classified as the target",
           ylim=(-0.02, 1.02))
    if backdoored:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False)
    else:
        ax.text(0.5, 0.5, "no run with a backdoor attack", ha="center", va="center", transform=ax.transAxes)
    save(fig, "backdoor")

    for index, run in enumerate(runs):
        c = run.clients
        fig, ax = plt.subplots(figsize=(7, 4))
        if len(c):
            n_rounds, width = int(c["round"].max()) + 1, int(c["slot"].max()) + 1
            kept = np.full((width, n_rounds), np.nan)
            kept[c["slot"].to_numpy(), c["round"].to_numpy()] = c["selected"].to_numpy(float)
            ax.imshow(kept, aspect="auto", origin="lower", cmap="Greens", vmin=0, vmax=1.4, interpolation="nearest")
            ax.yaxis.get_major_locator().set_params(integer=True)
            ax.xaxis.get_major_locator().set_params(integer=True)
            byz = c[c["byzantine"].to_numpy(bool)]
            ax.scatter(byz["round"], byz["slot"], marker="x", color="crimson", s=14, label="Byzantine")
            if len(byz):
                ax.legend(loc="upper right", fontsize=7)
        ax.set(xlabel="round", ylabel="cohort slot", title=f"Kept by the aggregator (green): {label(run, keys)}")
        save(fig, f"selection_{index}")

    fig, ax = plt.subplots(figsize=(6, 4))
    honest_all, byz_all = [], []
    for run in runs:
        c = run.clients
        if len(c):
            mask = c["byzantine"].to_numpy(bool)
            honest_all.append(c["update_norm"].to_numpy()[~mask])
            byz_all.append(c["update_norm"].to_numpy()[mask])
    honest = np.concatenate(honest_all) if honest_all else np.empty(0)
    byz = np.concatenate(byz_all) if byz_all else np.empty(0)
    positive = np.concatenate([honest, byz])
    positive = positive[np.isfinite(positive) & (positive > 0)]
    if len(positive):
        bins = np.logspace(np.log10(positive.min()), np.log10(positive.max()) + 1e-9, 40)
        ax.hist(honest[honest > 0], bins=bins, alpha=0.7, label=f"honest ({len(honest)})")
        if len(byz):
            ax.hist(byz[byz > 0], bins=bins, alpha=0.7, color="crimson", label=f"Byzantine ({len(byz)})")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set(xlabel="update L2 norm", ylabel="client updates", title="Update norms")
    save(fig, "update_norms")

    for index, run in enumerate(runs):
        leak = read_leakage(run.path)
        inv = leak.get("inversion")
        if inv is not None and len(inv["round"]):
            save(inversion_grid(plt, inv, label(run, keys)), f"inversion_{index}")
        mem = leak.get("membership")
        if mem is not None and np.isfinite(mem["auc"]).any():
            save(roc_plot(plt, mem, label(run, keys)), f"membership_roc_{index}")
    return written


def inversion_grid(plt, inv: dict, title: str, columns: int = 8):
    """True examples (top row of each pair) over their reconstructions, the first ``columns``
    attacked images, each with its PSNR and the mean image's."""
    images = [(s, j) for s in range(len(inv["round"])) for j in range(int(inv["num_examples"][s]))][:columns]
    fig, axes = plt.subplots(2, len(images), figsize=(1.3 * len(images) + 0.6, 3.2), squeeze=False)
    for col, (s, j) in enumerate(images):
        for row, name in enumerate(("truth", "reconstruction")):
            ax = axes[row, col]
            image = inv[name][s, j]
            ax.imshow(image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(f"r{int(inv['round'][s])} c{int(inv['client_id'][s])}", fontsize=7)
        axes[1, col].set_xlabel(f"{inv['psnr'][s, j]:.1f} dB\n(mean {inv['mean_image_psnr'][s, j]:.1f})", fontsize=7)
    axes[0, 0].set_ylabel("truth", fontsize=8)
    axes[1, 0].set_ylabel("reconstruction", fontsize=8)
    fig.suptitle(textwrap.fill(f"Gradient inversion: {title}", 60 + 12 * len(images)), fontsize=8)
    return fig


def roc_plot(plt, mem: dict, title: str):
    """The membership attacks' ROC curves on the final model, log-log (low FPRs are what
    matter, Carlini et al. 2022), with each attack's AUC and TPR at 1% FPR."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for j, name in enumerate(a.decode() for a in mem["attack"]):
        fpr, tpr = mem["roc_fpr"][-1, j], mem["roc_tpr"][-1, j]
        keep = np.isfinite(fpr)
        ax.plot(fpr[keep], tpr[keep], label=f"{name}: AUC {mem['auc'][-1, j]:.3f}, "
                f"TPR@1% {mem['tpr_at_fpr_0.01'][-1, j]:.3f}")
    members = int(mem["member"].sum())
    floor = 1.0 / max(1, len(mem["member"]) - members)
    ax.plot([floor, 1], [floor, 1], color="grey", linestyle=":", label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor, 1), ylim=(floor, 1.05), xlabel="false-positive rate",
           ylabel="true-positive rate")
    ax.set_title(textwrap.fill(f"Membership inference after round {int(mem['round'][-1]) + 1}: {title}", 70), fontsize=7)
    ax.legend(fontsize=7, loc="lower right")
    return fig


# --------------------------------------------------------------------------- TensorBoard

# /rounds field -> the group of its TensorBoard tag "<group>/<field>" (e.g. "time/wall_s");
# a field not listed (added later) goes under "rounds/". The round index is the step.
TENSORBOARD_GROUPS = {
    "test_accuracy": "eval", "test_loss": "eval", "train_loss": "train", "update_norm": "train", "cohort_size": "train",
    "byzantine_in_cohort": "byzantine", "byzantine_selected": "byzantine", "nonfinite_updates": "byzantine",
    "backdoor_accuracy": "byzantine", "epsilon": "privacy",
    "epsilon_median": "privacy", "delta": "privacy", "noise_multiplier": "privacy", "clip_norm": "privacy",
    "clipped_fraction": "privacy", "wall_s": "time", "train_s": "time", "comm_s": "time", "aggregate_s": "time",
    "eval_s": "time",
}


def _run_names(runs: list[RunResults]) -> list[str]:
    """A run directory name per file: its base name, made unique with its position."""
    names = [os.path.splitext(os.path.basename(run.path))[0] for run in runs]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def _hparam_value(value: Any):
    """A config value as what TensorBoard's hparams hold: a number, a bool or a string."""
    if isinstance(value, bool) or isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) or value is None else str(value)


def export_tensorboard(runs: list[RunResults], directory: str) -> list[str]:
    """Write each run's /rounds as TensorBoard scalars into ``directory/<file name>``:
    one point per round (step = the round index) per metric, NaN points (a metric that
    does not apply, a round not evaluated) left out; the flattened config as the run's
    hyperparameters (HParams dashboard), with the final test accuracy as its metric.
    Wall times are the file's (its start time plus the rounds' wall_s), so the events
    are the same on every export. Returns the run directories written.

    Uses tensorboard's own event-file writer and protocol buffers (no TensorFlow)."""
    try:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        raise ResultsError("--tensorboard needs the tensorboard package: pip install 'fedmpi[tensorboard]'") from None
    names, written = _run_names(runs), []
    for name in names:  # refuse before writing anything
        logdir = os.path.join(directory, name)
        if os.path.isdir(logdir) and any(f.startswith("events.out.tfevents") for f in os.listdir(logdir)):
            raise ResultsError(f"{logdir}: already holds TensorBoard events (of an earlier export?); remove it or "
                               "give another --tensorboard directory")
    for run, name in zip(runs, names):
        logdir = os.path.join(directory, name)
        start = float(calendar.timegm(time.strptime(run.attrs["start_time"], "%Y-%m-%dT%H:%M:%SZ")))
        rounds = run.rounds
        wall = start + rounds["wall_s"].fillna(0).cumsum().to_numpy() if "wall_s" in rounds else np.full(len(rounds), start)
        writer = EventFileWriter(logdir)
        hparams = {key: _hparam_value(value) for key, value in sorted(flatten(run.config).items())
                   if key not in IGNORED_KEYS}
        fields = {field: f"{TENSORBOARD_GROUPS.get(field, 'rounds')}/{field}" for field in rounds if field != "round"}
        tags = [tag for field, tag in fields.items() if np.isfinite(rounds[field]).any()]
        kinds = {bool: api_pb2.DATA_TYPE_BOOL, int: api_pb2.DATA_TYPE_FLOAT64, float: api_pb2.DATA_TYPE_FLOAT64,
                 str: api_pb2.DATA_TYPE_STRING}
        experiment = plugin_data_pb2.HParamsPluginData(experiment=api_pb2.Experiment(
            hparam_infos=[api_pb2.HParamInfo(name=key, type=kinds[type(value)]) for key, value in hparams.items()],
            metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in tags]))
        session = plugin_data_pb2.HParamsPluginData(session_start_info=plugin_data_pb2.SessionStartInfo(
            group_name=name, start_time_secs=start))
        for key, value in hparams.items():
            field = "bool_value" if isinstance(value, bool) else "number_value" if isinstance(value, (int, float)) \
                else "string_value"
            setattr(session.session_start_info.hparams[key], field, value)
        for tag, data in ((metadata.EXPERIMENT_TAG, experiment), (metadata.SESSION_START_INFO_TAG, session)):
            event = Event(wall_time=start, step=0)
            event.summary.value.add(tag=tag, metadata=metadata.create_summary_metadata(data))
            writer.add_event(event)
        for field, tag in fields.items():
            for step, value, when in zip(rounds["round"], rounds[field], wall):
                if np.isfinite(value):
                    event = Event(wall_time=float(when), step=int(step))
                    event.summary.value.add(tag=tag, simple_value=float(value))
                    writer.add_event(event)
        if run.finished:
            end = plugin_data_pb2.HParamsPluginData(session_end_info=plugin_data_pb2.SessionEndInfo(
                status=api_pb2.STATUS_SUCCESS, end_time_secs=float(wall[-1]) if len(wall) else start))
            event = Event(wall_time=float(wall[-1]) if len(wall) else start, step=len(rounds))
            event.summary.value.add(tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end))
            writer.add_event(event)
        writer.close()
        written.append(logdir)
    return written


# --------------------------------------------------------------------------- robustness


def rule_label(config: dict) -> str:
    """A run's defence as one name: its pre-aggregation steps, then its rule
    (``nnm + krum``)."""
    g = config.get("aggregator") or {}
    return " + ".join([*(step["name"] for step in g.get("pre") or []), g.get("name", "fedavg")])


def robustness_records(runs: list[RunResults]):
    """One row per run: ``setting`` (the differing config keys other than the seed, the
    rule and the attack), ``rule``, ``attack``, ``seed``, final test accuracy,
    final backdoor accuracy, and whether the run diverged (its last evaluated accuracy
    is then the NaN model's, and the cell is marked)."""
    import pandas as pd

    own = ("seed", "aggregator.", "attack.")
    keys = [k for k in differing_keys(runs) if not k.startswith(own)]
    rows = []
    for run in runs:
        flat = flatten(run.config)
        numbers = summarise(run)
        rows.append({"setting": ", ".join(f"{k}={_fmt(flat.get(k))}" for k in keys), "rule": rule_label(run.config),
                     "attack": (run.config.get("attack") or {}).get("name", "none"), "seed": flat.get("seed"),
                     "final_accuracy": numbers["final_accuracy"], "backdoor_accuracy": numbers["backdoor_accuracy"],
                     "diverged": run.exit_status == EXIT_DIVERGED})
    return pd.DataFrame(rows)


def _cell(values, diverged=None) -> str:
    values = np.asarray(values, dtype=float)
    if not len(values) or np.isnan(values).all():
        return "-"
    text = f"{np.nanmean(values):.2f}" + (f"±{np.nanstd(values, ddof=1):.2f}" if len(values) > 1 else "")
    return text + ("†" if diverged is not None and np.any(diverged) else "")


def robustness_tables(records) -> tuple[dict, str]:
    """Per setting, the rules x attacks table of final accuracy (mean±std over seeds,
    and the worst attack per rule by mean), as {setting: (rules, attacks, means)} for
    the heatmap, and the Markdown text of every table, with the backdoor table (attack
    success rate and clean accuracy per rule) where the sweep has a backdoor."""
    rules = list(dict.fromkeys(records["rule"]))
    attacks = list(dict.fromkeys(records["attack"]))
    grids, text = {}, []
    for setting, part in records.groupby("setting", sort=False):
        means = np.full((len(rules), len(attacks)), np.nan)
        lines = [f"**{setting or 'all runs'}**: final test accuracy, mean±std over seeds († a seed diverged)", "",
                 "| rule | " + " | ".join(attacks) + " | worst |", "| --- " * (len(attacks) + 2) + "|"]
        for i, rule in enumerate(rules):
            cells = []
            for j, attack in enumerate(attacks):
                runs = part[(part["rule"] == rule) & (part["attack"] == attack)]
                if len(runs):
                    means[i, j] = runs["final_accuracy"].mean()
                cells.append(_cell(runs["final_accuracy"], runs["diverged"]))
            worst = int(np.nanargmin(means[i])) if np.isfinite(means[i]).any() else None
            cells.append("-" if worst is None else f"{means[i, worst]:.2f} ({attacks[worst]})")
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        grids[setting] = (rules, attacks, means)
        text += [*lines, ""]
        backdoor = part[part["attack"] == "backdoor"]
        if len(backdoor):
            text += [f"**{setting or 'all runs'}**: backdoor (model replacement), mean±std over seeds", "",
                     "| rule | attack success rate | clean accuracy | accuracy without attack |", "| --- " * 4 + "|"]
            for rule in rules:
                runs = backdoor[backdoor["rule"] == rule]
                clean = part[(part["rule"] == rule) & (part["attack"] == "none")]
                text.append(f"| {rule} | {_cell(runs['backdoor_accuracy'])} | {_cell(runs['final_accuracy'], runs['diverged'])} "
                            f"| {_cell(clean['final_accuracy'])} |")
            text.append("")
    return grids, "\n".join(text)


def robustness_heatmap(grids: dict, path: str) -> list[str]:
    """The rules x attacks mean accuracy of every setting, one panel each, with the worst
    attack per rule as a last column; written as ``path``.png and ``path``.pdf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(grids.items())
    rules, attacks, _ = panels[0][1]
    fig, axes = plt.subplots(len(panels), 1, figsize=(1.0 + 0.62 * (len(attacks) + 1), 0.8 + 0.36 * len(rules) * len(panels)),
                             squeeze=False)
    for ax, (setting, (rules, attacks, means)) in zip(axes[:, 0], panels):
        worst = np.array([np.nanmin(row) if np.isfinite(row).any() else np.nan for row in means])
        shown = np.column_stack([means, worst])
        image = ax.imshow(shown, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for (i, j), value in np.ndenumerate(shown):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6.5)
        ax.set_xticks(range(len(attacks) + 1), [*attacks, "worst"], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rules)), rules, fontsize=8)
        ax.axvline(len(attacks) - 0.5, color="black", linewidth=1)
        ax.set_title(f"final test accuracy: {setting or 'all runs'}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    written = []
    for fmt in ("png", "pdf"):
        fig.savefig(f"{path}.{fmt}", dpi=130, bbox_inches="tight")
        written.append(f"{path}.{fmt}")
    plt.close(fig)
    return written


# --------------------------------------------------------------------------- follow


def follow(path: str, poll_s: float = 0.2, timeout_s: float | None = None, out=sys.stdout) -> int:
    """Print each new round of a run as it is written; return when the run has
    finished (or after ``timeout_s`` without a new round). Returns rounds printed."""
    follower = RoundFollower(path, poll_s, timeout_s)
    print(f"following {path}", file=out, flush=True)
    for row in follower:
        print(progress_line(row), file=out, flush=True)
    if follower.finished and follower.exit_status > 0:
        print(f"stopped: {follower.seen} rounds (exit status {follower.exit_status})", file=out, flush=True)
    elif follower.finished:
        print(f"finished: {follower.seen} rounds", file=out, flush=True)
    else:
        print(f"no new round for {timeout_s:g} s; stopping ({follower.seen} rounds)", file=out, flush=True)
    return follower.seen


# --------------------------------------------------------------------------- command line


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmpi.analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="FILE_OR_DIR", help="results files, or directories of them")
    parser.add_argument("--csv", metavar="PATH", help="also write the summary table as CSV")
    parser.add_argument("--plot", metavar="DIR", help="write plots into DIR")
    parser.add_argument("--format", choices=("png", "pdf"), default="png", help="plot file format")
    parser.add_argument("--no-group", action="store_true", help="one row per run even when runs differ only in seed")
    parser.add_argument("--tensorboard", metavar="DIR", help="write the per-round metrics as TensorBoard event files "
                        "into DIR, one run per file (needs the tensorboard extra)")
    parser.add_argument("--follow", metavar="FILE", help="print rounds of a run as they are written, until it ends")
    parser.add_argument("--timeout", type=float, help="with --follow: stop after this many seconds without a new round")
    parser.add_argument("--robustness", metavar="DIR", help="write the rules x attacks tables (robustness.md, "
                        "robustness.csv) and heatmap (robustness.png, .pdf) of a robustness sweep into DIR")
    args = parser.parse_args(argv)
    try:
        if args.follow:
            follow(args.follow, timeout_s=args.timeout)
            return EXIT_OK
        if not args.paths:
            parser.error("give results files or directories (or --follow FILE)")
        runs = [load(path) for path in find_files(args.paths)]
        if args.robustness:
            os.makedirs(args.robustness, exist_ok=True)
            records = robustness_records(runs)
            grids, text = robustness_tables(records)
            print(text)
            with open(os.path.join(args.robustness, "robustness.md"), "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
            records.to_csv(os.path.join(args.robustness, "robustness.csv"), index=False)
            for path in robustness_heatmap(grids, os.path.join(args.robustness, "robustness")):
                print(f"wrote {path}")
            return EXIT_OK
        table = summary_table(runs, group=not args.no_group)
        print(format_table(table))
        if args.csv:
            table.to_csv(args.csv, index=False)
        if args.plot:
            for path in make_plots(runs, args.plot, args.format):
                print(f"wrote {path}")
        if args.tensorboard:
            for path in export_tensorboard(runs, args.tensorboard):
                print(f"wrote {path} (tensorboard --logdir {args.tensorboard})")
    except ResultsError as exc:
        print(f"fedmpi: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
