"""The command line: ``sphere-lightning <subcommand>`` (the installed script) or, the same,
``python -m sphere_lightning <subcommand>``.

``fit``, ``validate`` and ``test`` go to LightningCLI (:func:`~sphere_lightning.cli.cli_main`),
``export`` to :func:`sphere_lightning.export.main`, ``experiments`` to
:func:`sphere_lightning.experiments.main`. A mistake in the input (a bad flag, a bad data file)
ends any of them with one paragraph, ``error: <message>``, and exit code 2; a ΔW with NaN/inf
with one paragraph and exit code 1; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

#: Every subcommand with its one-line description, in the order ``--help`` lists them.
SUBCOMMANDS = {
    "fit": "edit a model: write the facts of `data` into it, one batch per step (LightningCLI)",
    "validate": "measure a checkpoint's edit metrics over its edited facts (LightningCLI)",
    "test": "the same as validate, logged under `edit_test/` (LightningCLI)",
    "export": "write the edited model of a checkpoint as a plain Hugging Face folder",
    "experiments": "run configs with and without SPHERE side by side and compare them",
}


def program_name(argv0: str | None = None) -> str:
    """How the command was called: ``python -m sphere_lightning`` or the script's name."""
    name = os.path.basename(argv0 if argv0 is not None else sys.argv[0])
    return "python -m sphere_lightning" if name == "__main__.py" else name or "sphere-lightning"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The top-level parser, for ``--help`` and usage errors; each subcommand parses its own
    arguments (``<prog> <subcommand> --help``)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Sequential knowledge editing of language models with SPHERE, on "
        "PyTorch Lightning.",
        epilog=f"`{prog} <subcommand> --help` shows the options of a subcommand.",
    )
    subparsers = parser.add_subparsers(title="subcommands", metavar="<subcommand>")
    for name, description in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=description, add_help=False)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run the subcommand ``args[0]`` with the rest of ``args`` (default ``sys.argv[1:]``);
    returns the exit code (0, or the experiment runner's).

    User mistakes are reported without a traceback
    (:func:`~sphere_lightning.errors.exit_on_user_error`).
    """
    argv = list(sys.argv[1:] if args is None else args)
    prog = program_name()
    if not argv or argv[0] in ("-h", "--help"):
        build_parser(prog).print_help(sys.stdout if argv else sys.stderr)
        if not argv:
            sys.exit(2)  # as argparse does when a required subcommand is missing
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS and not command.startswith("-"):
        build_parser(prog).error(
            f"unknown subcommand {command!r} (choose from {', '.join(SUBCOMMANDS)})"
        )
    # Imported here, not at the top: `--help` answers at once instead of loading torch and
    # Lightning, and each subcommand loads only what it needs.
    from sphere_lightning.errors import exit_on_user_error

    if command == "export":
        from sphere_lightning.export import main as export_main

        with exit_on_user_error():
            export_main(rest, prog=f"{prog} export")
        return 0
    if command == "experiments":
        from sphere_lightning.experiments import main as experiments_main

        with exit_on_user_error():
            return experiments_main(rest, prog=f"{prog} experiments")
    from sphere_lightning import cli
    from sphere_lightning.deltas import NonFiniteDeltaError

    with exit_on_user_error(NonFiniteDeltaError):
        # fit, validate, test, or LightningCLI's own options (--print_config). From the command
        # line (`args` None) LightningCLI reads sys.argv itself: given both, it warns.
        cli.cli_main(None if args is None else argv, prog=prog)
    return 0


if __name__ == "__main__":
    # Exit code 0 by returning, so that a caller through runpy carries on.
    if exit_code := main():
        sys.exit(exit_code)
