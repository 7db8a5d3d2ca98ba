"""``python -m sphere_lightning.experiments``: the same as ``sphere-lightning experiments``."""

import sys

from sphere_lightning.experiments.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m sphere_lightning.experiments"))
