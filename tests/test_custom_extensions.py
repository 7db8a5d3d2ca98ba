"""The documented extension points, as a user writes them: the custom delta transform and the
custom observer shown in the docs (read from the Markdown, not copied), run from YAML."""

from __future__ import annotations

import json
import re

import pytest

from sphere_lightning.cli import cli_main
from tests.helpers import ROOT, tensorboard_scalars, tiny_alphaedit_flags

MAX_NORM = 0.01
#: The run: the default config with the two classes listed in ``trainer.callbacks``.
EXTENSIONS_YAML = """
model:
  batch_metrics: false
  fluency_prompts: 0
data:
  dataset: {data}
  num_edits: 2
  edits_per_step: 2
trainer:
  default_root_dir: {root}
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger:
    init_args: {{save_dir: {logs}}}
  callbacks:
    - class_path: my_transforms.ClipDeltaNorm
      init_args: {{max_norm: {max_norm}}}
    - class_path: my_observers.WeightNorm
      init_args: {{every_n_steps: 1}}
"""


def _documented_block(marker: str) -> str:
    """The first ```python block of README.md or docs/ that contains ``marker``."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        if not page.exists():
            continue
        for block in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S):
            if marker in block:
                return block
    raise AssertionError(f"no documented example contains {marker!r}")


def _code_lines(block: str) -> int:
    return sum(1 for line in block.splitlines() if line.strip() and not line.startswith("from "))


def test_documented_transform_and_observer_run_from_yaml(
    tmp_path, tiny_model_dir, requests, write_rome_json, monkeypatch
):
    transform = _documented_block("class ClipDeltaNorm(DeltaTransform)")
    observer = _documented_block("class WeightNorm(EditObserver)")
    assert _code_lines(transform) <= 10 and _code_lines(observer) <= 11  # "ten lines each"
    (tmp_path / "my_transforms.py").write_text(transform)
    (tmp_path / "my_observers.py").write_text(observer)
    monkeypatch.syspath_prepend(str(tmp_path))

    data = write_rome_json(requests[:2], tmp_path / "facts.json")
    overlay = tmp_path / "extensions.yaml"
    overlay.write_text(
        EXTENSIONS_YAML.format(data=data, logs=tmp_path / "logs", root=tmp_path, max_norm=MAX_NORM)
    )
    configs = ["--config", str(ROOT / "configs" / "edit.yaml"), "--config", str(overlay)]
    flags = [f"--model.model={tiny_model_dir}", *tiny_alphaedit_flags(num_steps=2)]
    cli = cli_main(["fit", *configs, *flags])
    scalars = tensorboard_scalars(tmp_path / "logs")
    module = cli.model
    for name in module.edited_parameter_names:
        # The transform: the editor's ΔW was larger than the limit (its scalar says so), and the
        # update that landed is clipped to it.
        raw_norm = scalars[f"clip/norm/{name}"][1]
        assert raw_norm > MAX_NORM
        applied = module.edited_weight(name).double() - module.original_weights[name].double()
        assert float(applied.norm()) == pytest.approx(MAX_NORM, rel=1e-4)
        # The observer: its value at the baseline and after the step, and the change.
        weight_norms = scalars[f"weight_norm/{name}"]
        assert set(weight_norms) == {0, 1}
        assert weight_norms[1] == pytest.approx(float(module.edited_weight(name).norm()), rel=1e-6)
        change = scalars[f"weight_norm_change/{name}"][1]
        assert change == pytest.approx(weight_norms[1] - weight_norms[0], rel=1e-4, abs=1e-6)
    (summary_path,) = list((tmp_path / "logs").rglob("summary.json"))
    summary = json.loads(summary_path.read_text())
    assert summary["weight_norm"]["final_step"] == 1
    assert set(summary["weight_norm"]["final"]) == {
        f"weight_norm/{n}" for n in module.edited_parameter_names
    }
