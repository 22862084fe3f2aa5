"""Logging set-up honouring ``log_level`` and ``log_file`` under twistd."""

from __future__ import annotations

import sys
from typing import IO, Any, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)

_LEVELS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "off": LogLevel.critical,
}


def make_observer(level: str, log_file: Optional[str], stream: Optional[IO[str]] = None) -> ILogObserver:
    """A text observer writing to ``log_file`` (appending) or ``stream``, dropping events below ``level``."""
    out: IO[str]
    if log_file:
        out = open(log_file, "a", encoding="utf-8")
    else:
        out = stream if stream is not None else sys.stdout
    predicate = LogLevelFilterPredicate(defaultLogLevel=_LEVELS.get(level.lower(), LogLevel.info))
    return FilteringLogObserver(textFileLogObserver(out), [predicate])


def log_destination(twistd_logfile: Optional[str], log_file: Optional[str]) -> Optional[str]:
    """Where the daemon logs: ``twistd --logfile FILE`` (the command line wins), else ``log_file``, else
    None for stdout (journald under systemd).  ``--logfile -`` means stdout, as it does for twistd."""
    if twistd_logfile:
        return None if twistd_logfile == "-" else twistd_logfile
    return log_file


def install_on_application(application: Any, observer: ILogObserver) -> None:
    """Make twistd log through ``observer``: twistd asks the application for an ILogObserver."""
    set_component = getattr(application, "setComponent", None)
    if set_component is not None:
        set_component(ILogObserver, observer)
