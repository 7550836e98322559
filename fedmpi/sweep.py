"""``python -m fedmpi.sweep GRID.yaml [--count | --args INDEX | --run | --in-job [--ranks-per-run G]]``

A sweep is a YAML file::

    config: configs/digits_mlp.yaml   # base config (optional; paths relative to the working directory)
    out: runs/sweep1                  # one directory: manifest.json and run-<index>.h5
    seeds: [0, 1, 2]                  # optional
    set: {rounds: 10}                 # overrides for every run (optional)
    grid:                             # every combination of these
      aggregator.name: [fedavg, krum]
      attack.fraction: [0.1, 0.2]

It expands into a numbered list of runs (grid keys in file order, seeds
innermost), each with its own results file under ``out``; every expanded
config is validated up front. Without options the list is printed with each
run's status (pending, partial: k of N rounds, done) and ``out/manifest.json``
is written, mapping index to overrides and file.

``--args INDEX`` prints the ``fedmpi.run`` arguments for one entry, shell-quoted
on one line (the SLURM array script uses it with ``SLURM_ARRAY_TASK_ID``):
``--config ... --set ... --out FILE`` for a pending run, ``--resume FILE`` for a
partial one; it exits with status 3 for a finished run, which is skipped.
``--run`` runs every entry that has not finished, one after another, under
``--launcher`` (default ``mpirun -n 3``). ``--in-job --ranks-per-run G``, started
once under ``mpirun -n P`` or ``srun``, runs them inside that one job: groups of G
ranks take the entries from the sweep directory (:class:`SweepQueue`) and run them
with warm interpreters (:mod:`fedmpi.injob`). A failed run is listed as ``failed``
with its message until it finishes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid

import yaml

from .config import from_mapping
from .protocol import EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_FINISHED, EXIT_OK
from .results import status
from .schema import ConfigError, apply_override, read_file

GRID_KEYS = ("config", "out", "seeds", "set", "grid")


class SweepError(ValueError):
    pass


def _yaml_value(value) -> str:
    """``value`` as YAML text that --set parses back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    if text.endswith("..."):  # the end-of-document marker YAML adds after a bare scalar
        text = text[:-3].strip()
    return text


def load_grid(path: str) -> dict:
    if not os.path.isfile(path):
        raise SweepError(f"{path}: no such sweep file")
    try:
        with open(path, encoding="utf-8") as fh:
            grid = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(grid, dict):
        raise SweepError(f"{path}: a sweep file holds a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = [k for k in grid if k not in GRID_KEYS]
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(GRID_KEYS)})")
    if "out" not in grid or not isinstance(grid["out"], str):
        raise SweepError(f"{path}: 'out' must name the output directory")
    for key in ("set", "grid"):
        if not isinstance(grid.get(key) or {}, dict):
            raise SweepError(f"{path}: '{key}' must be a mapping of config keys")
    for key, values in (grid.get("grid") or {}).items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{key} must be a non-empty list of values")
    seeds = grid.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(isinstance(s, int) and s >= 0 for s in seeds)):
        raise SweepError(f"{path}: 'seeds' must be a list of non-negative integers")
    return grid


def expand(grid: dict, path: str = "sweep") -> list[dict]:
    """The numbered runs: [{"index", "overrides" (dict key -> value), "out"}], each validated."""
    fixed = dict(grid.get("set") or {})
    axes = list((grid.get("grid") or {}).items())
    seeds = grid.get("seeds")
    base = read_file(grid["config"]) if grid.get("config") else {}
    entries = []
    combos = itertools.product(*[values for _, values in axes]) if axes else [()]
    for combo in combos:
        for seed in (seeds if seeds is not None else [None]):
            overrides = dict(fixed)
            overrides.update({key: value for (key, _), value in zip(axes, combo)})
            if seed is not None:
                overrides["seed"] = seed
            index = len(entries)
            out = os.path.join(grid["out"], f"run-{index:04d}.h5")
            data = yaml.safe_load(yaml.safe_dump(base))
            for key, value in overrides.items():
                apply_override(data, f"{key}={_yaml_value(value)}")
            try:
                from_mapping(data)
            except ConfigError as exc:
                described = ", ".join(f"{k}={_yaml_value(v)}" for k, v in overrides.items())
                raise SweepError(f"{path}: entry {index} ({described}): {exc}") from None
            entries.append({"index": index, "overrides": overrides, "out": out})
    return entries


def run_args(grid: dict, entry: dict) -> list[str] | None:
    """fedmpi.run arguments for ``entry``; None when it has finished."""
    state, _ = status(entry["out"])
    if state in ("done", "diverged"):  # a diverged run ended: resuming it would diverge again
        return None
    if state == "partial":
        return ["--resume", entry["out"]]
    args = ["--config", grid["config"]] if grid.get("config") else []
    for key, value in entry["overrides"].items():
        args += ["--set", f"{key}={_yaml_value(value)}"]
    return [*args, "--out", entry["out"]]


def write_manifest(grid_path: str, grid: dict, entries: list[dict], states: dict | None = None) -> str:
    """``out/manifest.json``: the entries, each with its state (``states``: index ->
    {"state": ..., and "rounds", "error", "group", "hosts", "wall_s" where known}),
    written whole to a temporary file that then replaces the manifest."""
    os.makedirs(grid["out"], exist_ok=True)
    manifest = os.path.join(grid["out"], "manifest.json")
    listed = [{**entry, **(states or {}).get(entry["index"], {})} for entry in entries]
    temporary = f"{manifest}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as fh:
        json.dump({"sweep": grid_path, "config": grid.get("config"), "entries": listed}, fh, indent=2)
        fh.write("\n")
    os.replace(temporary, manifest)
    return manifest


def file_states(entries: list[dict]) -> dict[int, dict]:
    """index -> {"state": pending | partial | done | diverged, "rounds": rounds in the file}."""
    states = {}
    for entry in entries:
        state, rounds = status(entry["out"])
        states[entry["index"]] = {"state": state, "rounds": rounds}
    return states


class SweepQueue:
    """The sweep directory as the queue of an in-job sweep (``--in-job``), shared by the
    groups without any MPI traffic between them, and surviving the job.

    A group takes a run by creating its claim file ``out/in-job/<session>/claim-<index>``
    with O_EXCL (one group wins); each job is a new session, so claims of an earlier,
    killed job do not count, and what is left to do is read from the results files:
    finished runs are skipped, partial ones resumed (``run_args``). What happened to a
    run is one small JSON record, ``out/in-job/run-<index>.json``, replaced whole; the
    manifest is rewritten from the states at the start of the job and this session's
    records after every run (and once more at the end of the job)."""

    def __init__(self, grid_path: str, grid: dict, entries: list[dict]):
        self.grid_path, self.grid, self.entries = grid_path, grid, entries
        self.root = os.path.join(grid["out"], "in-job")
        self.session: str | None = None
        self.start_states: dict[int, dict] = {}
        self._cursor = 0

    def open_session(self) -> tuple[str, dict]:
        """A new session (its claim directory; earlier sessions' claims are removed) and
        every entry's state now; the manifest is written."""
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):
            if name.startswith("session-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        session = f"session-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        os.makedirs(os.path.join(self.root, session))
        states = self.states(file_states(self.entries), sessions=None)
        self.join(session, states)
        self.write_manifest()
        return session, states

    def join(self, session: str, start_states: dict) -> None:
        self.session, self.start_states = session, start_states

    def take(self) -> tuple[int, list[str]] | None:
        """Claim the next unfinished entry: (index, fedmpi.run arguments); None when
        every entry is claimed or finished."""
        while self._cursor < len(self.entries):
            entry = self.entries[self._cursor]
            self._cursor += 1
            claim = os.path.join(self.root, self.session, f"claim-{entry['index']:04d}")
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                continue
            args = run_args(self.grid, entry)
            if args is not None:
                return entry["index"], args
        return None

    def record(self, index: int, outcome: dict) -> None:
        """Store what happened to run ``index`` (``outcome["state"]``: running, done,
        partial or failed, with details), then rewrite the manifest."""
        path = os.path.join(self.root, f"run-{index:04d}.json")
        temporary = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as fh:
            json.dump({"index": index, "session": self.session, **outcome}, fh)
        os.replace(temporary, path)
        self.write_manifest()

    def records(self) -> dict[int, dict]:
        found = {}
        if os.path.isdir(self.root):
            for name in os.listdir(self.root):
                if name.startswith("run-") and name.endswith(".json"):
                    try:
                        with open(os.path.join(self.root, name), encoding="utf-8") as fh:
                            record = json.load(fh)
                        found[int(record["index"])] = record
                    except (OSError, ValueError, KeyError):
                        continue  # a record being replaced, or not ours
        return found

    def states(self, base: dict[int, dict], sessions: str | None) -> dict[int, dict]:
        """``base`` with the records laid over it: those of session ``sessions`` (None:
        only failures of any session, on runs that have not finished since)."""
        states = {index: dict(state) for index, state in base.items()}
        for index, record in self.records().items():
            if index not in states:
                continue
            if sessions is not None and record.get("session") == sessions:
                states[index] = {**states[index], **{k: v for k, v in record.items() if k not in ("index", "session")}}
            elif record.get("state") == "failed" and states[index]["state"] not in ("done", "diverged"):
                states[index] = {**states[index], "state": "failed", "error": record.get("error")}
        return states

    def write_manifest(self, final: bool = False) -> str:
        """The manifest: the states at the start of the session with its records (``final``:
        every results file read again instead)."""
        if final:
            states = self.states(file_states(self.entries), sessions=None)
            for index, record in self.records().items():  # who ran what, kept with the final state
                if record.get("session") == self.session and index in states:
                    states[index].update({k: record[k] for k in ("group", "hosts", "wall_s") if k in record})
        else:
            states = self.states(self.start_states, sessions=self.session)
        return write_manifest(self.grid_path, self.grid, self.entries, states)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmpi.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", metavar="GRID.yaml")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--count", action="store_true", help="print the number of runs")
    action.add_argument("--args", type=int, metavar="INDEX", help="print fedmpi.run arguments for run INDEX")
    action.add_argument("--run", action="store_true", help="run every unfinished entry here, one after another")
    action.add_argument("--in-job", action="store_true",
                        help="started once under mpirun/srun: groups of --ranks-per-run ranks run the entries")
    parser.add_argument("--launcher", default="mpirun -n 3", help="with --run: the command before 'python -m fedmpi.run'")
    parser.add_argument("--ranks-per-run", type=int, default=1, metavar="G",
                        help="with --in-job: ranks of each run (its rank 0 is the server; default 1)")
    args = parser.parse_args(argv)
    if args.ranks_per_run != 1 and not args.in_job:
        parser.error("--ranks-per-run applies to --in-job only")
    if args.in_job:
        return _in_job(args)
    try:
        grid = load_grid(args.grid)
        entries = expand(grid, args.grid)
        if args.count:
            print(len(entries))
            return EXIT_OK
        if args.args is not None:
            if not 0 <= args.args < len(entries):
                raise SweepError(f"{args.grid}: no entry {args.args} (the sweep has {len(entries)}: 0..{len(entries) - 1})")
            found = run_args(grid, entries[args.args])
            if found is None:
                print(f"fedmpi: sweep entry {args.args} ({entries[args.args]['out']}) has finished; skipping",
                      file=sys.stderr)
                return EXIT_FINISHED
            print(shlex.join(found))
            return EXIT_OK
        states = SweepQueue(args.grid, grid, entries).states(file_states(entries), sessions=None)
        manifest = write_manifest(args.grid, grid, entries, states)
        if args.run:
            for entry in entries:
                found = run_args(grid, entry)
                if found is None:
                    print(f"[{entry['index']}] done, skipped", flush=True)
                    continue
                command = [*shlex.split(args.launcher), sys.executable, "-m", "fedmpi.run", *found, "--quiet"]
                print(f"[{entry['index']}] {shlex.join(found)}", flush=True)
                code = subprocess.call(command)
                if code not in (EXIT_OK, EXIT_DIVERGED):  # a diverged run is a result, not a failure
                    print(f"fedmpi: sweep entry {entry['index']} exited with status {code}", file=sys.stderr)
                    return code
            return EXIT_OK
        for entry in entries:
            state = states[entry["index"]]
            described = " ".join(f"{k}={_yaml_value(v)}" for k, v in entry["overrides"].items())
            shown = f"{state['state']} ({state['rounds']} rounds)" if state["state"] in ("partial", "failed") else state["state"]
            failure = f"  [{state['error']}]" if state["state"] == "failed" else ""
            print(f"{entry['index']:4d}  {shown:20s}  {described}  -> {entry['out']}{failure}")
        print(f"{len(entries)} runs; manifest: {manifest}")
    except (SweepError, ConfigError) as exc:
        print(f"fedmpi: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


def _in_job(args: argparse.Namespace) -> int:
    """--in-job: every rank validates the whole sweep before MPI starts (rank 0 prints
    a problem), then runs its group's share (fedmpi.injob)."""
    from .comm import launcher_rank
    from .injob import run_in_job

    try:
        grid = load_grid(args.grid)
        entries = expand(grid, args.grid)
    except (SweepError, ConfigError) as exc:
        if launcher_rank() == 0:
            print(f"fedmpi: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_in_job(SweepQueue(args.grid, grid, entries), args.ranks_per_run)


if __name__ == "__main__":
    sys.exit(main())
