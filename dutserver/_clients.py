"""Entry points of the `dutagent` and `dutctl` commands.

The two programs are single files meant to be copied onto other machines, so they are not
modules of this package: these shims run the file the package carries, as its own program.
"""

from __future__ import annotations

import runpy
import sys

from dutserver.assets import client_program


def _run(name: str) -> None:
    path = client_program(name)
    sys.argv[0] = name.removesuffix(".py")
    runpy.run_path(str(path), run_name="__main__")


def dutagent_main() -> None:
    _run("dutagent.py")


def dutctl_main() -> None:
    _run("dutctl.py")
