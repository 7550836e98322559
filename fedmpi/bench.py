"""Benchmarks that print measured ratios against a baseline timed in the same run.

    python -m fedmpi.bench krum [--n 64] [--d 1000000] [--repeats 7]
    python -m fedmpi.bench dp [--batch 64] [--repeats 20]

``krum``: Krum's pairwise-distance computation (centered float64 Gram,
:func:`fedmpi.aggregation.pairwise_sq_distances`) against one float32 GEMM of
the same shape, (n, d) x (d, n). Target: at most 2x.

``dp``: one DP-SGD step (per-example clipping, noise, update) against one
non-private SGD step on one thread, batch 64, for the MLP 784-200-200-10 and
McMahan et al.'s MNIST CNN. Target: at most 3x.

The machine may be shared and noisy: the two timings alternate, and medians
are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np


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


def _dp_step_times(model_cfg, batch: int, repeats: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from .models import FlatModel, build_model
    from .privacy import PerExampleGradients

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


def bench_dp(batch: int, repeats: int) -> list[dict]:
    """One DP-SGD step against one non-private SGD step, one thread, for the MLP
    784-200-200-10 and McMahan et al.'s MNIST CNN."""
    import torch

    from .config import ModelConfig

    torch.set_num_threads(1)
    results = []
    for label, cfg in (("MLP 784-200-200-10", ModelConfig(name="mlp", hidden=[200, 200])), ("MNIST CNN", ModelConfig(name="cnn"))):
        t = _dp_step_times(cfg, batch, repeats)
        results.append({"model": label, "batch": batch, "plain_s": t["plain"], "dp_s": t["dp"],
                        "ratio": t["dp"] / t["plain"], "target": 3.0})
    return results


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmpi.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="which", required=True)
    k = sub.add_parser("krum", help="Krum distances vs one float32 GEMM")
    k.add_argument("--n", type=int, default=64)
    k.add_argument("--d", type=int, default=1_000_000)
    k.add_argument("--repeats", type=int, default=7)
    k.add_argument("--json", help="also write the result as JSON here")
    dp = sub.add_parser("dp", help="DP-SGD step vs non-private step")
    dp.add_argument("--batch", type=int, default=64)
    dp.add_argument("--repeats", type=int, default=20)
    dp.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args(argv)

    if args.which == "dp":
        rows = bench_dp(args.batch, args.repeats)
        for row in rows:
            verdict = "met" if row["ratio"] <= row["target"] else "NOT met"
            print(f"{row['model']}, batch {row['batch']}, 1 thread: non-private {row['plain_s'] * 1e3:.2f} ms, "
                  f"DP-SGD {row['dp_s'] * 1e3:.2f} ms, ratio {row['ratio']:.2f}x (target <= 3x: {verdict})")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return 0
    result = bench_krum(args.n, args.d, args.repeats)
    verdict = "met" if result["ratio"] <= result["target"] else "NOT met"
    print(f"Krum distances, n = {result['n']}, d = {result['d']:.0e}: {result['krum_distances_s'] * 1e3:.1f} ms; "
          f"float32 GEMM ({result['n']}x{result['d']:.0e}) @ ({result['d']:.0e}x{result['n']}): "
          f"{result['sgemm_s'] * 1e3:.1f} ms; ratio {result['ratio']:.2f}x (target <= 2x: {verdict})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
