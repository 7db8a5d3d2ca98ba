"""Export an edited model as a plain Hugging Face folder.

The folder holds what ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` read (``config.json``, ``model.safetensors``, the tokenizer
files), a ``README.md`` model card and ``edits.jsonl`` (the edited facts, in edit order); nothing
in it needs sphere_lightning. Two ways in, one writer:

- :func:`export_checkpoint`: from a checkpoint of a run (``python -m sphere_lightning export``).
  The checkpoint holds only the edited parameters, so the base model is loaded again, checked
  against the run's fingerprint, and the edited values are put into it.
- :func:`~sphere_lightning.callbacks.export.export_module`: from a module in memory, at the end
  of a run (:class:`~sphere_lightning.callbacks.ExportCallback`).

Both describe the run in an :class:`~sphere_lightning.export_writer.EditedRun` and write the folder
with :func:`~sphere_lightning.export_writer.write_export`.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sphere_lightning.callbacks.sphere import SphereProjectionCallback
from sphere_lightning.checkpoints import last_checkpoint
from sphere_lightning.data.datamodule import EditDataModule
from sphere_lightning.errors import ConfigError, MissingFileError, exit_on_user_error
from sphere_lightning.export_writer import SPHERE_SETTINGS, EditedRun, check_out_dir, write_export
from sphere_lightning.models.loading import load_model, resolve_dtype
from sphere_lightning.module import (
    CheckpointMismatchError,
    base_model_fingerprint,
    checkpoint_meta,
)

# -- SPHERE settings --------------------------------------------------------------------------


def _sphere_defaults() -> dict[str, Any]:
    parameters = inspect.signature(SphereProjectionCallback.__init__).parameters
    return {name: parameters[name].default for name in SPHERE_SETTINGS}


def sphere_settings_from_config(path: str | Path) -> list[dict[str, Any]]:
    """The SPHERE callbacks' settings in a resolved run config (the ``config.yaml`` LightningCLI
    saves in the log folder); arguments the config leaves out take the class defaults."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    settings = []
    for entry in callbacks:
        if not isinstance(entry, dict):
            continue
        if str(entry.get("class_path", "")).rsplit(".", 1)[-1] != SphereProjectionCallback.__name__:
            continue
        values = {**_sphere_defaults(), **(entry.get("init_args") or {})}
        settings.append({name: values[name] for name in SPHERE_SETTINGS})
    return settings


def evaluation_transforms_in_config(path: str | Path) -> list[str]:
    """Class names of the delta transforms with ``stage: evaluation`` in a resolved run config:
    their run evaluated W₀ + T(W − W₀), while its checkpoints hold the live weights W."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return [
        str(entry.get("class_path", "")).rsplit(".", 1)[-1]
        for entry in callbacks
        if isinstance(entry, dict) and (entry.get("init_args") or {}).get("stage") == "evaluation"
    ]


def _run_file(log_dir: str | None, ckpt_path: Path, name: str) -> Path | None:
    """The run's file ``name`` (``config.yaml``, ``summary.json``): in its log folder, or beside
    the ``checkpoints`` folder that holds the checkpoint (a relative log folder may not resolve
    from here)."""
    candidates = [Path(log_dir) / name] if log_dir else []
    if ckpt_path.parent.name == "checkpoints":
        candidates.append(ckpt_path.parent.parent / name)
    return next((p for p in candidates if p.is_file()), None)


def _final_metrics(checkpoint: Mapping[str, Any], ckpt_path: Path) -> dict[str, float]:
    """The last lifelong edit metrics of the edits in ``checkpoint``. A checkpoint written
    after the last batch precedes the run's final evaluation; the run's ``summary.json`` then
    holds those metrics, taken when it describes the same step and the same number of edits
    and the run has finished (one written during the run may hold an earlier evaluation's)."""
    meta = checkpoint["sphere_lightning"]
    final = dict(meta.get("final_edit_metrics") or {})
    if final.get("num_evaluated") == meta["num_edited"]:
        return final
    path = _run_file(meta.get("log_dir"), ckpt_path, "summary.json")
    if path is None:
        return final
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        same = summary.get("finished", True) is not False and (
            summary["global_step"],
            summary["num_edited"],
        ) == (checkpoint["global_step"], meta["num_edited"])
        from_summary = dict(summary["edit"]["final"])
    except (OSError, ValueError, KeyError, TypeError):
        return final
    return from_summary if same and from_summary else final


# -- from a checkpoint ------------------------------------------------------------------------


def load_edited_model(
    checkpoint: Mapping[str, Any], base_model: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model of a checkpoint (``base_model`` to load it from elsewhere), checked against
    the run's fingerprint, with the checkpoint's edited parameters put in.

    Raises:
        CheckpointMismatchError: The base model's weights are not the ones the run edited, or
            the checkpoint holds a parameter the base model lacks.
    """
    meta = checkpoint_meta(checkpoint)
    hparams = checkpoint["hyper_parameters"]
    name = base_model or hparams["model"]
    model, tokenizer = load_model(name, hparams["dtype"])
    edited = {}
    for key, value in checkpoint["state_dict"].items():
        if not key.startswith("model."):
            raise CheckpointMismatchError(f"Checkpoint key {key!r} is not a `model.` parameter")
        edited[key.removeprefix("model.")] = value
    missing = sorted(set(edited) - set(model.state_dict()))
    if missing:
        raise CheckpointMismatchError(
            f"The checkpoint edits {missing}, which base model {name!r} does not have"
        )
    run_base = meta["base_model"]
    fingerprint = base_model_fingerprint(model, list(edited))
    if fingerprint != run_base["fingerprint"]:
        raise CheckpointMismatchError(
            f"The run edited base model {run_base['name']!r} ({run_base['dtype']}, fingerprint "
            f"{str(run_base['fingerprint'])[:12]}…), but {name!r} ({hparams['dtype']}) has other "
            f"weights in the edited parameters (fingerprint {fingerprint[:12]}…); give the "
            "base model the run started from (`--base_model`)"
        )
    result = model.load_state_dict(edited, strict=False)
    unmatched = sorted(set(edited) & set(result.missing_keys)) + list(result.unexpected_keys)
    if unmatched:
        raise CheckpointMismatchError(f"Edited parameters not loaded into the model: {unmatched}")
    return model, tokenizer


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
) -> Path:
    """Export the edited model of a run's checkpoint as a plain Hugging Face folder.

    Args:
        ckpt_path: A checkpoint of an editing run (``.ckpt``).
        out_dir: The folder to create.
        dtype: Weight dtype of the export (``float32``, ``bfloat16``, ``float16``); default: the
            dtype the run edited in.
        overwrite: Replace ``out_dir`` if it exists and is not empty.
        base_model: Load the base model from here instead of the name the run gave (e.g. the
            same weights in another folder); its fingerprint must match the run's.

    Returns:
        ``out_dir``.
    """
    ckpt_path, out_dir = Path(ckpt_path), Path(out_dir)
    check_out_dir(out_dir, overwrite)
    export_dtype = None if dtype is None else resolve_dtype(dtype, flag="--dtype")
    if not ckpt_path.is_file():
        raise MissingFileError(f"`--ckpt_path` {str(ckpt_path)!r}: no such file")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    meta = checkpoint_meta(checkpoint)
    config = _run_file(meta.get("log_dir"), ckpt_path, "config.yaml")
    deferred = [] if config is None else evaluation_transforms_in_config(config)
    if deferred:
        raise ConfigError(
            f"The run of `--ckpt_path` {str(ckpt_path)!r} applies {', '.join(deferred)} with "
            "`stage: evaluation` (only to the weights it evaluates), and its checkpoint holds "
            "the plain live weights: export the evaluated model from the run itself, with "
            "sphere_lightning.callbacks.ExportCallback"
        )
    model, tokenizer = load_edited_model(checkpoint, base_model)
    if export_dtype is not None:
        model.to(export_dtype)
    # LightningCLI adds its own entries (``_instantiator``…) to the saved init arguments.
    data_args = checkpoint["datamodule_hyper_parameters"].items()
    datamodule = EditDataModule(**{k: v for k, v in data_args if not k.startswith("_")})
    run = EditedRun(
        base_model=meta["base_model"]["name"],
        run_dtype=meta["base_model"]["dtype"],
        editor=meta["editor"]["class_path"],
        edited_parameters=[key.removeprefix("model.") for key in checkpoint["state_dict"]],
        sphere=None if config is None else sphere_settings_from_config(config),
        sphere_source=None if config is None else str(config),
        requests=list(datamodule.requests[: meta["num_edited"]]),
        pre_edit_metrics=dict(meta.get("pre_edit_metrics") or {}),
        final_edit_metrics=_final_metrics(checkpoint, ckpt_path),
        source=f"checkpoint `{ckpt_path}`",
    )
    return write_export(model, tokenizer, run, out_dir, overwrite=overwrite)


def main(argv: Sequence[str] | None = None, prog: str = "sphere-lightning export") -> Path:
    """``sphere-lightning export --ckpt_path PATH --out DIR [--overwrite]`` (``prog``: how usage
    names the command).

    A mistake in the input ends it with ``error: <message>`` and exit code 2, a checkpoint that
    does not fit its base model with exit code 1 (no traceback either way).
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Export the edited model of a checkpoint as a plain Hugging Face folder "
        "(weights, tokenizer, README.md model card, edits.jsonl).",
    )
    parser.add_argument(
        "--ckpt_path",
        required=True,
        help="checkpoint of an editing run, or `last` (the newest last.ckpt under ./logs)",
    )
    parser.add_argument("--out", required=True, help="folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--dtype", default=None, help="weight dtype of the export (default: the run's dtype)"
    )
    parser.add_argument(
        "--base_model",
        default=None,
        help="load the base model from here instead of the run's `model.model` (its weights "
        "must be the ones the run edited)",
    )
    args = parser.parse_args(argv)
    with exit_on_user_error():
        ckpt = last_checkpoint("logs") if args.ckpt_path == "last" else Path(args.ckpt_path)
        if ckpt is None:
            raise MissingFileError("`--ckpt_path last`: no last.ckpt under 'logs'")
        out = export_checkpoint(
            ckpt, args.out, dtype=args.dtype, overwrite=args.overwrite, base_model=args.base_model
        )
    rank_zero_info(f"Exported {ckpt} to {out}")
    return out
