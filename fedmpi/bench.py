"""``python -m fedmpi.bench [SECTION ...] [--json PATH] [--quick]``

Benchmarks that time fedmpi against a baseline measured in the same run and
print ratios (the machine may be shared and noisy: timings alternate where
they can, and medians are reported). Sections:

``e2e``        configs/digits_mlp.yaml under ``mpirun -n 3`` against a framework-free
               single-process loop of the same computation (part of this module):
               steady-state round time and total time. Targets <= 1.0x, <= 1.5x.
``comm``       fedmpi's per-round broadcast + gather against raw mpi4py Bcast + Gatherv
               of the same sizes (d = 1e5, 1e6, 1e7), 3 ranks, best of 21 alternating
               repeats each. Target >= 0.9x throughput.
``aggregation`` FedAvg, Krum, Multi-Krum, median, trimmed mean at n in {16, 64},
               d in {1e5, 1e6}, against one float32 GEMM of the same shape and against
               a streaming read of the same array. Targets: Krum's distances <= 2x the
               GEMM; FedAvg >= 0.5x the streaming bandwidth.
``krum``       only Krum's distance computation at n = 64, d = 1e6 against one GEMM.
``dp``         one DP-SGD step against a non-private step, one thread, batch 64, MLP
               784-200-200-10 and McMahan et al.'s CNN. Target <= 3x. And the character
               LSTM (batch 10), whose embedding and LSTM layers take the generic vmap path.
``startup``    time to the first round at 2, 4 and 16 ranks; which heavy modules each
               rank imported (h5py, matplotlib, scikit-learn, pandas, dp-accounting stay
               out of workers that do not use them).
``memory``     peak RSS of rank 0 against cohort x d x 4 bytes for a 1000-client cohort
               of a 1e5-parameter model, with transport gather and reduce.
``sweep``      the 18-run configs/sweeps/example.yaml as separate ``mpirun -n 3`` launches
               against one ``mpirun -n 3 ... fedmpi.sweep --in-job`` (3 groups of 1 rank, and
               1 group of 3): runs per minute, and the share of time spent starting up.
               Target >= 3x the runs per minute of separate launches.
``sharded``    ``transport: sharded`` against the rank-0 path (rows gathered on rank 0) in
               the same run, at 1, 2 and 4 ranks, n = 64 rows of d = 2^20: each rule's
               aggregation time, the transfer (Alltoallw against Gatherv), every rank's peak
               RSS; the per-block costs and the collectives' bandwidth measured here, and from
               them a projection for 10,000 clients per round, d = 1e6, on 16 to 256 ranks;
               the memory estimate of a 2,000-client cohort of a 4.2M-parameter model.
``state``      SCAFFOLD's client state for 1000 clients x 1e5 parameters (400 MB): rank 0's
               per-round work on it (the cohort's c - c_i rows, then option II and c) with
               the file-backed store against the in-memory one, cohort 10 and 100; an
               incremental checkpoint (the rows changed since the slot was written)
               against writing every row; and rank 0's peak RSS in a real 3-rank run with
               each store.
``accounting`` per-round RDP accounting on dp-accounting's fine order grid (RunAccountant.after_round,
               replayed in this process on the cohorts of a DP-SGD digits run under
               ``mpirun -n 3``) against that run's rounds: steady state (cached per-step
               RDP) target <= 5% of a round; the first round, which computes the per-step
               RDP of each client size, and the whole run are reported.

Without a section, all run (a few minutes on 2 cores). docs/performance.md
records the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HEAVY_MODULES = ("h5py", "matplotlib", "sklearn", "pandas", "dp_accounting", "scipy")


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each callable, measured in alternation after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _mpirun() -> str:
    local = Path(sys.executable).parent / "mpirun"
    return str(local) if local.exists() else (shutil.which("mpirun") or "mpirun")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _row(section: str, case: str, value: float, baseline: float, unit: str, ratio: float, target: str,
         met: bool | None, note: str = "") -> dict:
    return {"section": section, "case": case, "fedmpi": value, "baseline": baseline, "unit": unit, "ratio": ratio,
            "target": target, "met": met, "note": note}


# --------------------------------------------------------------------------- e2e


def framework_free_loop(rounds: int = 20, clients: int = 16, seed: int = 0) -> dict:
    """configs/digits_mlp.yaml written as one plain loop: the same data split and
    normalisation, MLP 64-200-200-10, 1 epoch of batch-10 SGD (lr 0.05) on each of 16
    IID clients, FedAvg weighted by samples, evaluation every round; one torch thread."""
    import torch
    import torch.nn.functional as F

    from .data import load_digits_arrays

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = round(len(y) * 0.2)
    x_test, y_test, x_train, y_train = x[order[:n_test]], y[order[:n_test]], x[order[n_test:]], y[order[n_test:]]
    x_train, x_test = x_train / 16.0, x_test / 16.0
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = ((x_train - mean) / std).astype(np.float32), ((x_test - mean) / std).astype(np.float32)
    parts = [torch.from_numpy(p) for p in np.array_split(rng.permutation(len(y_train)), clients)]
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 200), torch.nn.ReLU(),
                                torch.nn.Linear(200, 200), torch.nn.ReLU(), torch.nn.Linear(200, 10))
    params = list(model.parameters())
    global_params = [p.detach().clone() for p in params]
    xt, yt, xe, ye = (torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test))
    gen = torch.Generator().manual_seed(seed)
    round_s, accuracy = [], 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        sums = [torch.zeros_like(p) for p in params]
        for idx in parts:
            with torch.no_grad():
                for p, g in zip(params, global_params):
                    p.copy_(g)
            perm = idx[torch.randperm(len(idx), generator=gen)]
            for b in range(0, len(idx), 10):
                batch = perm[b:b + 10]
                model.zero_grad()
                F.cross_entropy(model(xt[batch]), yt[batch]).backward()
                with torch.no_grad():
                    for p in params:
                        p.sub_(p.grad, alpha=0.05)
            with torch.no_grad():
                for s, p, g in zip(sums, params, global_params):
                    s.add_(p - g, alpha=len(idx))
        with torch.no_grad():
            for g, s in zip(global_params, sums):
                g.add_(s / len(y_train))
            for p, g in zip(params, global_params):
                p.copy_(g)
            accuracy = float((model(xe).argmax(1) == ye).float().mean())
        round_s.append(time.perf_counter() - start)
    return {"round_s": round_s, "accuracy": accuracy}


def bench_e2e(quick: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "e2e.h5")
        start = time.perf_counter()
        loop = subprocess.run([sys.executable, "-m", "fedmpi.bench", "_loop"], env=_env(), capture_output=True,
                              text=True, check=True)
        loop_total = time.perf_counter() - start
        loop_result = json.loads(loop.stdout.strip().splitlines()[-1])
        start = time.perf_counter()
        subprocess.run([_mpirun(), "-n", "3", sys.executable, "-m", "fedmpi.run", "--config",
                        str(REPO / "configs" / "digits_mlp.yaml"), "--out", out, "--quiet"], env=_env(),
                       capture_output=True, text=True, check=True)
        fed_total = time.perf_counter() - start
        from .results import load

        run = load(out)
    skip = 2  # warm-up rounds
    fed_round = float(np.median(run.rounds["wall_s"][skip:]))
    loop_round = float(np.median(loop_result["round_s"][skip:]))
    fed_acc = float(run.rounds["test_accuracy"].iloc[-1])
    note = f"accuracy fedmpi {fed_acc:.4f}, loop {loop_result['accuracy']:.4f}"
    return [
        _row("e2e", "steady-state round, mpirun -n 3 vs 1 process", fed_round, loop_round, "s",
             fed_round / loop_round, "<= 1.0x", fed_round / loop_round <= 1.0, note),
        _row("e2e", "total run incl. start-up", fed_total, loop_total, "s", fed_total / loop_total, "<= 1.5x",
             fed_total / loop_total <= 1.5),
    ]


# --------------------------------------------------------------------------- comm


def comm_worker(sizes: list[int], repeats: int) -> None:
    """Run under mpirun: time fedmpi's bcast + gather_rows against raw Bcast + Gatherv."""
    from mpi4py import MPI

    from .comm import MPIComm, prepare_environment
    from .protocol import slot_counts

    prepare_environment()
    comm = MPIComm()
    world = MPI.COMM_WORLD
    rows_per_worker = 2
    results = []
    for d in sizes:
        k = rows_per_worker * (comm.size - 1)
        counts = slot_counts(k, comm.size)
        weights = np.ones(d, dtype=np.float32)
        mine = np.ones((counts[comm.rank], d), dtype=np.float32)
        out = np.empty((k, d), dtype=np.float32) if comm.rank == 0 else None
        element_counts = [c * d for c in counts]
        displs = np.concatenate([[0], np.cumsum(element_counts)[:-1]]).tolist()

        def fedmpi_round():
            comm.bcast(weights)
            comm.gather_rows(mine, out, counts)

        def raw_round():
            world.Bcast([weights, MPI.FLOAT], root=0)
            recv = [out, element_counts, displs, MPI.FLOAT] if world.rank == 0 else None
            world.Gatherv([mine, MPI.FLOAT], recv, root=0)

        times = {"fedmpi": [], "raw": []}
        for i in range(repeats + 1):
            for name, fn in (("fedmpi", fedmpi_round), ("raw", raw_round)) if i % 2 else (("raw", raw_round),
                                                                                         ("fedmpi", fedmpi_round)):
                world.Barrier()
                start = MPI.Wtime()
                fn()
                world.Barrier()
                if i:
                    times[name].append(MPI.Wtime() - start)
        if comm.rank == 0:
            moved = (d + k * d) * 4
            # identical MPI traffic either way: the best of the repeats is what each path can do
            results.append({"d": d, "bytes": moved, "fedmpi_s": min(times["fedmpi"]), "raw_s": min(times["raw"])})
    if comm.rank == 0:
        print(json.dumps(results))


def bench_comm(quick: bool = False) -> list[dict]:
    sizes = [100_000, 1_000_000] if quick else [100_000, 1_000_000, 10_000_000]
    proc = subprocess.run([_mpirun(), "-n", "3", sys.executable, "-m", "fedmpi.bench", "_comm",
                           *map(str, sizes)], env=_env(), capture_output=True, text=True, check=True)
    rows = []
    for r in json.loads(proc.stdout.strip().splitlines()[-1]):
        ratio = r["raw_s"] / r["fedmpi_s"]  # throughput ratio
        rows.append(_row("comm", f"bcast + gather, d = {r['d']:.0e}, 4 rows, 3 ranks", r["bytes"] / r["fedmpi_s"] / 1e9,
                         r["bytes"] / r["raw_s"] / 1e9, "GB/s", ratio, ">= 0.9x", ratio >= 0.9))
    return rows


# --------------------------------------------------------------------------- aggregation


def bench_krum(n: int, d: int, repeats: int) -> dict:
    from . import aggregation

    rng = np.random.default_rng(0)
    updates = rng.standard_normal((n, d), dtype=np.float32)
    other = np.ascontiguousarray(rng.standard_normal((n, d), dtype=np.float32).T)
    t = alternate({
        "krum_distances": lambda: aggregation.pairwise_sq_distances(updates),
        "sgemm": lambda: updates @ other,
    }, repeats)
    return {"n": n, "d": d, "krum_distances_s": t["krum_distances"], "sgemm_s": t["sgemm"],
            "ratio": t["krum_distances"] / t["sgemm"], "target": 2.0}


def bench_aggregation(quick: bool = False) -> list[dict]:
    from . import aggregation as agg

    rows = []
    shapes = [(16, 100_000), (64, 100_000)] if quick else [(16, 100_000), (64, 100_000), (16, 1_000_000),
                                                           (64, 1_000_000)]
    for n, d in shapes:
        rng = np.random.default_rng(0)
        updates = rng.standard_normal((n, d), dtype=np.float32)
        other = np.ascontiguousarray(rng.standard_normal((n, d), dtype=np.float32).T)
        samples = rng.integers(50, 500, n).astype(np.float64)
        ones = np.ones(n, dtype=np.float32)
        f = n // 4
        repeats = 5 if d >= 1_000_000 else 9
        t = alternate({
            "gemm": lambda: updates @ other,
            "stream": lambda: ones @ updates,  # one streaming pass over the array
            "fedavg": lambda: agg.fedavg(updates, samples),
            "distances": lambda: agg.pairwise_sq_distances(updates),
            "krum": lambda: agg.krum(updates, f),
            "multi_krum": lambda: agg.multi_krum(updates, f),
        }, repeats)
        slow = alternate({"median": lambda: agg.median(updates), "trimmed_mean": lambda: agg.trimmed_mean(updates, f)},
                         1 if d >= 1_000_000 else 3)
        size = f"n = {n}, d = {d:.0e}"
        nbytes = updates.nbytes
        bw_fedavg, bw_stream = nbytes / t["fedavg"] / 1e9, nbytes / t["stream"] / 1e9
        rows.append(_row("aggregation", f"FedAvg, {size}", bw_fedavg, bw_stream, "GB/s", bw_fedavg / bw_stream,
                         ">= 0.5x", bw_fedavg / bw_stream >= 0.5))
        rows.append(_row("aggregation", f"Krum distances, {size}", t["distances"], t["gemm"], "s",
                         t["distances"] / t["gemm"], "<= 2x", t["distances"] / t["gemm"] <= 2.0))
        for name, seconds in (("Krum", t["krum"]), ("Multi-Krum", t["multi_krum"]), ("median", slow["median"]),
                              ("trimmed mean", slow["trimmed_mean"])):
            rows.append(_row("aggregation", f"{name}, {size}", seconds, t["gemm"], "s", seconds / t["gemm"],
                             "-", None, f"stream {bw_stream:.1f} GB/s"))
    return rows


# --------------------------------------------------------------------------- dp


def _dp_step_times(model_cfg, batch: int, repeats: int, shape: tuple = (1, 28, 28), classes: int = 10) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from .models import FlatModel, build_model
    from .privacy.dpsgd import PerExampleGradients

    module = build_model(model_cfg, shape, classes)
    flat = FlatModel(module)
    gen = torch.Generator().manual_seed(0)
    if len(shape) == 1:  # character codes
        x = torch.randint(0, classes, (batch, *shape), generator=gen).to(torch.uint8)
    else:
        x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    per_example = PerExampleGradients(module)
    views = [p.grad for p in module.parameters()]
    noise = torch.empty(flat.size)

    def plain():
        flat.grad.zero_()
        F.cross_entropy(module(x), y).backward()
        flat.flat.add_(flat.grad, alpha=-0.01)

    def private():
        per_example.compute(x, y, F.cross_entropy, 1.0, views)
        torch.randn(flat.size, generator=gen, out=noise)
        flat.grad.add_(noise).div_(batch)
        flat.flat.add_(flat.grad, alpha=-0.01)

    return alternate({"plain": plain, "dp": private}, repeats)


def bench_dp(quick: bool = False, batch: int = 64) -> list[dict]:
    import torch

    from .schema import ModelConfig

    torch.set_num_threads(1)
    rows = []
    for label, cfg in (("MLP 784-200-200-10", ModelConfig(name="mlp", hidden=[200, 200])), ("MNIST CNN", ModelConfig(name="cnn"))):
        t = _dp_step_times(cfg, batch, 5 if quick else 20)
        ratio = t["dp"] / t["plain"]
        rows.append(_row("dp", f"DP-SGD step, {label}, batch {batch}, 1 thread", t["dp"], t["plain"], "s", ratio,
                         "<= 3x", ratio <= 3.0))
    # the generic (torch.func vmap) path: embedding and LSTM layers; batch 10 as in the Shakespeare configs
    t = _dp_step_times(ModelConfig(name="char_lstm"), 10, 3 if quick else 10, shape=(80,), classes=81)
    rows.append(_row("dp", "DP-SGD step, char LSTM (vmap path), batch 10, 1 thread", t["dp"], t["plain"], "s",
                     t["dp"] / t["plain"], "-", None))
    return rows


# --------------------------------------------------------------------------- startup and memory


def probe(directory: str, args: list[str]) -> int:
    """Run fedmpi.run with ``args``; then write, per rank, the heavy modules it
    imported and its peak RSS to ``directory``/rank<r>.json."""
    import resource

    from . import comm as comm_mod
    from .run import main as run_main

    rank = comm_mod.launcher_rank()
    code = run_main(args)
    loaded = sorted(m for m in HEAVY_MODULES if m in sys.modules)
    with open(os.path.join(directory, f"rank{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "modules": loaded, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, fh)
    return code


def _probe_run(ranks: int, args: list[str], cwd: str) -> tuple[float, float, list[dict]]:
    """(seconds to the first round, total seconds, per-rank probe records)."""
    records_dir = tempfile.mkdtemp(dir=cwd)
    cmd = [_mpirun(), "-n", str(ranks), sys.executable, "-m", "fedmpi.bench", "_probe", records_dir, "--", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = None
    for line in proc.stdout:
        if first is None and line.startswith("round "):
            first = time.perf_counter() - start
    proc.wait()
    total = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"probe run failed: {proc.stderr.read()}")
    records = []
    for name in sorted(os.listdir(records_dir)):
        with open(os.path.join(records_dir, name)) as fh:
            records.append(json.load(fh))
    return first if first is not None else total, total, sorted(records, key=lambda r: r["rank"])


def bench_startup(quick: bool = False) -> list[dict]:
    rows, worker_modules = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in ((2, 4) if quick else (2, 4, 16)):
            first, total, records = _probe_run(ranks, ["--set", "rounds=2", "--out", f"s{ranks}.h5"], tmp)
            workers = {m for r in records if r["rank"] > 0 for m in r["modules"]}
            worker_modules |= workers
            server = records[0]["modules"] if records else []
            rows.append(_row("startup", f"time to the first round, {ranks} ranks", first, total, "s", first / total, "-",
                             None, f"rank 0 imported {', '.join(server) or 'none of them'}; "
                                   f"workers {', '.join(sorted(workers)) or 'none'}"))
        _, _, records = _probe_run(3, ["--set", "rounds=2", "--set", "privacy.mode=sample",
                                       "--set", "privacy.noise_multiplier=1", "--out", "dp.h5"], tmp)
        dp_workers = {m for r in records if r["rank"] > 0 for m in r["modules"]}
    heavy = "/".join(HEAVY_MODULES)
    rows.append(_row("startup", f"heavy modules ({heavy}) in workers, plain runs", float(len(worker_modules)), 0.0,
                     "modules", 0.0, "none", not worker_modules, ", ".join(sorted(worker_modules))))
    rows.append(_row("startup", f"heavy modules ({heavy}) in workers, DP-SGD", float(len(dp_workers)), 0.0,
                     "modules", 0.0, "none", not dp_workers, ", ".join(sorted(dp_workers))))
    return rows


def bench_memory(quick: bool = False) -> list[dict]:
    """A 1000-client cohort of a 1e5-parameter MLP (synthetic data, 60 inputs, hidden
    1000 and 40: 101,450 parameters), 2 rounds, 3 ranks."""
    rows = []
    common = ["--set", "data.name=synthetic", "--set", "clients.total=1000", "--set", "clients.per_round=1000",
              "--set", "model.hidden=[1000,40]", "--set", "data.synthetic.min_samples=10",
              "--set", "data.synthetic.max_samples=20", "--set", "rounds=2", "--set", "train.batch_size=20",
              "--set", "eval.every=2"]
    d, k = 101_450, 1000
    with tempfile.TemporaryDirectory() as tmp:
        for transport in ("gather", "reduce"):
            _, total, records = _probe_run(3, [*common, "--set", f"transport={transport}", "--out", f"{transport}.h5"],
                                           tmp)
            peak = records[0]["maxrss"]
            rows.append(_row("memory", f"rank 0 peak RSS, cohort 1000 x d 101450, transport {transport}", peak / 2**20,
                             k * d * 4 / 2**20, "MiB", peak / (k * d * 4), "-", None,
                             f"run took {total:.1f} s; rows alone are {k * d * 4 / 2**20:.0f} MiB"))
    return rows


# --------------------------------------------------------------------------- sweep


def _timed_lines(cmd: list[str], cwd: str) -> tuple[float, list[tuple[float, str]]]:
    """Run ``cmd``; (total seconds, [(seconds since the start, line) of its stdout])."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in proc.stdout]
    stderr = proc.stderr.read()
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed with status {proc.returncode}: {stderr[-2000:]}")
    return time.perf_counter() - start, lines


def _run_seconds(path: str) -> float:
    """/run/wall_s: from the results file's creation to the run's end (the run itself)."""
    import h5py

    with h5py.File(path, "r") as f:
        return float(f["run/wall_s"][()])


def bench_sweep(quick: bool = False) -> list[dict]:
    """configs/sweeps/example.yaml (18 digits runs; 6 with --quick) as separate
    ``mpirun -n 3 python -m fedmpi.run`` launches, one after another, against one
    ``mpirun -n 3 python -m fedmpi.sweep --in-job`` with G = 1 (3 groups) and G = 3 (one
    group). Start-up: of a separate launch, its wall time less the run's /run/wall_s;
    of an in-job sweep, the time until the job printed its first line (MPI up, torch
    loaded, the sweep opened). The in-job files are checked against the separate ones."""
    from .sweep import expand, load_grid, run_args

    grid_path = REPO / "configs" / "sweeps" / "example.yaml"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        grid = load_grid(str(grid_path))
        grid["config"] = str(REPO / grid["config"])
        if quick:
            grid["seeds"] = grid["seeds"][:1]
        layouts = {"separate": None, "G1": 1, "G3": 3}
        paths = {}
        for name in layouts:
            grid_file = os.path.join(tmp, f"{name}.yaml")
            with open(grid_file, "w", encoding="utf-8") as fh:
                json.dump({**grid, "out": os.path.join(tmp, name)}, fh)  # JSON is YAML
            paths[name] = grid_file
        entries = expand(load_grid(paths["separate"]))
        separate_total, separate_startup = 0.0, 0.0
        for entry in entries:
            args = run_args(load_grid(paths["separate"]), entry)
            total, _ = _timed_lines([_mpirun(), "-n", "3", sys.executable, "-m", "fedmpi.run", *args, "--quiet"], tmp)
            separate_total += total
            separate_startup += total - _run_seconds(entry["out"])
        n = len(entries)
        separate_rate = n / separate_total * 60
        rows.append(_row("sweep", f"{n} runs as separate mpirun -n 3 launches", separate_rate, separate_rate, "runs/min",
                         1.0, "-", None, f"{separate_total:.0f} s; start-up and exit {separate_startup / separate_total:.0%} "
                                         f"of it ({separate_startup / n:.1f} s a run)"))
        for name, per_run in (("G1", 1), ("G3", 3)):
            total, lines = _timed_lines([_mpirun(), "-n", "3", sys.executable, "-m", "fedmpi.sweep", paths[name],
                                         "--in-job", "--ranks-per-run", str(per_run)], tmp)
            startup = lines[0][0] if lines else total
            rate = n / total * 60
            ours = expand(load_grid(paths[name]))
            identical = sum(_final_model(a["out"]) == _final_model(b["out"]) for a, b in zip(ours, entries))
            groups = 3 // per_run
            rows.append(_row("sweep", f"{n} runs in one mpirun -n 3 --in-job, {groups} group{'s' * (groups > 1)} of "
                             f"{per_run}", rate, separate_rate, "runs/min", rate / separate_rate, ">= 3x",
                             rate / separate_rate >= 3.0,
                             f"{total:.0f} s; start-up {startup / total:.0%} of it ({startup:.1f} s once); "
                             f"/model/final identical to the separate run's in {identical} of {n}"))
    return rows


def _final_model(path: str) -> bytes:
    import h5py

    with h5py.File(path, "r") as f:
        return f["model/final"][:].tobytes()



# --------------------------------------------------------------------------- sharded

SHARDED_F = 8  # Byzantine rows tolerated by the rules that take f (Bulyan: n >= 4f + 3)
SHARDED_F_MDA = 2  # MDA searches C(n, f) subsets: C(64, 2) = 2016


def _bench_rows(first: int, count: int, d: int) -> np.ndarray:
    """Slots first.. first + count of the bench cohort, keyed by slot: N(0, 1) rows, and
    every eighth slot scaled x10 (outliers for the rules to find)."""
    rows = np.empty((count, d), dtype=np.float32)
    for i in range(count):
        rows[i] = np.random.default_rng([7, first + i]).standard_normal(d, dtype=np.float32)
        if (first + i) % 8 == 7:
            rows[i] *= 10
    return rows


def sharded_worker(path: str, transport: str, n: int, d: int, block: int, repeats: int) -> None:
    """Under mpirun: rows trained on the workers (rank 0 holds none unless alone), moved
    (Gatherv to rank 0, or Alltoallw of column blocks), then every rule timed between
    barriers and its peak traced; each rank's records to ``path`` (JSON) from rank 0."""
    import resource
    import tracemalloc

    from .aggregation import RULES
    from .comm import MPIComm, prepare_environment
    from .config import load
    from .protocol import RECORD, RECORD_FIELDS, slot_counts
    from .rounds import RuleAggregator, Updates
    from .sharded.layout import BlockLayout
    from .sharded.round import ShardContext, ShardedAggregator

    prepare_environment()
    comm = MPIComm()
    world, root = comm.comm, comm.rank == 0
    counts = slot_counts(n, comm.size)
    rows = _bench_rows(sum(counts[:comm.rank]), counts[comm.rank], d)
    layout = BlockLayout(d, block, comm.size)
    sharded = transport == "sharded"
    world.Barrier()
    start = time.perf_counter()
    if comm.size == 1:
        held = rows
    elif sharded:
        held = comm.exchange_columns(rows, counts, layout.spans)
    else:
        held = np.empty((n, d), dtype=np.float32) if root else None
        comm.gather_rows(rows, held, counts)
    world.Barrier()
    record = {"rank": comm.rank, "transfer_s": time.perf_counter() - start, "rules": {},
              "held_bytes": (0 if held is None else held.nbytes) + (rows.nbytes if comm.size > 1 else 0)}
    records = np.zeros((n, len(RECORD_FIELDS)))
    records[:, RECORD["num_samples"]] = 1 + np.arange(n) % 5
    cohort = np.arange(n)
    context = ShardContext(layout, comm)
    for name in RULES:
        cfg = load(None, [f"clients.total={n}", f"clients.per_round={n}", f"aggregator.name={name}",
                          *([f"aggregator.f={SHARDED_F_MDA if name == 'mda' else SHARDED_F}"]
                            if "f" in RULES[name].reads else [])])
        if sharded:
            aggregator, updates = ShardedAggregator(cfg, d, context), Updates(cohort, records, counts,
                                                                               shard=context.columns(held))
        else:
            aggregator, updates = RuleAggregator(cfg, d), Updates(cohort, records, counts, rows=held)
        seconds = []
        for _ in range(repeats):
            world.Barrier()
            start = time.perf_counter()
            if sharded or root:
                aggregator(updates, 0)
            world.Barrier()
            seconds.append(time.perf_counter() - start)
        tracemalloc.start()
        if sharded or root:
            aggregator(updates, 0)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        world.Barrier()
        record["rules"][name] = {"s": statistics.median(seconds), "traced_peak": traced}
    record["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if comm.size > 1 and sharded:  # the collectives the projection needs, measured here
        record["bandwidth"] = _collective_bandwidth(comm, layout)
    records_all = comm.allgather(record)
    if root:
        with open(path, "w") as fh:
            json.dump(records_all, fh)


def _collective_bandwidth(comm, layout) -> dict:
    """Bytes per second of one tree message (rank 1 -> 0, a 1024 x 1024 float64 partial),
    of the Alltoallw exchange per rank (64 rows of 2^20 columns), of the columns gather."""
    from mpi4py import MPI

    world = comm.comm
    partial = np.ones((1024, 1024))
    best = np.inf
    for _ in range(5):
        world.Barrier()
        start = MPI.Wtime()
        if comm.rank == 1:
            world.Send(partial, dest=0, tag=9)
        elif comm.rank == 0:
            world.Recv(partial, source=1, tag=9)
        world.Barrier()
        best = min(best, MPI.Wtime() - start)
    weights = np.ones(layout.size, dtype=np.float32)
    lo, hi = layout.span(comm.rank)
    gather = np.inf
    for _ in range(5):
        world.Barrier()
        start = MPI.Wtime()
        comm.gather_columns(weights[lo:hi], weights if comm.rank == 0 else None, layout.spans)
        world.Barrier()
        gather = min(gather, MPI.Wtime() - start)
    return {"p2p_Bps": partial.nbytes / best, "gather_columns_Bps": weights.nbytes / gather}


def _block_costs(block: int) -> dict:
    """Seconds per block of ``block`` columns, one core, of each per-block kernel at n rows
    (the Gram partial and the coordinate-wise sorts at n = 1024; the n x n float64 add of
    the tree at n = 2048; rank 0's Krum scores at n = 2048)."""
    from . import aggregation as agg

    rng = np.random.default_rng(0)
    n = 1024
    x = rng.standard_normal((n, block), dtype=np.float32)
    w = np.full(n, 1.0 / n)
    centre = agg.mean_row(x)
    gram = rng.standard_normal((2048, 2048))
    dist = np.abs(gram + gram.T)
    t = alternate({
        "gram": lambda: agg._centered_gram(x, None, centre),
        "median": lambda: agg._coordinatewise(x, n // 2 - 1, n // 2 + 1),
        "meamed": lambda: agg.closest_to_median(x, n - 100),
        "weighted_sum": lambda: agg.weighted_sum(x, w),
        "add": lambda: np.add(gram, gram, out=dist),
    }, 3)
    t["krum_scores_2048"] = alternate({"k": lambda: agg.krum_scores(dist, 100)}, 1)["k"]
    return {"n": n, "block": block, **t}


def _projection(costs: dict, bandwidth: dict, alltoall_Bps: float, clients: int = 10_000, d: int = 1_000_000,
                block: int = 4096) -> list[dict]:
    """Seconds per round of the sharded aggregation and bytes per rank, on paper, for
    ``clients`` rows of ``d`` at 16 to 256 ranks, from the measured per-block costs
    (scaled by n^2 for the Gram partial and the tree adds, n log n for the sorts, n for
    sums) and the measured bandwidths (this machine's; a cluster's links would replace them)."""
    n, blocks = clients, max(1, d // block)
    m = costs["n"]
    gram_block = costs["gram"] * (n / m) ** 2
    sort_scale = (n * math.log2(n)) / (m * math.log2(m))
    levels = math.ceil(math.log2(blocks))
    partial_bytes = n * n * 8
    tree_s = levels * (partial_bytes / bandwidth["p2p_Bps"] + costs["add"] * (n / 2048) ** 2)
    scores_s = costs["krum_scores_2048"] * (n * n * math.log2(n)) / (2048 * 2048 * 11)
    rows = []
    for ranks in (16, 32, 64, 128, 256):
        per_rank = math.ceil(blocks / ranks)
        width = per_rank * block
        exchange_s = max(n * width * 4, math.ceil(n / (ranks - 1)) * d * 4) / alltoall_Bps
        gather_s = d * 4 / bandwidth["gather_columns_Bps"]
        memory = n * width * 4 + math.ceil(n / (ranks - 1)) * d * 4
        rows.append({"ranks": ranks, "blocks_per_rank": per_rank, "exchange_s": exchange_s, "weights_gather_s": gather_s,
                     "krum_s": per_rank * gram_block + tree_s + scores_s, "median_s": per_rank * costs["median"] * sort_scale,
                     "fedavg_s": per_rank * costs["weighted_sum"] * n / m,
                     "memory_gib": memory / 2**30, "memory_with_tree_gib": (memory + (levels + 6) * partial_bytes) / 2**30})
    return rows


def _memory_estimates() -> list[dict]:
    """The estimate of the memory check for a cohort of 2,000 of a 4.2M-parameter MLP
    (MNIST-shaped inputs, one hidden layer of 5,330): rank 0 with the rows, and the
    largest rank with transport: sharded over P ranks."""
    from .config import load
    from .preflight import server_memory, sharded_memory

    class _Shape:
        input_shape, num_classes = (1, 28, 28), 10

    overrides = ["data.name=mnist", "clients.total=2000", "clients.per_round=2000", "model.hidden=[5330]",
                 "aggregator.name=krum", "aggregator.f=100"]
    rows, other, d = server_memory(load(None, overrides), _Shape())
    out = [{"ranks": 1, "transport": "gather", "rank": 0, "gib": (rows + other) / 2**30, "d": d}]
    cfg = load(None, [*overrides, "transport=sharded"])
    for ranks in (2, 4, 8, 16):
        needs = [sum(sharded_memory(cfg, d, r, ranks)) for r in range(ranks)]
        out.append({"ranks": ranks, "transport": "sharded", "rank": int(np.argmax(needs)), "gib": max(needs) / 2**30,
                    "rank0_gib": needs[0] / 2**30, "d": d})
    return out


def _largest_fits(node_gib: float = 64.0, reserve_gib: float = 1.0) -> list[dict]:
    """From the memory check's estimate (one rank per node of ``node_gib``, ``reserve_gib``
    for the interpreter, torch and the data): the largest cohort with d = 1e6, and the
    largest d with a cohort of 2,000, that transport: sharded fits on P nodes (Krum, so
    the block tree's n x n matrices count), against the rank-0 path (P = 1, gather)."""
    from .config import load
    from .preflight import sharded_memory

    budget = (node_gib - reserve_gib) * 2**30

    def fits(k: int, d: int, ranks: int) -> bool:
        cfg = load(None, [f"clients.total={k}", f"clients.per_round={k}", "aggregator.name=krum", "transport=sharded"])
        if ranks == 1:
            return k * d * 4 + 8 * d * 8 <= budget  # the rank-0 path: rows and d-sized vectors
        return all(sum(sharded_memory(cfg, d, r, ranks)) <= budget for r in (0, 1))

    def largest(test, low: int, high: int) -> int:
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if test(mid) else (low, mid - 1)
        return low

    out = []
    for ranks in (1, 4, 16, 64, 256):
        out.append({"ranks": ranks, "node_gib": node_gib, "cohort_at_1e6": largest(lambda k: fits(k, 10**6, ranks), 1, 10**6),
                    "d_at_2000": largest(lambda d: fits(2000, d, ranks), 1, 10**11)})
    return out


def _keep_fastest(results: dict, key: tuple, records: list[dict]) -> None:
    if key not in results:
        results[key] = records
        return
    for kept, new in zip(results[key], records):
        kept["transfer_s"] = min(kept["transfer_s"], new["transfer_s"])
        kept["maxrss"] = max(kept["maxrss"], new["maxrss"])
        for name, rule in new["rules"].items():
            kept["rules"][name]["s"] = min(kept["rules"][name]["s"], rule["s"])


def bench_sharded(quick: bool = False) -> list[dict]:
    n, d, block = 64, (1 << 18) if quick else (1 << 20), 4096
    repeats = 2 if quick else 3
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in (1, 2, 4):
            # the two paths alternate (gather, sharded, then sharded, gather): a shared machine's
            # load drifts; each rule keeps its fastest pass, each rank its largest peak
            for order in ((("gather", "sharded"),) if quick else (("gather", "sharded"), ("sharded", "gather"))):
                for transport in order:
                    path = os.path.join(tmp, f"{transport}{ranks}.json")
                    subprocess.run([_mpirun(), "-n", str(ranks), sys.executable, "-m", "fedmpi.bench", "_sharded", path,
                                    transport, str(n), str(d), str(block), str(repeats)], env=_env(), check=True)
                    with open(path) as fh:
                        _keep_fastest(results, (transport, ranks), json.load(fh))
    size = f"n = {n}, d = 2^{int(math.log2(d))}"
    rows = []
    for ranks in (1, 2, 4):
        gathered, sharded = results["gather", ranks], results["sharded", ranks]
        for name in sharded[0]["rules"]:
            s, g = sharded[0]["rules"][name]["s"], gathered[0]["rules"][name]["s"]
            peak = max(r["held_bytes"] + r["rules"][name]["traced_peak"] for r in sharded)
            rows.append(_row("sharded", f"{name}, {size}, {ranks} ranks", s, g, "s", s / g, "-", None,
                             f"largest rank holds {peak / 2**20:.0f} MiB during it; rank 0 path "
                             f"{gathered[0]['held_bytes'] + gathered[0]['rules'][name]['traced_peak']:.3g} B"))
        rows.append(_row("sharded", f"transfer, {size}, {ranks} ranks: Alltoallw vs Gatherv", sharded[0]["transfer_s"],
                         gathered[0]["transfer_s"], "s", sharded[0]["transfer_s"] / max(gathered[0]["transfer_s"], 1e-9),
                         "-", None))
        rank0 = sharded[0]["maxrss"] / gathered[0]["maxrss"]
        rows.append(_row("sharded", f"rank 0 peak RSS, {size}, {ranks} ranks", sharded[0]["maxrss"] / 2**20,
                         gathered[0]["maxrss"] / 2**20, "MiB", rank0, "~1/P", None,
                         "largest rank: sharded " + f"{max(r['maxrss'] for r in sharded) / 2**20:.0f} MiB, rank-0 path "
                         f"{max(r['maxrss'] for r in gathered) / 2**20:.0f} MiB"))
    costs = _block_costs(block)
    bandwidth = results["sharded", 4][0]["bandwidth"]
    received = n * (d / 4) * 4 * 3 / 4  # what one of 4 ranks receives from the 3 others in the exchange
    alltoall = received / max(results["sharded", 4][0]["transfer_s"], 1e-9)  # per rank
    for name in ("gram", "median", "meamed", "weighted_sum"):
        rows.append(_row("sharded", f"per-block cost, {name}, n = {costs['n']}, {block} columns, 1 core", costs[name],
                         float("nan"), "s", float("nan"), "-", None))
    rows.append(_row("sharded", "n x n float64 add, n = 2048 (one tree level's work)", costs["add"], float("nan"), "s",
                     float("nan"), "-", None))
    rows.append(_row("sharded", "Krum scores on rank 0, n = 2048", costs["krum_scores_2048"], float("nan"), "s",
                     float("nan"), "-", None))
    for label, value in (("tree message (8 MiB, rank 1 -> 0)", bandwidth["p2p_Bps"]),
                         ("weights columns gather", bandwidth["gather_columns_Bps"]),
                         ("Alltoallw exchange, received per rank", alltoall)):
        rows.append(_row("sharded", f"bandwidth, {label}, 4 ranks", value / 1e9, float("nan"), "GB/s", float("nan"), "-",
                         None))
    for p in _projection(costs, bandwidth, alltoall):
        rows.append(_row("sharded", f"projection, 10,000 x 1e6, {p['ranks']} ranks ({p['blocks_per_rank']} blocks each)",
                         p["krum_s"], p["median_s"], "s", float("nan"), "-", None,
                         f"Krum {p['krum_s']:.1f} s, median {p['median_s']:.1f} s, FedAvg {p['fedavg_s']:.2f} s, "
                         f"exchange {p['exchange_s']:.1f} s, weights {p['weights_gather_s']:.3f} s; per rank "
                         f"{p['memory_gib']:.1f} GiB of rows (+ tree {p['memory_with_tree_gib'] - p['memory_gib']:.1f} GiB)"))
    for e in _memory_estimates():
        rows.append(_row("sharded", f"memory estimate, 2000 x {e['d']:,}, {e['transport']}, {e['ranks']} ranks",
                         e["gib"], float("nan"), "GiB", float("nan"), "-", None,
                         f"largest: rank {e['rank']}" + (f"; rank 0 {e['rank0_gib']:.1f} GiB" if "rank0_gib" in e else "")))
    for e in _largest_fits():
        rows.append(_row("sharded", f"largest fit on {e['ranks']} node(s) of {e['node_gib']:g} GiB"
                         + (" (rank-0 path)" if e["ranks"] == 1 else ""), e["cohort_at_1e6"], e["d_at_2000"], "rows / d",
                         float("nan"), "-", None, f"cohort {e['cohort_at_1e6']:,} at d = 1e6; d = {e['d_at_2000']:,} "
                         "at a cohort of 2,000"))
    return rows


def bench_state(quick: bool = False) -> list[dict]:
    """SCAFFOLD's client state: the file store's cost against memory, checkpoints, peak RSS."""
    from .algorithms import ScaffoldServer
    from .client_state import ClientStateStore
    from .config import load
    from .protocol import RECORD, RECORD_FIELDS
    from .results import ResultsWriter
    from .rounds import Updates

    clients, d = (200 if quick else 1000), 100_000
    cfg = load(None, ["algorithm.name=scaffold", f"clients.total={clients}", "clients.per_round=10"])
    rows = []
    with tempfile.TemporaryDirectory(dir=os.getcwd()) as tmp:  # the working directory's disk, as a run's store
        stores = {"memory": ClientStateStore(("control",), clients, d),
                  "file": ClientStateStore(("control",), clients, d, os.path.join(tmp, "state"))}
        rng = np.random.default_rng(0)
        for k in (10, 100):
            update_rows = (rng.standard_normal((k, d)) * 1e-3).astype(np.float32)
            records = np.zeros((k, len(RECORD_FIELDS)))
            records[:, RECORD["steps"]] = 10
            servers = {kind: ScaffoldServer(cfg, d, np.ones(clients), store) for kind, store in stores.items()}
            round_index = [0]

            def one_round(kind: str, k: int = k, update_rows=update_rows, records=records, servers=servers) -> None:
                cohort = np.sort(np.random.default_rng(round_index[0]).choice(clients, k, replace=False))
                servers[kind].downlink(cohort)
                servers[kind].after_round(Updates(cohort, records, [k], rows=update_rows), round_index[0])
                if kind == "file":
                    round_index[0] += 1

            times = alternate({kind: (lambda kind=kind: one_round(kind)) for kind in ("memory", "file")},
                              3 if quick else 9)
            rows.append(_row("state", f"rank 0 state work per round, {clients} clients x d {d}, cohort {k}",
                             times["file"], times["memory"], "s", times["file"] / times["memory"], "<= 2x",
                             times["file"] <= 2 * times["memory"], "file store / memory store"))
        store = stores["file"]
        store.last_round[:] = 0  # every client has state
        layout = [{"name": "w", "shape": [d], "offset": 0, "numel": d}]
        writer = ResultsWriter(os.path.join(tmp, "c.h5"), config_yaml="", world_size=1, seed=0, layout=layout,
                               clients=store)
        weights = np.zeros(d, dtype=np.float32)
        start = time.perf_counter()
        writer.checkpoint(0, weights, {})  # a slot's first write: every client's row
        full = time.perf_counter() - start
        writer.checkpoint(0, weights, {})  # the other slot
        for cid in np.sort(rng.choice(clients, 10, replace=False)):  # a round of cohort 10
            store.write("control", int(cid), store.row("control", int(cid)) + 1, 1)
        start = time.perf_counter()
        writer.checkpoint(1, weights, {})
        incremental = time.perf_counter() - start
        writer.close()
        rows.append(_row("state", f"checkpoint after a round of cohort 10, {clients} clients x d {d}", incremental, full,
                         "s", incremental / full, "-", None,
                         f"the 10 changed rows, against every row ({clients * d * 4 / 2**20:.0f} MiB)"))
        for store in stores.values():
            store.close()
        if not quick:
            common = ["--set", "data.name=synthetic", "--set", "clients.total=1000", "--set", "clients.per_round=1000",
                      "--set", "model.hidden=[1000,40]", "--set", "data.synthetic.min_samples=10",
                      "--set", "data.synthetic.max_samples=20", "--set", "rounds=2", "--set", "train.batch_size=20",
                      "--set", "eval.every=2", "--set", "algorithm.name=scaffold"]
            state = 1000 * 101_450 * 4
            for kind in ("memory", "file"):
                _, total, records = _probe_run(3, [*common, "--set", f"algorithm.state_store={kind}",
                                                   "--out", f"{kind}.h5"], tmp)
                peak = records[0]["maxrss"]
                rows.append(_row("state", f"rank 0 peak RSS, SCAFFOLD, 1000 clients all sampled, d 101450, {kind} store",
                                 peak / 2**20, state / 2**20, "MiB", peak / state, "-", None,
                                 f"run took {total:.1f} s; the state is {state / 2**20:.0f} MiB, rows as much again"))
    return rows


# --------------------------------------------------------------------------- accounting


def bench_accounting(quick: bool = False) -> list[dict]:
    """DP-SGD digits (configs/digits_mlp.yaml, sigma = 1), 3 ranks; its cohorts replayed
    through a fresh RunAccountant here, dp-accounting already imported (every run pays
    that import once, before its first epsilon, with either grid)."""
    from dp_accounting import rdp  # noqa: F401 - the import is not what is measured

    from .config import from_mapping
    from .privacy import accounting
    from .results import load

    rounds = 6 if quick else 12
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "dp.h5")
        subprocess.run([_mpirun(), "-n", "3", sys.executable, "-m", "fedmpi.run", "--config",
                        str(REPO / "configs" / "digits_mlp.yaml"), "--set", "privacy.mode=sample",
                        "--set", "privacy.noise_multiplier=1.0", "--set", f"rounds={rounds}", "--out", out, "--quiet"],
                       env=_env(), capture_output=True, text=True, check=True)
        run = load(out)
    cfg = from_mapping({**run.config, "output": {}})
    accounting._rdp_per_step.cache_clear()
    accounting.epsilon.cache_clear()
    acc = accounting.RunAccountant(cfg)
    spent = []
    for r in range(rounds):
        slots = run.clients[run.clients["round"] == r]
        start = time.perf_counter()
        acc.after_round(slots["client_id"].to_numpy(), slots["num_samples"].to_numpy())
        spent.append(time.perf_counter() - start)
    skip = 2
    round_s = float(np.median(run.rounds["wall_s"][skip:]))
    steady = float(np.median(spent[skip:]))
    sizes = len(set(run.clients["num_samples"].tolist()))
    whole = sum(spent) / float(run.rounds["wall_s"].sum())
    return [
        _row("accounting", "RDP accounting per round, steady state, 16 clients", steady, round_s, "s", steady / round_s,
             "<= 5%", steady / round_s <= 0.05, f"{len(accounting.RDP_ORDERS)} orders"),
        _row("accounting", "RDP accounting, first round", spent[0], round_s, "s", spent[0] / round_s, "-", None,
             f"per-step RDP of {sizes} client sizes computed once"),
        _row("accounting", f"RDP accounting over the whole {rounds}-round run", sum(spent),
             float(run.rounds["wall_s"].sum()), "s", whole, "-", None),
    ]



SECTIONS = {"e2e": bench_e2e, "comm": bench_comm, "aggregation": bench_aggregation, "dp": bench_dp,
            "startup": bench_startup, "memory": bench_memory, "sweep": bench_sweep, "sharded": bench_sharded,
            "state": bench_state, "accounting": bench_accounting}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    columns = ["section", "case", "fedmpi", "baseline", "unit", "ratio", "target", "met", "note"]
    cells = [[_fmt(r[c]) if c != "met" else {True: "met", False: "NOT met", None: "-"}[r[c]] for c in columns]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_loop"]:
        print(json.dumps(framework_free_loop()))
        return 0
    if argv[:1] == ["_comm"]:
        comm_worker([int(a) for a in argv[1:]], repeats=21)
        return 0
    if argv[:1] == ["_probe"]:
        return probe(argv[1], argv[argv.index("--") + 1:])
    if argv[:1] == ["_sharded"]:
        sharded_worker(argv[1], argv[2], *map(int, argv[3:7]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m fedmpi.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION", help=f"{', '.join(SECTIONS)} or krum (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write every row as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in SECTIONS and name != "krum"]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r} (choose from {', '.join(SECTIONS)}, krum)")
    if args.sections == ["krum"]:
        r = bench_krum(64, 1_000_000, 7)
        verdict = "met" if r["ratio"] <= r["target"] else "NOT met"
        print(f"Krum distances, n = 64, d = 1e+06: {r['krum_distances_s'] * 1e3:.1f} ms; float32 GEMM "
              f"(64x1e+06) @ (1e+06x64): {r['sgemm_s'] * 1e3:.1f} ms; ratio {r['ratio']:.2f}x (target <= 2x: {verdict})")
        return 0
    rows = []
    for name in args.sections or list(SECTIONS):
        start = time.perf_counter()
        rows.extend(SECTIONS[name](args.quick))
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    print_table(rows)
    payload = json.dumps({"python": sys.version.split()[0], "cores": os.cpu_count(), "rows": rows}, indent=2)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(payload + "\n")
    print(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
