"""``python -m sphere_lightning``: the command line. A mistake in the input (a bad flag, a bad
data file) ends the run with one paragraph, ``error: <message>``, and exit code 2; a ΔW with
NaN/inf with one paragraph and exit code 1; anything else is a bug and shows its traceback."""

import sys

from sphere_lightning.callbacks.transform import NonFiniteDeltaError
from sphere_lightning.cli import cli_main
from sphere_lightning.errors import exit_on_user_error


def main(args: list[str] | None = None) -> None:
    """Run :func:`~sphere_lightning.cli.cli_main` (``args`` replaces ``sys.argv[1:]``) and report
    user mistakes without a traceback (:func:`~sphere_lightning.errors.exit_on_user_error`)."""
    with exit_on_user_error(NonFiniteDeltaError):
        cli_main(args)


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        from sphere_lightning.export import main as export_main

        export_main(sys.argv[2:])
    else:
        main()
