"""Refresh Twisted's plugin cache, so that ``twistd netlab`` starts quietly.

``twistd`` finds ``netlab`` through Twisted's plugin system, which keeps a
``dropin.cache`` file beside the plugins and rewrites it whenever a plugin
module is newer than the cache.  Under the hardened systemd unit the
virtualenv is read-only, so after an install or upgrade every start would log
"Unable to write to plugin cache" (and scan all plugins again).

``python -m netlab.plugincache``, run by the owner of the installation after
installing or upgrading (the unit's ``ExecStartPre=+`` does it outside the
sandbox), rewrites every stale cache and fails, saying where, if it cannot,
or if the netlab plugin is not found at all.  A fresh cache is not rewritten.
"""

from __future__ import annotations

import os
import sys

from twisted.logger import capturedLogs, formatEvent


def refresh() -> tuple[set[str], list[str]]:
    """Scan the plugins as ``twistd`` does, rewriting stale caches.

    Returns the ``twistd`` subcommands found and the problems Twisted logged
    while scanning (cache write failures, plugins that failed to import).
    """
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    # The unit's UMask=0077 applies to this step too: caches written with it
    # would be unreadable to the service user, whose twistd would then try
    # (and fail) to rewrite them.  The installation is world-readable anyway.
    previous_umask = os.umask(0o022)
    try:
        with capturedLogs() as events:
            names = {maker.tapname for maker in getPlugins(IServiceMaker)}
    finally:
        os.umask(previous_umask)
    problems = []
    for event in events:
        text = formatEvent(event)
        if "log_failure" in event:
            text += ": " + event["log_failure"].getErrorMessage()
        problems.append(text)
    return names, problems


def main() -> int:
    names, problems = refresh()
    for problem in problems:
        sys.stderr.write(f"netlab.plugincache: {problem}\n")
    if "netlab" not in names:
        sys.stderr.write(
            "netlab.plugincache: the netlab plugin was not found; run this with "
            "the Python of the environment netlab is installed in\n"
        )
        return 1
    if problems:
        sys.stderr.write(
            "netlab.plugincache: run this as the owner of the installation "
            "(root for /opt/netlab)\n"
        )
        return 1
    print("plugin cache is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
