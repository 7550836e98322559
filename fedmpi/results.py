"""The HDF5 results file: its schema, the writer (rank 0 only) and readers.

One file per run, documented field by field in docs/results.md. Every object
is created when the run starts; then the file switches to HDF5's single-writer
/ multiple-reader (SWMR) mode, appends one row per round and flushes. A reader
can follow the run while it is written, and a killed job leaves a consistent
file holding every round that finished (open it with ``swmr=True``, as
:func:`open_results` does, because a killed writer leaves the file marked as
open for writing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from . import __version__
from .protocol import EXIT_DIVERGED

# name: (dtype, description). Floats that do not apply to a run are NaN.
ROUND_FIELDS = {
    "round": ("i8", "round index, 0-based"),
    "cohort_size": ("i8", "clients sampled this round"),
    "test_accuracy": ("f8", "accuracy of the new global model on the test set (NaN when not evaluated this round)"),
    "test_loss": ("f8", "mean cross-entropy of the new global model on the test set (NaN when not evaluated)"),
    "train_loss": ("f8", "mean local training loss of the cohort, weighted by client samples"),
    "update_norm": ("f8", "L2 norm of the aggregated update applied by the server optimizer"),
    "byzantine_in_cohort": ("i8", "Byzantine clients in this round's cohort"),
    "byzantine_selected": ("i8", "Byzantine updates the aggregator used (see /clients/selected)"),
    "epsilon": ("f8", "privacy spent so far (RDP; sample-level DP: the max over clients)"),
    "epsilon_median": ("f8", "sample-level and local DP: median over all clients of their epsilon"),
    "delta": ("f8", "the delta epsilon is computed for"),
    "noise_multiplier": ("f8", "sigma (sample-level) or z (client-level)"),
    "clip_norm": ("f8", "C (per-example clip) or S (update clip)"),
    "clipped_fraction": ("f8", "share of per-example gradients (sample) or client updates (client modes) that were clipped"),
    "wall_s": ("f8", "wall-clock seconds of the whole round on rank 0"),
    "train_s": ("f8", "seconds the slowest rank spent training its clients"),
    "comm_s": ("f8", "seconds of broadcast and gather not spent training (wait + transfer)"),
    "aggregate_s": ("f8", "seconds rank 0 spent aggregating and stepping the server optimizer"),
    "eval_s": ("f8", "seconds rank 0 spent evaluating"),
    "nonfinite_updates": ("i8", "updates that held a NaN or infinite value: excluded before aggregation, counted against f"),
    "aggregation_skipped": ("bool", "too few finite updates for the rule's requirement: the model was left unchanged"),
    "backdoor_accuracy": ("f8", "backdoor attack: share of the triggered test set classified as the target (NaN otherwise)"),
}

CLIENT_FIELDS = {
    "round": ("i8", "round of this record"),
    "slot": ("i8", "position in the round's cohort (row of the aggregated array)"),
    "client_id": ("i8", "virtual client id, 0..clients.total-1"),
    "num_samples": ("i8", "training samples the client holds (its FedAvg weight)"),
    "update_norm": ("f8", "L2 norm of the update the server received from this slot (float64)"),
    "train_loss": ("f8", "mean minibatch loss over the client's local training"),
    "steps": ("i8", "local SGD steps taken"),
    "train_s": ("f8", "seconds the client's local training took"),
    "byzantine": ("bool", "the client is one of the run's Byzantine clients"),
    "selected": ("bool", "the aggregate used this slot's update (after pre-aggregation, through the rows it went into)"),
    "score": ("f8", "the aggregator's score for the slot (Krum score, kept fraction, weight...); NaN where the rule has none"),
    "clipped_fraction": ("f8", "DP: share of this client's per-example gradients clipped (sample), or 1/0 for its update"),
    "finite": ("bool", "every value of the update was finite; if not, it was excluded (selected false, score +inf)"),
    "dropped": ("i1", "0: the update reached the aggregator; why it did not: 1 dropped out, 2 missed the deadline, "
                      "3 partial work discarded"),
}


RoundRecord = dataclasses.make_dataclass(
    "RoundRecord", [(name, Any) for name in ROUND_FIELDS], frozen=True,
    namespace={"__doc__": "One row of /rounds: every field of ROUND_FIELDS, no more, no less."})

ClientRecords = dataclasses.make_dataclass(
    "ClientRecords", [(name, Any) for name in CLIENT_FIELDS], frozen=True,
    namespace={"__doc__": "One round's rows of /clients, one array per field of CLIENT_FIELDS (one entry per slot)."})


def progress_line(row: Mapping, rounds: int | None = None) -> str:
    """The one-line view of a round (a RoundRecord's fields or a row read back), as
    the run prints it and ``analyze --follow`` shows it; ``rounds``: the run's total."""
    index = int(row["round"]) + 1
    where = f"{index:>{len(str(rounds))}}/{rounds}" if rounds else f"{index}"
    acc = (f"acc {row['test_accuracy']:.4f}  loss {row['test_loss']:.4f}" if np.isfinite(row["test_accuracy"])
           else "acc    -    loss    -   ")
    eps = f"  eps {row['epsilon']:.3g}" if np.isfinite(row["epsilon"]) else ""
    backdoor = row.get("backdoor_accuracy", np.nan)
    extra = f"  backdoor {backdoor:.4f}" if np.isfinite(backdoor) else ""
    if row.get("nonfinite_updates", 0):
        extra += f"  nonfinite {int(row['nonfinite_updates'])}" + (" (skipped)" if row.get("aggregation_skipped") else "")
    return f"round {where}  {acc}  train_loss {row['train_loss']:.4f}{eps}{extra}  {row['wall_s']:.2f} s"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A dataset beyond the fixed schema (e.g. under /audit), created with the file:
    HDF5's SWMR mode allows no new objects once the run writes rounds. ``growable``:
    the first axis grows by :meth:`ResultsWriter.append_rows` (its initial length is
    ``shape[0]``, usually 0); otherwise it is written whole by :meth:`ResultsWriter.write`."""

    shape: tuple
    dtype: str
    description: str
    growable: bool = False


def default_path() -> str:
    return os.path.join("results", time.strftime("run-%Y%m%d-%H%M%S.h5", time.gmtime()))


class ResultsWriter:
    """Creates the results file, appends rounds, writes the final model. Rank 0 only."""

    def __init__(self, path: str, *, config_yaml: str, world_size: int, seed: int, layout: list,
                 overwrite: bool = False, snapshot_every: int = 0, attrs: dict | None = None,
                 state_spec: dict | None = None, history: dict | None = None,
                 extra: dict[str, DatasetSpec] | None = None, clients=None):
        """``state_spec``: {name: (shape, dtype)} of the server state a checkpoint holds.
        ``history``: rows of an earlier session to copy in (resume), as returned by
        :func:`read_checkpoint`. ``extra``: {path: DatasetSpec} of datasets beyond the
        fixed schema, created now (filled with NaN where the dtype allows). ``clients``:
        the clients' state (a :class:`fedmpi.client_state.ClientStateStore`), which every
        checkpoint then holds too."""
        import h5py

        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self.path = path
        self.f = f = h5py.File(path, "w" if overwrite else "w-", libver="latest")
        f.attrs["fedmpi_version"] = __version__
        f.attrs["config"] = config_yaml
        f.attrs["world_size"] = world_size
        f.attrs["seed"] = seed
        f.attrs["start_time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        for group, fields, chunk in (("rounds", ROUND_FIELDS, 256), ("clients", CLIENT_FIELDS, 4096)):
            for name, (dtype, doc) in fields.items():
                ds = f.create_dataset(f"{group}/{name}", shape=(0,), maxshape=(None,), dtype=dtype, chunks=(chunk,))
                ds.attrs["description"] = doc
        size = sum(spec["numel"] for spec in layout)
        model = f.create_group("model")
        model.attrs["layout"] = json.dumps(layout)
        model.attrs["num_params"] = size
        model.create_dataset("final", shape=(size,), dtype="f4", fillvalue=np.nan)
        model.create_dataset("final_round", data=np.int64(-1))
        self.snapshot_every = snapshot_every
        if snapshot_every:
            chunk_rows = max(1, min(64, (1 << 22) // max(1, 4 * size)))
            model.create_dataset("snapshots", shape=(0, size), maxshape=(None, size), dtype="f4",
                                 chunks=(chunk_rows, size))
            model.create_dataset("snapshot_round", shape=(0,), maxshape=(None,), dtype="i8", chunks=(256,))
        for name in ("epsilon", "epsilon_median"):
            f.create_dataset(f"privacy/{name}", data=np.float64(np.nan))
        f.create_dataset("privacy/accountant", data=np.bytes_(""), dtype="S8")
        f.create_dataset("run/finished", data=np.int8(0))
        f.create_dataset("run/exit_status", data=np.int64(-1))
        f.create_dataset("run/wall_s", data=np.float64(np.nan))
        # two checkpoint slots: write the idle one, then point /checkpoint/current at it
        self.state_spec = dict(state_spec or {})
        for slot in (0, 1):
            f.create_dataset(f"checkpoint/slot{slot}/weights", shape=(size,), dtype="f4")
            for name, (shape, dtype) in self.state_spec.items():
                f.create_dataset(f"checkpoint/slot{slot}/{name}", shape=shape, dtype=dtype)
        self.clients = clients
        if clients is not None:
            for slot in (0, 1):
                self._create_client_state(f.create_group(f"checkpoint/slot{slot}/clients"), clients)
        f.create_dataset("checkpoint/current", data=np.array([-1, -1], dtype=np.int64))
        f["checkpoint"].attrs["description"] = "current = [slot, round]: slot<k> holds the state after that round"
        for name, spec in (extra or {}).items():
            fill = np.nan if np.dtype(spec.dtype).kind == "f" else None
            chunks = (max(1, min(1024, (1 << 20) // max(1, np.dtype(spec.dtype).itemsize * int(np.prod(spec.shape[1:]))))),
                      *spec.shape[1:]) if spec.growable else None
            ds = f.create_dataset(name, shape=spec.shape, dtype=spec.dtype, fillvalue=fill, chunks=chunks,
                                  maxshape=(None, *spec.shape[1:]) if spec.growable else None)
            ds.attrs["description"] = spec.description
        if history:
            self._copy_history(history)
        f.swmr_mode = True
        self._start = time.perf_counter()

    def _copy_history(self, history: dict) -> None:
        for group in ("rounds", "clients"):
            for name, values in history[group].items():
                if name in self.f[group]:
                    self._append(self.f[group][name], values)
        if self.snapshot_every and len(history.get("snapshot_round", [])):
            self._append(self.f["model/snapshots"], history["snapshots"])
            self._append(self.f["model/snapshot_round"], history["snapshot_round"])
        for name, values in history.get("extra", {}).items():
            if name in self.f and self.f[name].maxshape[0] is None:
                self._append(self.f[name], values)
        if history.get("checkpoint") is not None:
            round_index, weights, state = history["checkpoint"]
            self.checkpoint(round_index, weights, state)

    @staticmethod
    def _create_client_state(group, clients) -> None:
        """Per slot: every client's rows, chunked by client so that rows never written take
        no space; ``last_round`` per client; ``round``: the round the rows hold (-1: none
        yet, -2: being written)."""
        total, size = clients.last_round.shape[0], clients.size
        per_chunk = max(1, min(total, (1 << 18) // max(1, 4 * size)))
        for name in clients.arrays:
            group.create_dataset(name, shape=(total, size), dtype="f4", chunks=(per_chunk, size))
        group.create_dataset("last_round", shape=(total,), dtype="i8", fillvalue=-1)
        group.create_dataset("round", data=np.int64(-1))

    def _write_client_state(self, group, round_index: int) -> None:
        """Write the rows that changed since this slot was last written (all rows ever
        written when the slot is empty or was left half-written)."""
        store = self.clients
        held = group["round"]
        since = int(held[()])
        held[()] = -2
        self.f.flush()
        ids = store.changed_since(since)
        for name, array in store.arrays.items():
            for block in store.blocks(ids):
                group[name][block] = array[block]
        group["last_round"][:] = store.last_round
        held[()] = round_index

    def checkpoint(self, round_index: int, weights: np.ndarray, state: dict) -> None:
        """Store what a resume needs after ``round_index``, crash-safe: the idle slot
        is written and flushed before /checkpoint/current points at it."""
        current = self.f["checkpoint/current"]
        slot = 1 - int(current[0]) if int(current[0]) in (0, 1) else 0
        group = self.f[f"checkpoint/slot{slot}"]
        group["weights"][:] = weights
        for name in self.state_spec:
            group[name][...] = state[name]
        if self.clients is not None:
            self._write_client_state(group["clients"], round_index)
        self.f.flush()
        current[:] = np.array([slot, round_index], dtype=np.int64)
        self.f.flush()

    @staticmethod
    def _append(ds, values) -> None:
        values = np.asarray(values)
        n = ds.shape[0]
        ds.resize((n + values.shape[0],) + ds.shape[1:])
        ds[n:] = values

    def append_round(self, round_record: RoundRecord, client_records: ClientRecords) -> None:
        """One row of /rounds and one row per cohort slot of /clients; then flush."""
        for name in ROUND_FIELDS:
            self._append(self.f["rounds"][name], [getattr(round_record, name)])
        for name in CLIENT_FIELDS:
            self._append(self.f["clients"][name], getattr(client_records, name))
        self.f.flush()

    def append_rows(self, name: str, values) -> None:
        """Append rows to a growable extra dataset; then flush."""
        self._append(self.f[name], values)
        self.f.flush()

    def write(self, name: str, values) -> None:
        """Write a fixed-shape extra dataset whole; then flush."""
        self.f[name][...] = values
        self.f.flush()

    def snapshot(self, round_index: int, weights: np.ndarray) -> None:
        self._append(self.f["model/snapshots"], weights[None, :])
        self._append(self.f["model/snapshot_round"], [round_index])
        self.f.flush()

    def finish(self, round_index: int, weights: np.ndarray, privacy: dict | None = None) -> None:
        for name, value in (privacy or {}).items():
            self.f["privacy"][name][()] = np.bytes_(value) if isinstance(value, str) else value
        self.f["model/final"][:] = weights
        self.f["model/final_round"][()] = round_index
        self.f["run/wall_s"][()] = time.perf_counter() - self._start
        self.f["run/finished"][()] = 1
        self.f["run/exit_status"][()] = 0
        self.f.flush()

    def stopped(self, status: int) -> None:
        """The run stopped before its last round with exit ``status`` (checkpointed
        after a signal, or diverged)."""
        self.f["run/exit_status"][()] = status
        self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None


def open_results(path: str):
    """Open a results file for reading: finished, still being written, or left by a killed job."""
    import h5py

    return h5py.File(path, "r", libver="latest", swmr=True)


def read_checkpoint(path: str) -> dict:
    """What resuming ``path`` needs: its config and attributes, the rows up to the
    last checkpoint, and the checkpoint itself (None when none was written)."""
    with open_checked(path) as f:
        current = f["checkpoint/current"]
        current.refresh()
        slot, round_index = (int(v) for v in current[:])
        rounds, clients = f["rounds"], f["clients"]
        for ds in list(rounds.values()) + list(clients.values()):
            ds.refresh()
        keep_rounds = int(np.searchsorted(rounds["round"][:], round_index, side="right")) if round_index >= 0 else 0
        client_rounds = clients["round"][:]
        keep_clients = int(np.searchsorted(client_rounds, round_index, side="right")) if round_index >= 0 else 0
        history = {
            "rounds": {name: ds[:keep_rounds] for name, ds in rounds.items()},
            "clients": {name: ds[:keep_clients] for name, ds in clients.items()},
            "checkpoint": None,
        }
        if "snapshots" in f["model"]:
            f["model/snapshot_round"].refresh()
            f["model/snapshots"].refresh()
            snap_rounds = f["model/snapshot_round"][:]
            keep = snap_rounds <= round_index
            history["snapshot_round"] = snap_rounds[keep]
            history["snapshots"] = f["model/snapshots"][: int(keep.sum())]
        history["extra"] = _extra_history(f, round_index)
        if round_index >= 0:
            group = f[f"checkpoint/slot{slot}"]
            state = {}  # the clients' state (slot<k>/clients) can be large: ServerLoop.load_client_state reads it
            group.visititems(lambda name, obj: state.__setitem__(name, obj[()])
                             if hasattr(obj, "shape") and not name.startswith("clients/") else None)
            weights = state.pop("weights")
            history["checkpoint"] = (round_index, weights, state)
        f["run/finished"].refresh()
        return {"config": f.attrs["config"], "attrs": dict(f.attrs), "finished": bool(f["run/finished"][()]),
                "round": round_index, "slot": slot, "history": history}


def _extra_history(f, round_index: int) -> dict:
    """Per-round rows of datasets beyond the schema, up to ``round_index``: every growable
    dataset under /audit whose group holds a growable 1-D ``round`` dataset (the round of
    each row, appended in round order) is cut to the rows of rounds <= ``round_index``."""
    import h5py

    groups = [f["audit"]] if "audit" in f else []
    if groups:
        f["audit"].visititems(lambda name, obj: groups.append(obj) if isinstance(obj, h5py.Group) else None)
    history = {}
    for group in groups:
        rounds = group.get("round")
        if not isinstance(rounds, h5py.Dataset) or rounds.ndim != 1 or rounds.maxshape[0] is not None:
            continue
        rounds.refresh()
        keep = int(np.searchsorted(rounds[:], round_index, side="right"))
        for ds in group.values():
            if isinstance(ds, h5py.Dataset) and ds.ndim and ds.maxshape[0] is None:
                ds.refresh()
                history[ds.name] = ds[:keep]
    return history


class ResultsError(ValueError):
    """A file that is not a readable fedmpi results file; ``str()`` names the file."""


def open_checked(path: str):
    """:func:`open_results`, turning every way a file can be unusable into one ResultsError line."""
    import h5py

    if not os.path.exists(path):
        raise ResultsError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ResultsError(f"{path}: is a directory")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise ResultsError(f"{path}: cannot be read ({exc})") from None
    if not is_hdf5:
        raise ResultsError(f"{path}: not an HDF5 file")
    _check_not_truncated(path)
    try:
        f = open_results(path)
    except OSError as exc:
        detail = " ".join(str(exc).split())
        raise ResultsError(f"{path}: HDF5 file cannot be opened, truncated or corrupt? ({detail})") from None
    if "fedmpi_version" not in f.attrs or "rounds" not in f:
        f.close()
        raise ResultsError(f"{path}: HDF5 file but not fedmpi results (no fedmpi_version attribute or /rounds group)")
    return f


def _check_not_truncated(path: str) -> None:
    """Compare the file size with the end-of-file address in a version 2/3 superblock
    (what libver="latest" writes). SWMR readers skip that check and would wait on
    the missing bytes; a writer grows the file before it records a larger EOF."""
    with open(path, "rb") as fh:
        head = fh.read(48)
    if len(head) < 12 or head[:8] != b"\x89HDF\r\n\x1a\n" or head[8] not in (2, 3):
        return
    size_of_offsets = head[9]
    start = 12 + 2 * size_of_offsets
    if len(head) < start + size_of_offsets:
        raise ResultsError(f"{path}: truncated HDF5 file (superblock incomplete)")
    stored_eof = int.from_bytes(head[start:start + size_of_offsets], "little")
    actual = os.path.getsize(path)
    if actual < stored_eof:
        raise ResultsError(f"{path}: truncated HDF5 file ({actual} bytes, its superblock says {stored_eof})")


def _table(group, fields: dict):
    """The group's 1-D datasets as a DataFrame, cut to the length all of them have
    (a writer may be between the resizes of one row)."""
    import pandas as pd

    names = [n for n in fields if n in group]
    for name in names:
        group[name].refresh()
    length = min((group[n].shape[0] for n in names), default=0)
    return pd.DataFrame({n: group[n][:length] for n in names})


class RunResults:
    """One run's results, as :func:`load` returns them.

    ``config``: the resolved config (dict); ``attrs``: root attributes;
    ``rounds``: DataFrame, one row per finished round; ``clients``: DataFrame,
    one row per round and cohort slot; ``final_model``: the last global weights
    the file holds (``/model/final`` once the run finished, else the latest
    snapshot or checkpoint, else None) and ``final_model_round`` its round;
    ``finished``; ``privacy``: the final epsilon record (empty without DP);
    ``exit_status``: /run/exit_status (-1 while running or after a kill).
    """

    def __init__(self, path, config, attrs, rounds, clients, final_model, final_model_round, finished, privacy, layout,
                 exit_status=-1):
        self.path, self.config, self.attrs = path, config, attrs
        self.rounds, self.clients = rounds, clients
        self.final_model, self.final_model_round = final_model, final_model_round
        self.finished, self.privacy, self.layout = finished, privacy, layout
        self.exit_status = exit_status

    def __repr__(self) -> str:
        return (f"RunResults({self.path!r}, rounds={len(self.rounds)}, clients={len(self.clients)}, "
                f"finished={self.finished})")


def load(path: str) -> RunResults:
    """Read a results file: finished, still being written, or left by a killed job."""
    import yaml

    with open_checked(path) as f:
        try:
            config = yaml.safe_load(f.attrs["config"]) or {}
            attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items() if k != "config"}
            rounds = _table(f["rounds"], ROUND_FIELDS)
            clients = _table(f["clients"], CLIENT_FIELDS)
            model = f["model"]
            layout = json.loads(model.attrs["layout"])
            for name in ("final", "final_round"):
                model[name].refresh()
            final_round = int(model["final_round"][()])
            final, final_at = None, None
            if final_round >= 0:
                final, final_at = model["final"][:], final_round
            else:
                for group, weights, at in (("checkpoint", "weights", "round"), ("model", "snapshots", "snapshot_round")):
                    if group in f and weights in f[group]:
                        f[group][weights].refresh()
                        f[group][at].refresh()
                        ds, rounds_ds = f[group][weights], f[group][at]
                        if ds.ndim == 2 and ds.shape[0] and (final_at is None or rounds_ds[-1] > final_at):
                            final, final_at = ds[-1], int(rounds_ds[-1])
                        elif ds.ndim == 1 and int(rounds_ds[()]) >= 0 and (final_at is None or rounds_ds[()] > final_at):
                            final, final_at = ds[:], int(rounds_ds[()])
            f["run/finished"].refresh()
            finished = bool(f["run/finished"][()])
            status = exit_status(f)
            privacy = {}
            if "privacy" in f and f.attrs.get("dp_mode", "none") != "none":
                for name in ("epsilon", "epsilon_median", "accountant"):
                    if name not in f["privacy"]:
                        continue
                    f["privacy"][name].refresh()
                    value = f["privacy"][name][()]
                    privacy[name] = value.decode() if isinstance(value, bytes) else float(value)
        except (KeyError, OSError, ValueError) as exc:
            raise ResultsError(f"{path}: fedmpi results file is incomplete or damaged ({type(exc).__name__}: {exc})") from None
    return RunResults(path, config, attrs, rounds, clients, final, final_at, finished, privacy, layout, status)


# --------------------------------------------------------------------------- what other commands ask of a file


def status(path: str) -> tuple[str, int]:
    """("pending" | "partial" | "done" | "diverged", rounds in the file): no file yet, a
    run that has not finished (or a damaged file: ``--resume`` says what is wrong), a
    finished run, a run that stopped because it diverged (resuming it would diverge
    again)."""
    if not os.path.exists(path):
        return "pending", 0
    try:
        with open_checked(path) as f:
            f["run/finished"].refresh()
            f["rounds/round"].refresh()
            rounds = int(f["rounds/round"].shape[0])
            if f["run/finished"][()]:
                return "done", rounds
            return ("diverged" if exit_status(f) == EXIT_DIVERGED else "partial"), rounds
    except ResultsError:
        return "partial", 0


def exit_status(f) -> int:
    """/run/exit_status of an open results file (-1: running, killed, or written before
    the dataset existed)."""
    if "exit_status" not in f["run"]:
        return -1
    f["run/exit_status"].refresh()
    return int(f["run/exit_status"][()])


def run_info(path: str) -> dict:
    """What deciding on a resume needs, cheaply: ``config`` (YAML text), ``attrs`` (root
    attributes), ``finished``, ``exit_status``. Raises ResultsError for a file that
    cannot be used."""
    with open_checked(path) as f:
        f["run/finished"].refresh()
        return {"config": f.attrs["config"], "attrs": dict(f.attrs), "finished": bool(f["run/finished"][()]),
                "exit_status": exit_status(f)}


class RoundFollower:
    """Iterate over the rows of /rounds (dicts of ROUND_FIELDS) as a run writes them.

    Waits for the file to appear and become readable; the iteration ends when the
    run has finished or stopped early (checkpointed after a signal, diverged: see
    :attr:`exit_status`) and every row was seen (:attr:`finished` is then True), or
    after ``timeout_s`` seconds without a new row. Raises ResultsError for a file
    that is not fedmpi results or never becomes readable within ``timeout_s``."""

    def __init__(self, path: str, poll_s: float = 0.2, timeout_s: float | None = None):
        self.path, self.poll_s, self.timeout_s = path, poll_s, timeout_s
        self.finished = False
        self.exit_status = -1
        self.seen = 0

    def _open(self):
        import h5py

        start = time.monotonic()
        while True:
            problem = "no results file appeared"
            if os.path.exists(self.path):
                try:
                    _check_not_truncated(self.path)  # also true while the writer is still creating the file
                    f = h5py.File(self.path, "r", libver="latest", swmr=True)
                except (OSError, ResultsError) as exc:
                    problem = f"the file did not become readable ({exc})"  # not in SWMR mode yet
                else:
                    if "rounds" not in f or "fedmpi_version" not in f.attrs:
                        f.close()
                        raise ResultsError(f"{self.path}: HDF5 file but not fedmpi results")
                    return f
            if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                raise ResultsError(f"{self.path}: {problem} within {self.timeout_s:g} s")
            time.sleep(self.poll_s)

    def __iter__(self) -> Iterator[dict]:
        f = self._open()
        try:
            rounds = f["rounds"]
            names = [name for name in ROUND_FIELDS if name in rounds]  # a file written before a field existed
            last_progress = time.monotonic()
            while True:
                for name in names:
                    rounds[name].refresh()
                f["run/finished"].refresh()
                self.exit_status = exit_status(f)
                finished = bool(f["run/finished"][()]) or self.exit_status >= 0  # done, or stopped early
                available = min(rounds[name].shape[0] for name in names)
                for i in range(self.seen, available):
                    yield {name: rounds[name][i] for name in names}
                    self.seen += 1
                    last_progress = time.monotonic()
                if finished and self.seen >= available:
                    self.finished = True
                    return
                if self.timeout_s is not None and time.monotonic() - last_progress > self.timeout_s:
                    return
                time.sleep(self.poll_s)
        finally:
            f.close()
