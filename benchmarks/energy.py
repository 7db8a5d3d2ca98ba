"""Hyperspherical energy: ``hyperspherical_energy`` against the naive full pairwise computation.

Reproduce (n = 1024, 4096, 14336 neurons of dimension 4096):

    python benchmarks/energy.py

A quick subset:

    python benchmarks/energy.py --sizes 1024,4096

Every case runs in a fresh subprocess that loads the weight from a file (generated once per
size). Peak memory is the growth of the process's peak RSS (``VmHWM``, the counter behind
``ru_maxrss``) during the first run over the RSS just before it, the peak having been reset to the
current RSS after loading (``/proc/self/clear_refs``), so it counts what the computation
itself allocates, output included. Timings are medians of ``--repeats`` runs
(``--naive-repeats`` for the baseline) after a small warm-up.

* ``naive``: the obvious implementation in float64: normalise the rows, the full ``n x n`` Gram
  matrix, ``2 - 2 G`` clamped at ``eps²``, ``f_s``, zero the diagonal, sum. Skipped (and marked so)
  where its estimated peak, ``3 n² + 2 n d`` float64 values, exceeds ``--naive-limit-gb``.
* ``ours``: ``hyperspherical_energy(weight, s)`` with its defaults (float32 Gram blocks of 1024 x
  1024 on and above the diagonal, everything after the product in float64).

The weight is float32, ``A diag(s) B`` with ``s_k ∝ k^-1/2`` scaled to unit entry variance, plus
Gaussian noise of standard deviation 0.1.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _memory import maxrss_bytes, reset_peak_rss

METHODS = ("naive", "ours")


def make_weight(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(n, d)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    weight = (torch.randn(n, k, generator=g) * s) @ torch.randn(k, d, generator=g)
    weight /= s.square().sum().sqrt()
    weight += 0.1 * torch.randn(n, d, generator=g)
    return weight


def naive_energy(weight: torch.Tensor, s: float, eps: float = 1e-6) -> torch.Tensor:
    """The obvious float64 implementation: full n x n Gram and distance matrices."""
    w = weight.double()
    w_hat = w / w.norm(dim=1, keepdim=True)
    sq = (2 - 2 * (w_hat @ w_hat.T)).clamp_min(eps * eps)
    values = -0.5 * torch.log(sq) if s == 0 else sq.pow(-0.5 * s)
    values.fill_diagonal_(0)
    return values.sum()


def naive_bytes(n: int, d: int) -> int:
    return 8 * (3 * n * n + 2 * n * d)


def run_method(method: str, weight: torch.Tensor, s: float) -> torch.Tensor:
    if method == "naive":
        return naive_energy(weight, s)
    from sphere_lightning.functional import hyperspherical_energy

    return hyperspherical_energy(weight, s)


def worker(args: argparse.Namespace) -> None:
    """One method on one size, in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    run_method(args.worker, make_weight(64, 96, seed=1), args.s)  # warm-up
    weight = torch.load(args.data, weights_only=True)
    gc.collect()
    before = reset_peak_rss()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        value = float(run_method(args.worker, weight, args.s))
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = maxrss_bytes() - before
    print(json.dumps({"times": times, "peak_extra": peak, "value": value}))


def spawn(method: str, data: Path, repeats: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--data", str(data)]
    cmd += ["--repeats", str(repeats), "--threads", str(args.threads), "--s", str(args.s)]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1024,4096,14336", help="comma-separated neuron counts n"
    )
    parser.add_argument("--dim", type=int, default=4096, help="neuron dimension d")
    parser.add_argument("--s", type=float, default=1.0, help="energy exponent s")
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (median)")
    parser.add_argument("--naive-repeats", type=int, default=1, help="runs of naive (median)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--naive-limit-gb",
        type=float,
        default=8.0,
        help="skip naive where its estimated peak exceeds this many GB (default 8)",
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",") if x]
    d = args.dim
    print(
        f"torch {torch.__version__}, {args.threads} threads, d = {d}, s = {args.s}; "
        f"ours: median of {args.repeats}, naive: median of {args.naive_repeats}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "weight.pt"
        for n in sizes:
            torch.save(make_weight(n, d), data)
            need = naive_bytes(n, d)
            naive = None
            if need <= args.naive_limit_gb * 1e9:
                print(f"  n = {n}: naive ...", file=sys.stderr, flush=True)
                naive = spawn("naive", data, args.naive_repeats, args)
            print(f"  n = {n}: ours ...", file=sys.stderr, flush=True)
            ours = spawn("ours", data, args.repeats, args)
            rows.append((n, need, naive, ours))

    print()
    print(
        f"| {'n':>6} | {'naive s':>8} | {'ours s':>7} | {'speedup':>7} | {'naive MiB':>9} "
        f"| {'ours MiB':>8} | {'rel. diff':>9} | {'energy (ours)':>17} |"
    )
    print("|" + "|".join("-" * w for w in (8, 10, 9, 9, 11, 10, 11, 19)) + "|")
    for n, need, naive, ours in rows:
        t_ours = statistics.median(ours["times"])
        mo = ours["peak_extra"] / 2**20
        if naive is None:
            skipped = f"skipped: needs ~{need / 1e9:.1f} GB > {args.naive_limit_gb:g} GB"
            print(
                f"| {n:>6} | {'—':>8} | {t_ours:>7.2f} | {'—':>7} | {'—':>9} | {mo:>8.0f} "
                f"| {'—':>9} | {ours['value']:>17.10e} | {skipped}"
            )
            continue
        t_naive = statistics.median(naive["times"])
        rel = abs(ours["value"] - naive["value"]) / abs(naive["value"])
        print(
            f"| {n:>6} | {t_naive:>8.2f} | {t_ours:>7.2f} | {t_naive / t_ours:>6.1f}x "
            f"| {naive['peak_extra'] / 2**20:>9.0f} | {mo:>8.0f} | {rel:>9.1e} "
            f"| {ours['value']:>17.10e} |"
        )


if __name__ == "__main__":
    main()
