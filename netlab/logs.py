"""Log observers for the daemon: text for people, JSON lines for machines.

Every event netlab emits carries an ``event`` field with a stable dotted name
(``netlab.listening``, ``file.put.done`` ...) beside its named fields, so a log
shipper can select events without parsing the human sentence.
"""

from __future__ import annotations

import sys
from typing import IO, Any, cast

import attrs
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def open_destination(logfile: str | None) -> IO[Any]:
    """The stream twistd itself would log to for ``--logfile``."""
    if not logfile or logfile == "-":
        return sys.stdout
    return cast(IO[Any], LogFile.fromFullPath(logfile))


@implementer(ILogObserver)
@attrs.define
class NetlabLogObserver:
    """A text or JSON-lines observer whose level can change while running.

    The predicate is kept so that a reload can change the level in place.
    """

    predicate: LogLevelFilterPredicate
    observer: ILogObserver

    @classmethod
    def create(cls, log_format: str, level: str, stream: IO[Any]) -> NetlabLogObserver:
        if log_format == "json":
            # One JSON object per line: journald and log shippers split on newlines.
            inner = jsonFileLogObserver(stream, recordSeparator="")
        else:
            inner = textFileLogObserver(stream)
        predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
        return cls(predicate, FilteringLogObserver(inner, [predicate]))

    def set_level(self, level: str) -> None:
        """Change the least severe level written (used by reload)."""
        self.predicate.setLogLevelForNamespace("", LEVELS[level])

    def __call__(self, event: dict[str, Any]) -> None:
        self.observer(event)
