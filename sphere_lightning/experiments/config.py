"""The experiment runner's configs: the two runs of a pair (with and without SPHERE), the run
configs derived from a config, configs merged as ``fit --config a.yaml --config b.yaml`` merges
them, dotted ``set`` keys, and suite files."""

from __future__ import annotations

import copy
import importlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sphere_lightning.errors import ConfigError

#: The callback the "without SPHERE" run drops.
SPHERE_CALLBACK = "sphere_lightning.callbacks.SphereProjectionCallback"
TENSORBOARD_LOGGER = "lightning.pytorch.loggers.TensorBoardLogger"


@dataclass(frozen=True)
class Run:
    """One of the two runs of a comparison: its folder name under ``--out`` and its label."""

    name: str
    label: str


WITHOUT_SPHERE = Run("without_sphere", "without SPHERE")
WITH_SPHERE = Run("with_sphere", "with SPHERE")
#: Table columns and figure legends follow this order.
RUNS = (WITHOUT_SPHERE, WITH_SPHERE)
#: Values of ``--runs`` and of a suite's ``runs``.
RUN_CHOICES = ("both", *(run.name for run in RUNS))


def is_sphere_callback(entry: Any) -> bool:
    """Whether a ``trainer.callbacks`` entry (``class_path`` mapping or string) is SPHERE's
    projection or a subclass of it."""
    class_path = entry.get("class_path") if isinstance(entry, dict) else entry
    if not isinstance(class_path, str):
        return False
    if class_path == SPHERE_CALLBACK or class_path.rsplit(".", 1)[-1] == "SphereProjectionCallback":
        return True
    if "." not in class_path:
        return False
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return False  # fit reports the unknown class; here it is simply not SPHERE
    from sphere_lightning.callbacks import SphereProjectionCallback

    return isinstance(cls, type) and issubclass(cls, SphereProjectionCallback)


def _callback_lists(config: dict[str, Any]) -> Iterable[tuple[str, Any]]:
    trainer = config.get("trainer") or {}
    for key in ("callbacks", "callbacks+"):
        if trainer.get(key) is not None:
            yield key, trainer[key]


def count_sphere_callbacks(config: dict[str, Any]) -> int:
    """How many SPHERE callbacks a run config lists."""
    total = 0
    for _, entries in _callback_lists(config):
        entries = entries if isinstance(entries, list) else [entries]
        total += sum(is_sphere_callback(entry) for entry in entries)
    return total


def without_sphere(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a run config with every SPHERE callback removed and nothing else changed."""
    derived = copy.deepcopy(config)
    trainer = derived.get("trainer") or {}
    for key, entries in list(_callback_lists(derived)):
        if isinstance(entries, list):
            trainer[key] = [entry for entry in entries if not is_sphere_callback(entry)]
        elif is_sphere_callback(entries):
            trainer[key] = []
    return derived


def run_config(
    config: dict[str, Any], dataset: str, out: Path, run: Run, num_edits: int | None = None
) -> dict[str, Any]:
    """A copy of ``config`` that edits ``dataset`` and logs to TensorBoard in ``out/<run name>``.

    A TensorBoard logger in ``config`` keeps its other settings; any other logger is replaced,
    so that the run's ``summary.json``, which the comparison reads, lands in ``out/<run name>``.
    """
    derived = copy.deepcopy(config)
    derived.setdefault("data", {})
    derived["data"]["dataset"] = dataset
    if num_edits is not None:
        derived["data"]["num_edits"] = num_edits
    trainer = derived.setdefault("trainer", {})
    logger = trainer.get("logger")
    init_args: dict[str, Any] = {"default_hp_metric": False}
    if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
        init_args = dict(logger.get("init_args") or {})
    init_args.update(save_dir=str(out), name="", version=run.name)
    trainer["logger"] = {"class_path": TENSORBOARD_LOGGER, "init_args": init_args}
    return derived


def write_run_config(config: dict[str, Any], path: Path, source: Path | str, note: str) -> None:
    """Write a derived run config with a header saying where it came from and how to rerun it."""
    header = (
        f"# Derived from {source} by `sphere-lightning experiments`: {note}.\n"
        f"# Rerun by hand from {Path.cwd()} (move the run's folder away first):\n"
        f"#   python -m sphere_lightning fit --config {path}\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


# ------------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Pair:
    """One base editor's comparison: its name (the config's file name, or the suite entry's
    ``name``), config and folder. ``compose`` lists config files that come before ``config``,
    merged in order as ``fit --config a.yaml --config b.yaml`` would merge them."""

    name: str
    config: Path
    directory: Path
    compose: tuple[Path, ...] = ()
    #: ``(dotted key, value)`` set in the merged config after its files (:func:`set_value`).
    settings: tuple[tuple[str, Any], ...] = ()
    #: The runs this pair makes (``None``: the command's ``--runs``, else both).
    runs: tuple[Run, ...] | None = None
    #: The suite entry this pair is one edit order of (a suite's ``seeds``), and that order's
    #: seed; ``None`` for a pair that is not.
    group: str | None = None
    seed: int | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every config file of the pair, in the order they are merged."""
        return (*self.compose, self.config)

    def describe(self) -> str:
        """Its config files joined with ``+``, then its settings (``key=value``)."""
        parts = [str(path) for path in self.files]
        parts += [f"{key}={json.dumps(value)}" for key, value in self.settings]
        return " + ".join(parts)

    def load(self) -> dict[str, Any]:
        """The run config: its files merged in order (:func:`load_config`), then its settings."""
        config = load_config(self.files)
        for key, value in self.settings:
            set_value(config, key, value)
        return config


def merge_configs(base: Any, override: Any) -> Any:
    """``override`` merged into ``base`` as jsonargparse merges a second ``--config``: mappings
    key by key, except that a mapping naming another ``class_path`` replaces the old one whole
    (its ``init_args`` belonged to the other class); lists and plain values are replaced."""
    if not isinstance(base, dict) or not isinstance(override, dict):
        return copy.deepcopy(override)
    if "class_path" in override and override["class_path"] != base.get("class_path"):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = merge_configs(merged[key], value) if key in merged else copy.deepcopy(value)
    return merged


def load_config(files: Sequence[Path]) -> dict[str, Any]:
    """The run config of ``files`` merged in order (:func:`merge_configs`)."""
    config: dict[str, Any] = {}
    for path in files:
        config = merge_configs(config, yaml.safe_load(path.read_text()) or {})
    return config


def set_value(config: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` of ``config`` to ``value`` in place, as a suite entry's ``set`` does.

    ``key`` is dotted, as a ``fit`` flag: ``model.editor.init_args.l2`` or ``data.seed``. In a
    list, a segment is an index (``trainer.callbacks.2``) or the class name of the one entry
    whose ``class_path`` ends with it (``trainer.callbacks.SphereProjectionCallback.init_args.
    suppression``). Every segment but the last must exist; the last may be new. Raises
    a :class:`~sphere_lightning.errors.ConfigError` naming the key and the segment that does not
    resolve.
    """
    parts = key.split(".")
    if not key or not all(parts):
        raise ConfigError(f"`set` key {key!r} should be dotted names, e.g. data.seed")
    node: Any = config
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "the config"
        if isinstance(node, dict):
            if last:
                node[part] = copy.deepcopy(value)
                return
            if part not in node:
                raise ConfigError(f"`set` key {key!r}: {where} has no {part!r}")
            node = node[part]
        elif isinstance(node, list):
            if part.isdigit():
                index = int(part)
                if index >= len(node):
                    raise ConfigError(
                        f"`set` key {key!r}: {where} has {len(node)} entries, no index {index}"
                    )
            else:
                matches = [
                    i
                    for i, item in enumerate(node)
                    if isinstance(item, dict)
                    and str(item.get("class_path", "")).rsplit(".", 1)[-1] == part
                ]
                if len(matches) != 1:
                    found = "no entry" if not matches else f"{len(matches)} entries"
                    raise ConfigError(
                        f"`set` key {key!r}: {where} has {found} of class {part!r} (use an index)"
                    )
                index = matches[0]
            if last:
                node[index] = copy.deepcopy(value)
                return
            node = node[index]
        else:
            raise ConfigError(f"`set` key {key!r}: {where} is a value, not a mapping or list")


@dataclass(frozen=True)
class SuiteEntry:
    """A suite file's entry: its name, config files (merged in order), settings (``set``) and
    runs (``None``: the suite's)."""

    name: str
    files: tuple[Path, ...]
    settings: tuple[tuple[str, Any], ...] = ()
    runs: str | None = None
    #: With a suite's ``seeds``: the entry's own name, and the edit order's seed of this copy.
    group: str | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Suite:
    """A suite file: its entries, ``num_edits`` (``None``: each config's own), ``runs``
    (``None``: both, unless the command's ``--runs`` says otherwise) and ``seeds`` (``None``: one
    run of each entry, in its config's edit order)."""

    entries: tuple[SuiteEntry, ...]
    num_edits: int | None = None
    runs: str | None = None
    seeds: tuple[int, ...] | None = None


#: The top-level keys of a suite file.
SUITE_KEYS = ("configs", "num_edits", "runs", "seeds")

#: The dotted key a suite's ``seeds`` sets in each copy of an entry: the edit order's seed.
SEED_KEY = "data.seed"


def _seeds(path: Path, value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
        or len(set(value)) != len(value)
    ):
        raise ConfigError(
            f"--suite {path}: `seeds` should be a list of distinct integers ≥ 0, got {value!r}"
        )
    return tuple(value)


def _with_seeds(path: Path, entries: list[SuiteEntry], seeds: tuple[int, ...]) -> list[SuiteEntry]:
    """Each entry once per seed: named ``<name>_seed<seed>``, with ``data.seed`` set."""
    copies = []
    for entry in entries:
        if any(key == SEED_KEY for key, _ in entry.settings):
            raise ConfigError(
                f"--suite {path}: entry {entry.name} sets `{SEED_KEY}`, which the suite's "
                "`seeds` sets for each of its runs; remove one of the two"
            )
        copies += [
            SuiteEntry(
                f"{entry.name}_seed{seed}",
                entry.files,
                (*entry.settings, (SEED_KEY, seed)),
                entry.runs,
                group=entry.name,
                seed=seed,
            )
            for seed in seeds
        ]
    return copies


def _runs_choice(path: Path, where: str, value: Any) -> str | None:
    if value is not None and value not in RUN_CHOICES:
        raise ConfigError(
            f"--suite {path}: {where}`runs` should be one of {', '.join(RUN_CHOICES)}, "
            f"got {value!r}"
        )
    return value


def read_suite(path: Path) -> Suite:
    """The pairs a suite file lists (``configs: [...]``, files relative to the file's folder),
    its ``num_edits`` and ``runs``.

    An entry is a config file (named after it) or a mapping with ``name``, ``configs`` (a list
    of files merged in order, as ``fit --config a.yaml --config b.yaml`` merges them) and
    optionally ``set`` (``{dotted key: value}`` set after the merge, :func:`set_value`) and
    ``runs`` (``both``, ``with_sphere`` or ``without_sphere``: which of the pair's runs to make;
    default the suite's ``runs``). With ``seeds: [0, 1, 2]`` every entry runs once per seed, as
    ``<name>_seed<seed>`` with ``data.seed`` set (the order of the facts), and the report adds
    the mean ± standard deviation over the seeds.
    """
    content = yaml.safe_load(path.read_text()) or {}
    configs = content.get("configs") if isinstance(content, dict) else None
    if not isinstance(configs, list) or not configs:
        raise ConfigError(f"--suite {path}: expected `configs:` with a list of config files")
    unknown = sorted(set(content) - set(SUITE_KEYS))
    if unknown:
        raise ConfigError(
            f"--suite {path}: unknown keys {unknown} (allowed: {', '.join(SUITE_KEYS)})"
        )
    num_edits = content.get("num_edits")
    if num_edits is not None and (
        isinstance(num_edits, bool) or not isinstance(num_edits, int) or num_edits < 1
    ):
        raise ConfigError(f"--suite {path}: `num_edits` should be an integer ≥ 1, got {num_edits}")
    runs = _runs_choice(path, "", content.get("runs"))
    seeds = _seeds(path, content.get("seeds"))
    entries: list[SuiteEntry] = []
    for index, entry in enumerate(configs):
        if not isinstance(entry, dict):
            entries.append(SuiteEntry(Path(str(entry)).stem, (path.parent / str(entry),)))
            continue
        name, files, settings = entry.get("name"), entry.get("configs"), entry.get("set", {})
        if not isinstance(name, str) or not name or not isinstance(files, list) or not files:
            raise ConfigError(
                f"--suite {path}: configs[{index}] should be a file name or a mapping with "
                f"`name` (a string) and `configs` (a list of files), got {entry!r}"
            )
        unknown = sorted(set(entry) - {"name", "configs", "set", "runs"})
        if unknown:
            raise ConfigError(
                f"--suite {path}: configs[{index}] ({name}) has unknown keys {unknown} "
                "(allowed: name, configs, set, runs)"
            )
        if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
            raise ConfigError(
                f"--suite {path}: configs[{index}] ({name}): `set` should map dotted keys to "
                f"values, got {settings!r}"
            )
        entries.append(
            SuiteEntry(
                name,
                tuple(path.parent / str(f) for f in files),
                tuple(settings.items()),
                _runs_choice(path, f"configs[{index}] ({name}): ", entry.get("runs")),
            )
        )
    if seeds is not None:
        entries = _with_seeds(path, entries, seeds)
    return Suite(tuple(entries), num_edits, runs, seeds)
