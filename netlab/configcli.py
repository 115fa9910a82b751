"""``netlab config``: show which configuration file the client uses, and its values.

The command line is declared in :mod:`netlab.commands`.
"""

from __future__ import annotations

import sys
from typing import Any

from netlab.configdoc import render_effective


async def show(context: Any) -> int:
    sys.stdout.write(render_effective(context.config))
    return 0
