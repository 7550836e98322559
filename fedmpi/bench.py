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
               784-200-200-10 and McMahan et al.'s CNN. Target <= 3x.
``startup``    time to the first round at 2, 4 and 16 ranks; which heavy modules each
               rank imported (h5py, matplotlib, scikit-learn, pandas, dp-accounting stay
               out of workers that do not use them).
``memory``     peak RSS of rank 0 against cohort x d x 4 bytes for a 1000-client cohort
               of a 1e5-parameter model, with transport gather and reduce.
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


def _dp_step_times(model_cfg, batch: int, repeats: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from .models import FlatModel, build_model
    from .privacy.dpsgd import PerExampleGradients

    module = build_model(model_cfg, (1, 28, 28), 10)
    flat = FlatModel(module)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
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
            "startup": bench_startup, "memory": bench_memory, "accounting": bench_accounting}


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
