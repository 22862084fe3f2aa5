"""Inbound INVITE routing: the seam between the SIP user agent and the call layer.

The webhook handler lives in :mod:`activecall.handlers.webhook`. Playbook
routing (config.md §5) joins with the playbook engine; until then such calls
are refused with a 503 that says so, so a PBX fails over instead of waiting
for an answer that cannot come.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from activecall.sip.useragent import ICallHandler

_UNAVAILABLE_REASON = 'SIP;cause=503;text="Inbound call handling is not available yet"'


@implementer(ICallHandler)
class UnavailableInboundHandler:
    """Refuses every new INVITE with 503 and a Reason naming why."""

    _log = Logger()

    def incoming_call(self, call: Any) -> None:
        self._log.info("inbound call refused: inbound handling is not available yet")
        call.reject(503, "Service Unavailable", headers=[("Reason", _UNAVAILABLE_REASON)])
