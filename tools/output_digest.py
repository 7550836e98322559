"""Digest what a change must not alter: run every shipped config (rounds cut short)
plus variants that reach each aggregation path, on 1, 2 and 3 ranks, and hash
``/model/final`` and every non-timing dataset under ``/rounds`` and ``/clients``.

    git worktree add /tmp/before HEAD~1
    python tools/output_digest.py --save before.json --code /tmp/before   # the old code, these cases
    python tools/output_digest.py --compare before.json                   # this checkout

Prints one line per (case, ranks) with the digest, and with ``--compare`` whether
it matches. ``--set KEY=VALUE`` (repeatable) is added to every case: a feature
that promises to equal the baseline in some setting is checked against the
baseline's digests, e.g. ``--compare before.json --set algorithm.name=fedprox
--set algorithm.mu=0`` (FedProx with mu = 0 is FedAvg bit for bit). Exit status 1 when any digest differs. MNIST-style cases run on small
IDX files generated here (nothing is downloaded). Used for refactors that promise
bitwise-identical outputs.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIMING = {"wall_s", "train_s", "comm_s", "aggregate_s", "eval_s"}
# The fields hashed: those of the results schema when this tool was written. Fields added
# later are new outputs, not changed ones, and are left out.
FIELDS = {
    "rounds": ("round", "cohort_size", "test_accuracy", "test_loss", "train_loss", "update_norm", "byzantine_in_cohort",
               "byzantine_selected", "epsilon", "epsilon_median", "delta", "noise_multiplier", "clip_norm",
               "clipped_fraction"),
    "clients": ("round", "slot", "client_id", "num_samples", "update_norm", "train_loss", "steps", "byzantine", "selected",
                "score", "clipped_fraction"),
}

# name: (config file or None, overrides); rounds are cut to ROUNDS for every case.
ROUNDS = 3
VARIANTS = {
    "dp_sample": ("configs/digits_mlp.yaml", ["privacy.mode=sample", "privacy.noise_multiplier=1.0"]),
    "dp_sample_target": ("configs/digits_mlp.yaml", ["privacy.mode=sample", "privacy.target_epsilon=4",
                                                     "privacy.batch_sampling=shuffle"]),
    "dp_client_central": ("configs/digits_mlp.yaml", ["privacy.mode=client_central", "privacy.noise_multiplier=0.5",
                                                      "clients.sampling=poisson", "clients.per_round=8"]),
    "dp_client_local_trimmed": ("configs/digits_signflip_krum.yaml", ["privacy.mode=client_local",
                                                                      "privacy.noise_multiplier=0.1",
                                                                      "aggregator.name=trimmed_mean"]),
    "reduce": ("configs/digits_mlp.yaml", ["transport=reduce", "clients.per_round=12"]),
    "centered_clipping": ("configs/digits_signflip_krum.yaml", ["aggregator.name=centered_clipping",
                                                                "aggregator.iterations=2"]),
    "bulyan": ("configs/digits_signflip_krum.yaml", ["aggregator.name=bulyan"]),
    "median_bucketing_clip": ("configs/digits_signflip_krum.yaml", [
        "aggregator.name=median", "aggregator.pre=[{name: clip, max_norm: 2.0}, {name: bucketing, bucket_size: 2}]"]),
    "geomed_gaussian": ("configs/digits_mlp.yaml", ["attack.name=gaussian", "attack.fraction=0.25",
                                                    "aggregator.name=geometric_median"]),
    "median_label_flip": ("configs/digits_mlp.yaml", ["attack.name=label_flip", "attack.clients=[0,3,5]",
                                                      "aggregator.name=median"]),
    "multi_krum_scaling": ("configs/digits_mlp.yaml", ["attack.name=scaling", "attack.fraction=0.125",
                                                       "aggregator.name=multi_krum", "aggregator.m=6"]),
    "nnm_krum_alie_z": ("configs/digits_alie_multikrum.yaml", ["aggregator.name=krum",
                                                               "aggregator.pre=[{name: nnm}]", "attack.params={z: 1.5}"]),
    "fedadam_poisson": ("configs/digits_mlp.yaml", ["server.optimizer=fedadam", "clients.sampling=poisson",
                                                    "clients.per_round=6", "train.momentum=0.5",
                                                    "train.weight_decay=0.001", "output.snapshot_every=1"]),
    "fedavgm_dirichlet": ("configs/digits_mlp.yaml", ["server.optimizer=fedavgm", "clients.total=24",
                                                      "clients.per_round=10", "data.partition.name=dirichlet",
                                                      "data.partition.alpha=0.3", "eval.every=2"]),
}


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def make_idx(directory: Path, seed: int) -> None:
    """Small learnable 28x28 IDX files (class c lights a patch at its own place)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 1000), ("t10k", 200)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            row, col = 2 + 8 * (c // 4), 2 + 8 * (c % 4)
            images[i, row:row + 6, col:col + 6] = 200
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)


def cases(tmp: Path) -> dict:
    found = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        text = path.read_text()
        overrides = []
        for name in ("mnist", "fashion_mnist"):
            if f"name: {name}" in text:
                overrides.append(f"data.dir={tmp / name}")
        found[path.stem] = (str(path.relative_to(REPO)), overrides)
    found.update(VARIANTS)
    return found


def digest(path: Path, ignore: set) -> str:
    import h5py

    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        h.update(f["model/final"][()].tobytes())
        for group, names in FIELDS.items():
            for name in sorted(names):
                if name not in ignore:
                    h.update(name.encode())
                    h.update(f[group][name][()].tobytes())
    return h.hexdigest()[:16]


def run_case(name: str, spec: tuple, ranks: int, tmp: Path, mpirun: str, ignore: set, code: Path,
             extra: tuple = ()) -> str:
    config, overrides = spec
    overrides = [*overrides, *extra]
    out = tmp / f"{name}-{ranks}.h5"
    cmd = [sys.executable, "-m", "fedmpi.run", "--config", str(REPO / config), "--set", f"rounds={ROUNDS}",
           "--quiet", "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    if ranks > 1:
        cmd = [mpirun, "-n", str(ranks), *cmd]
    env = dict(os.environ, PYTHONPATH=str(code))
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return f"failed({proc.returncode}): {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"
    return digest(out, ignore)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--save", metavar="JSON")
    group.add_argument("--compare", metavar="JSON")
    parser.add_argument("--ranks", default="1,2,3")
    parser.add_argument("--only", help="comma-separated case names")
    parser.add_argument("--code", default=str(REPO), help="the checkout whose fedmpi runs (default: this one), e.g. a "
                        "worktree of the commit before a change, to make the baseline with this tool's cases")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override added to every case (repeatable)")
    parser.add_argument("--ignore", default="", help="comma-separated /rounds or /clients fields to leave out of both "
                        "sides (e.g. epsilon,epsilon_median when only the accountant changed)")
    args = parser.parse_args()
    mpirun = str(Path(sys.executable).parent / "mpirun")
    expected = json.loads(Path(args.compare).read_text()) if args.compare else {}
    ignore = {name for name in args.ignore.split(",") if name}
    results, differ = {}, 0
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        make_idx(tmp / "mnist", 0)
        make_idx(tmp / "fashion_mnist", 1)
        for name, spec in cases(tmp).items():
            if args.only and name not in args.only.split(","):
                continue
            for ranks in map(int, args.ranks.split(",")):
                key = f"{name}@{ranks}"
                results[key] = value = run_case(name, spec, ranks, tmp, mpirun, ignore, Path(args.code).resolve(),
                                                tuple(args.set))
                verdict = ""
                if args.compare:
                    same = expected.get(key) == value and not value.startswith("failed")
                    differ += not same
                    verdict = "same" if same else f"DIFFERS (before: {expected.get(key)})"
                print(f"{key:40s} {value}  {verdict}", flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=1) + "\n")
    print(f"{len(results)} runs in {time.monotonic() - start:.0f} s; {differ} differ" if args.compare
          else f"{len(results)} runs in {time.monotonic() - start:.0f} s; saved {args.save}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
