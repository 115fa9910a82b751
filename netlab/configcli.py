"""``netlab config``: show which configuration file the client uses, and its values."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from netlab.configdoc import render_effective


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "config",
        help="validate and print the configuration in force",
        description="Validate the configuration file the client would use and "
        "print every setting in force, as TOML.",
    )
    parser.set_defaults(handler=show)


async def show(context: Any) -> int:
    sys.stdout.write(render_effective(context.config))
    return 0
