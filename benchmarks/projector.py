"""SPHERE projector: ``project_delta`` against a plain ``d x d`` eigh of ``C = Ŵᵀ Ŵ / n``.

Reproduce (all four shapes, ~15 min on 2 cores; the plain 14336- and 18944-wide eighs are most
of it):

    python benchmarks/projector.py

A quick subset:

    python benchmarks/projector.py --shapes 576x1536,6400x1600

Every case runs in a fresh subprocess that loads the inputs from a file (generated once per
size). Peak memory is the growth of the process's peak RSS (``VmHWM``, the counter behind
``ru_maxrss``) during the first run over the RSS just before it, the peak having been reset to the
current RSS after loading (``/proc/self/clear_refs``), so it counts what the computation
itself allocates, output included. Timings are medians of ``--repeats`` runs
(``--plain-repeats`` for the baseline) after a small warm-up.

* ``plain``: the formula as written, in float32 (the dtype the accuracy is compared in): row
  normalise, ``C = Ŵᵀ Ŵ / n`` (``d x d``), ``torch.linalg.eigh``, cumulative-ratio cutoff over the
  ``d`` eigenvalues, ``ΔW - α ΔW U Uᵀ``.
* ``ours``: ``project_delta(delta, weight, β, α)`` with its defaults (float32 for a float32 weight,
  on the ``min(n, d)``-sized Gram matrix).
* ``fp64``: ``project_delta(..., dtype=torch.float64)``, the float64 reference for accuracy (the
  tests check it against a float64 ``d x d`` eigh to 1e-10).

Weights are float32 ``A diag(s) B`` with ``s_k ∝ k^-1/2`` (k up to ``min(n, d)``), scaled to unit
entry variance, plus Gaussian noise of standard deviation 0.1; ``ΔW`` is standard Gaussian.
Differences are ``max|x - y| / max|y|`` (max-relative) and ``‖x - y‖_F / ‖y‖_F`` (norm-relative).
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

SHAPES = {
    "576x1536": "SmolLM2 down_proj",
    "6400x1600": "GPT-2-XL c_proj (Linear convention)",
    "4096x14336": "Llama-3-8B down_proj",
    "3584x18944": "Qwen2.5-7B down_proj",
}
METHODS = ("plain", "ours", "fp64")


def parse_shape(text: str) -> tuple[int, int]:
    n, d = text.lower().split("x")
    return int(n), int(d)


def make_inputs(n: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 weight with a power-law spectrum plus noise, and a Gaussian update."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, d)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    left = torch.randn(n, k, generator=g) * s
    right = torch.randn(k, d, generator=g)
    weight = left @ right
    del left, right
    weight /= s.square().sum().sqrt()
    weight += 0.1 * torch.randn(n, d, generator=g)
    delta = torch.randn(n, d, generator=g)
    return weight, delta


def plain_project(
    delta: torch.Tensor, weight: torch.Tensor, beta: float, alpha: float
) -> tuple[torch.Tensor, int]:
    """The formula as written, in float32: eigh of the d x d matrix C."""
    w = weight.float()
    w_hat = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n, d = w_hat.shape
    cov = w_hat.T @ w_hat / n
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    ratios = torch.cumsum(evals, 0) / evals.sum()
    r = min(1 + int((ratios <= beta).sum()), d)
    u = evecs[:, :r]
    return delta - alpha * (delta @ u) @ u.T, r


def run_method(method: str, delta, weight, beta: float, alpha: float):
    if method == "plain":
        return plain_project(delta, weight, beta, alpha)
    from sphere_lightning.functional import project_delta

    dtype = torch.float64 if method == "fp64" else None
    return project_delta(delta, weight, beta, alpha, dtype=dtype)


def worker(args: argparse.Namespace) -> None:
    """One method on one shape, in this (fresh) process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    # Warm-up on a small problem: library initialisation is not part of the measurement.
    w_small, d_small = make_inputs(64, 96, seed=1)
    run_method(args.worker, d_small, w_small, args.beta, args.alpha)
    data = torch.load(args.data, weights_only=True)
    weight, delta = data["weight"], data["delta"]
    del data
    gc.collect()
    before = reset_peak_rss()
    times = []
    result = None
    for _ in range(args.repeats):
        result = None  # the previous output is not part of the next run's footprint
        start = time.perf_counter()
        result = run_method(args.worker, delta, weight, args.beta, args.alpha)
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = maxrss_bytes() - before
    projected, rank = result
    torch.save(projected, args.out)
    print(json.dumps({"times": times, "peak_extra": peak, "rank": rank}))


def spawn(method: str, data: Path, out: Path, repeats: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        method,
        "--data",
        str(data),
        "--out",
        str(out),
        "--repeats",
        str(repeats),
        "--threads",
        str(args.threads),
        "--beta",
        str(args.beta),
        "--alpha",
        str(args.alpha),
    ]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def differences(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(max-relative, norm-relative) difference of x from the reference y, in float64."""
    x, y = x.double(), y.double()
    diff = x - y
    return float(diff.abs().max() / y.abs().max()), float(diff.norm() / y.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        default=",".join(SHAPES),
        help="comma-separated n x d shapes, e.g. 576x1536,4096x14336 (default: all four)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours (median)")
    parser.add_argument(
        "--plain-repeats", type=int, default=1, help="runs of the plain d x d eigh (median)"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument("--beta", type=float, default=0.5, help="cumulative ratio β")
    parser.add_argument("--alpha", type=float, default=0.5, help="suppression α")
    parser.add_argument(
        "--no-fp64", action="store_true", help="skip the float64 reference (accuracy only)"
    )
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    torch.set_num_threads(args.threads)
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    print(
        f"torch {torch.__version__}, {args.threads} threads, β = {args.beta}, α = {args.alpha}; "
        f"ours: median of {args.repeats}, plain: median of {args.plain_repeats}"
    )
    timing_rows, accuracy_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n, d in shapes:
            label = f"{n}x{d}"
            weight, delta = make_inputs(n, d)
            torch.save({"weight": weight, "delta": delta}, tmp / "data.pt")
            del weight, delta
            results = {}
            methods = [m for m in METHODS if not (m == "fp64" and args.no_fp64)]
            for method in methods:
                repeats = {"plain": args.plain_repeats, "ours": args.repeats, "fp64": 1}[method]
                print(f"  {label}: {method} ...", file=sys.stderr, flush=True)
                results[method] = spawn(
                    method, tmp / "data.pt", tmp / f"{method}.pt", repeats, args
                )
            outs = {m: torch.load(tmp / f"{m}.pt", weights_only=True) for m in methods}
            t_plain = statistics.median(results["plain"]["times"])
            t_ours = statistics.median(results["ours"]["times"])
            timing_rows.append(
                (
                    label,
                    SHAPES.get(label, ""),
                    results["ours"]["rank"],
                    results["plain"]["rank"],
                    t_plain,
                    t_ours,
                    t_plain / t_ours,
                    results["plain"]["peak_extra"] / 2**20,
                    results["ours"]["peak_extra"] / 2**20,
                )
            )
            row = [label, *differences(outs["ours"], outs["plain"])]
            if "fp64" in outs:
                row += [
                    *differences(outs["ours"], outs["fp64"]),
                    *differences(outs["plain"], outs["fp64"]),
                    statistics.median(results["fp64"]["times"]),
                    results["fp64"]["rank"],
                ]
            accuracy_rows.append(row)
            del outs

    print()
    print("Time and peak extra memory (plain = float32 d x d eigh; ours = project_delta default)")
    print(
        f"| {'n x d':<11} | {'layer':<35} | {'r ours':>6} | {'r plain':>7} | {'plain s':>8} "
        f"| {'ours s':>7} | {'speedup':>7} | {'plain MiB':>9} | {'ours MiB':>8} |"
    )
    print("|" + "|".join("-" * w for w in (13, 37, 8, 9, 10, 9, 9, 11, 10)) + "|")
    for label, layer, r_ours, r_plain, tp, to, ratio, mp, mo in timing_rows:
        print(
            f"| {label:<11} | {layer:<35} | {r_ours:>6} | {r_plain:>7} | {tp:>8.2f} | {to:>7.2f} "
            f"| {ratio:>6.1f}x | {mp:>9.0f} | {mo:>8.0f} |"
        )
    print()
    print("Difference of the projected ΔW (max-rel = max|x-y|/max|y|, norm-rel = ‖x-y‖/‖y‖)")
    header = f"| {'n x d':<11} | {'ours vs plain: max-rel':>22} | {'norm-rel':>9} |"
    rule = "|" + "|".join("-" * w for w in (13, 24, 11))
    if not args.no_fp64:
        header += (
            f" {'ours vs fp64: max-rel':>21} | {'norm-rel':>9} | {'plain vs fp64: max-rel':>22} "
            f"| {'norm-rel':>9} | {'fp64 s':>7} | {'r fp64':>6} |"
        )
        rule += "|" + "|".join("-" * w for w in (23, 11, 24, 11, 9, 8))
    print(header)
    print(rule + "|")
    for row in accuracy_rows:
        line = f"| {row[0]:<11} | {row[1]:>22.2e} | {row[2]:>9.2e} |"
        if len(row) > 3:
            line += (
                f" {row[3]:>21.2e} | {row[4]:>9.2e} | {row[5]:>22.2e} | {row[6]:>9.2e} "
                f"| {row[7]:>7.2f} | {row[8]:>6} |"
            )
        print(line)


if __name__ == "__main__":
    main()
