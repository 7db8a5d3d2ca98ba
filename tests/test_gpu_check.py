"""``benchmarks/gpu_check.py`` at the tiny shape on the CPU: the table, the memory, real edits."""

from __future__ import annotations

import importlib

import pytest

from tests.helpers import ROOT


@pytest.fixture
def gpu_check(monkeypatch):
    """The benchmark script as a module (it imports ``_memory`` from its own folder)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("gpu_check")


def test_tiny_run_prints_every_phase_and_edits(gpu_check, capsys):
    args = "--shape tiny --device cpu --batches 2 --edits-per-step 3 --v-num-steps 4"
    results = gpu_check.main(args.split())
    out = capsys.readouterr().out

    for label, _ in gpu_check.PER_BATCH:
        assert f"| {label} |" in out
    for label in ("key statistics", "setup (templates, null-space projectors' eigh)"):
        assert label in out
    assert "peak RSS (benchmarks/_memory.py):" in out
    assert results["memory"]["bytes"] > 0
    assert results["global_step"] == 2
    assert all(v >= 0 for v in results["seconds_per_100_edits"].values())
    assert results["seconds_per_100_edits"]["v* (target values)"] > 0

    # The edits landed: every edited weight moved, and HE was logged before and after.
    changes = results["relative_max_weight_change"]
    assert sorted(changes) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)]
    assert all(change > 1e-4 for change in changes.values())
    assert sorted(results["energy_final"]) == sorted(results["energy_baseline"])
    assert len(results["energy_final"]) == 2
    assert results["energy_final"] != results["energy_baseline"]
    assert results["sphere_ranks"], "SPHERE logged no rank"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ("--device cuda", "CUDA is not available"),
        ("--device cpu --shape llama3-8b", "--allow-slow"),
        ("--device cpu --dtype float8", "`--dtype` should be one of"),
        ("--device cpu --batches 0", "`--batches` should be ≥ 1"),
        ("--device tpu", "`--device` should be cpu or cuda"),
    ],
)
def test_wrong_setups_fail_with_a_message(gpu_check, args, match):
    if "cuda" in args and gpu_check.torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit, match=match):
        gpu_check.main(args.split())
