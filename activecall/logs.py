"""Logging set-up honouring ``log_level`` and ``log_file`` under twistd."""

from __future__ import annotations

import re
import sys
from typing import IO, Any, Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
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


# Twisted's UDP ports log every start and close: four lines per call for the RTP/RTCP pair.
_PORT_CHATTER = re.compile(r"(?:rtc?p|_Rtc?pProtocol) starting on \d+|\(UDP Port \d+ Closed\)")


def _no_port_chatter(event: LogEvent) -> PredicateResult:
    """Drop the per-call UDP port lines of the media sockets (kept with log_level debug)."""
    message = event.get("message")
    if event.get("log_namespace") == "log_legacy" and message and _PORT_CHATTER.fullmatch(str(message[0])):
        return PredicateResult.no
    return PredicateResult.maybe


def make_observer(level: str, log_file: Optional[str], stream: Optional[IO[str]] = None) -> ILogObserver:
    """A text observer writing to ``log_file`` (appending) or ``stream``, dropping events below ``level``."""
    out: IO[str]
    if log_file:
        out = open(log_file, "a", encoding="utf-8")
    else:
        out = stream if stream is not None else sys.stdout
    threshold = _LEVELS.get(level.lower(), LogLevel.info)
    predicates = [LogLevelFilterPredicate(defaultLogLevel=threshold)]
    if threshold > LogLevel.debug:
        predicates.append(_no_port_chatter)
    return FilteringLogObserver(textFileLogObserver(out), predicates)


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
