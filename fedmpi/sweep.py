"""``python -m fedmpi.sweep GRID.yaml [--count | --args INDEX | --run]``

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
``--launcher`` (default ``mpirun -n 3``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import subprocess
import sys

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


def write_manifest(grid_path: str, grid: dict, entries: list[dict]) -> str:
    os.makedirs(grid["out"], exist_ok=True)
    manifest = os.path.join(grid["out"], "manifest.json")
    with open(manifest, "w", encoding="utf-8") as fh:
        json.dump({"sweep": grid_path, "config": grid.get("config"), "entries": entries}, fh, indent=2)
        fh.write("\n")
    return manifest


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmpi.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", metavar="GRID.yaml")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--count", action="store_true", help="print the number of runs")
    action.add_argument("--args", type=int, metavar="INDEX", help="print fedmpi.run arguments for run INDEX")
    action.add_argument("--run", action="store_true", help="run every unfinished entry here, one after another")
    parser.add_argument("--launcher", default="mpirun -n 3", help="with --run: the command before 'python -m fedmpi.run'")
    args = parser.parse_args(argv)
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
        manifest = write_manifest(args.grid, grid, entries)
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
            state, rounds = status(entry["out"])
            described = " ".join(f"{k}={_yaml_value(v)}" for k, v in entry["overrides"].items())
            shown = f"partial ({rounds} rounds)" if state == "partial" else state
            print(f"{entry['index']:4d}  {shown:20s}  {described}  -> {entry['out']}")
        print(f"{len(entries)} runs; manifest: {manifest}")
    except (SweepError, ConfigError) as exc:
        print(f"fedmpi: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
