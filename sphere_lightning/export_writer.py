"""The folder an export writes: weights and config, tokenizer, ``README.md`` model card and
``edits.jsonl``, which plain ``transformers`` loads without sphere_lightning.

:func:`write_export` is the one writer; :mod:`sphere_lightning.export` (from a checkpoint) and
:class:`~sphere_lightning.callbacks.ExportCallback` (from the run in memory) describe the run in
an :class:`EditedRun` and call it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

import sphere_lightning
from sphere_lightning.cache import temporary_sibling
from sphere_lightning.data.requests import EditRequest
from sphere_lightning.errors import ConfigError

#: The SPHERE settings a model card reports, in this order.
SPHERE_SETTINGS = ("cumulative_ratio", "suppression", "stage", "reference")

#: Edit metrics a model card reports, in this order (others follow, sorted).
CARD_METRICS = ("efficacy", "generalization", "specificity", "fluency")


@dataclass(frozen=True)
class EditedRun:
    """What an export says about the run that edited the model.

    Attributes:
        base_model: The model the run edited, as the run named it (``model.model``).
        run_dtype: The dtype the run edited in.
        editor: ``class_path`` of the editor.
        edited_parameters: Names of the parameters that differ from the base model.
        sphere: The settings (:data:`SPHERE_SETTINGS`) of each SPHERE projection callback of
            the run; ``[]`` when the run had none, ``None`` when that is unknown.
        sphere_source: The ``config.yaml`` ``sphere`` was read from (``None``: the run's
            callbacks, or no config found).
        requests: The edited facts, in edit order.
        source: What the export was made from (a checkpoint, or the run in memory).
        pre_edit_metrics: Edit metrics before the first edit, over every fact of the run.
        final_edit_metrics: The last lifelong edit metrics (``num_evaluated``: edits so far).
    """

    base_model: str
    run_dtype: str
    editor: str
    edited_parameters: list[str]
    sphere: list[dict[str, Any]] | None
    sphere_source: str | None
    requests: list[EditRequest]
    source: str
    pre_edit_metrics: dict[str, float] = field(default_factory=dict)
    final_edit_metrics: dict[str, float] = field(default_factory=dict)


class OutputFolderError(ConfigError, FileExistsError):
    """The export folder is a file, or a non-empty folder and overwriting was not asked for."""


def check_out_dir(out_dir: str | Path, overwrite: bool, flag: str = "--out") -> None:
    """Raise :class:`OutputFolderError` (naming ``flag``) if ``out_dir`` is a file, or a
    non-empty folder while ``overwrite`` is false."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputFolderError(f"`{flag}` {str(out_dir)!r} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputFolderError(
            f"`{flag}` {str(out_dir)!r} exists and is not empty; choose another folder or set "
            "overwrite (`--overwrite`, `overwrite=True`) to replace it"
        )


def request_record(position: int, request: EditRequest) -> dict[str, Any]:
    """One line of ``edits.jsonl``: the fact and its position in the edit order."""
    record: dict[str, Any] = {} if request.case_id is None else {"case_id": request.case_id}
    record.update(
        prompt=request.prompt,
        subject=request.subject,
        target_new=request.target_new,
        target_true=request.target_true,
        position=position,
    )
    return record


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _sphere_line(run: EditedRun) -> str:
    if run.sphere is None:
        return "unknown (no run config found)"
    if not run.sphere:
        return "none"
    return "; ".join(
        f"β (cumulative_ratio) = {s['cumulative_ratio']}, α (suppression) = {s['suppression']}, "
        f"stage `{s['stage']}`, reference `{s['reference']}`"
        for s in run.sphere
    )


def _metrics_section(run: EditedRun) -> str:
    pre, final = run.pre_edit_metrics, run.final_edit_metrics
    names = [m for m in CARD_METRICS if m in pre or m in final]
    names += sorted((set(pre) | set(final)) - set(CARD_METRICS) - {"num_evaluated"})
    if not names:
        return "No edit metrics were recorded.\n"
    rows = "".join(
        f"| {m} | {_number(pre.get(m, '—'))} | {_number(final.get(m, '—'))} |\n" for m in names
    )
    evaluated = final.get("num_evaluated")
    after = f"after {int(evaluated)} edits, over those facts" if evaluated else "not measured"
    return (
        "| metric | pre-edit | final |\n|---|---|---|\n" + rows + "\nPre-edit: before the first "
        "edit, over every fact of the run. Final: the run's last lifelong evaluation "
        f"({after}).{' Fluency is ×100.' if 'fluency' in names else ''}\n"
    )


def model_card(run: EditedRun, out_dir: Path, dtype: str) -> str:
    """The ``README.md`` of an export: what was edited, how, how well, and how to load it."""
    parameters = "\n".join(f"- `{name}`" for name in run.edited_parameters)
    sphere_source = f" (read from `{run.sphere_source}`)" if run.sphere_source else ""
    return f"""---
library_name: transformers
tags:
- knowledge-editing
- sphere_lightning
---

# {out_dir.name}

`{run.base_model}` with {len(run.requests)} facts written into it by sequential knowledge
editing. Only the parameters listed below differ from the base model.

| | |
|---|---|
| base model | `{run.base_model}` (edited in {run.run_dtype}) |
| weights | {dtype} |
| editor | `{run.editor}` |
| SPHERE | {_sphere_line(run)}{sphere_source} |
| edits | {len(run.requests)} (`edits.jsonl`, in edit order) |
| exported | {datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")} from {run.source} |
| sphere_lightning | {sphere_lightning.__version__} |

Edited parameters:

{parameters}

## Edit metrics

{_metrics_section(run)}
## Use

Plain transformers; sphere_lightning is not needed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out_dir}")
tokenizer = AutoTokenizer.from_pretrained("{out_dir}")
```

`edits.jsonl` lists the edited facts, one JSON object per line: `case_id` (when the data set
has one), `prompt` (`{{}}` marks the subject), `subject`, `target_new`, `target_true` and
`position` in the edit order.
"""


def write_export(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    run: EditedRun,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the export folder: weights and config, tokenizer, model card and ``edits.jsonl``.

    Everything goes into a temporary folder beside ``out_dir``, which is renamed to ``out_dir``
    once complete, so ``out_dir`` never holds a half-written export. A non-empty ``out_dir`` is
    refused unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_sibling(out_dir)
    partial.mkdir()
    try:
        model.save_pretrained(partial)  # safetensors (the only format of transformers ≥ 5)
        tokenizer.save_pretrained(partial)
        dtype = str(model.dtype).removeprefix("torch.")
        (partial / "README.md").write_text(model_card(run, out_dir, dtype), encoding="utf-8")
        lines = [
            json.dumps(request_record(i, r), ensure_ascii=False) for i, r in enumerate(run.requests)
        ]
        (partial / "edits.jsonl").write_text("".join(f"{line}\n" for line in lines), "utf-8")
        check_out_dir(out_dir, overwrite)  # again: it may have been filled meanwhile
        if out_dir.exists():
            old = temporary_sibling(out_dir)
            out_dir.rename(old)
            partial.rename(out_dir)
            shutil.rmtree(old)
        else:
            partial.rename(out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out_dir
