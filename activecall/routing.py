"""Routing rules read from the configuration: rewrites, trunk rules, inbound playbook rules.

Pure value objects with their matching logic (config.md §12, §12.1 and the playbook handler's
``[[handler.rules]]``); the table reader in
:mod:`activecall.config` builds them, with patterns compiled by :mod:`activecall.rustregex`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PlaybookRule", "Rewrite", "TrunkRule", "rewrite_target"]


@dataclass(frozen=True)
class PlaybookRule:
    """One ``[[handler.rules]]`` entry; unset patterns match anything."""

    caller: re.Pattern[str] | None
    callee: re.Pattern[str] | None
    playbook: str

    def matches(self, caller_uri: str, callee_uri: str) -> bool:
        """Return whether every pattern present is found in the From/To URI (search semantics)."""
        if self.caller is not None and self.caller.search(caller_uri) is None:
            return False
        return self.callee is None or self.callee.search(callee_uri) is not None


@dataclass(frozen=True)
class Rewrite:
    """One ``[[rewrites]]`` rule: ``match`` compiled, ``replacement`` in Python ``re.sub`` form."""

    match: re.Pattern[str]
    rewrite: str
    replacement: str

    def apply(self, uri: str) -> str:
        """Replace every match in ``uri``."""
        return self.match.sub(self.replacement, uri)


@dataclass(frozen=True)
class TrunkRule:
    """One ``[[trunk_rules]]`` entry: match conditions and rewrites (config.md §12.1)."""

    match_from_user: re.Pattern[str] | None = None
    match_from_host: re.Pattern[str] | None = None
    match_to_user: re.Pattern[str] | None = None
    match_to_host: re.Pattern[str] | None = None
    rewrite_from_user: str | None = None
    rewrite_from_host: str | None = None
    rewrite_to_user: str | None = None
    rewrite_to_host: str | None = None
    rewrite_contact_user: str | None = None
    rewrite_contact_host: str | None = None

    def matches(
        self, from_user: str | None, from_host: str, to_user: str | None, to_host: str
    ) -> bool:
        """Return whether all conditions hold; a user pattern never matches a URI without user."""
        pairs = (
            (self.match_from_user, from_user),
            (self.match_from_host, from_host),
            (self.match_to_user, to_user),
            (self.match_to_host, to_host),
        )
        for pattern, value in pairs:
            if pattern is None:
                continue
            if value is None or pattern.search(value) is None:
                return False
        return True


def rewrite_target(rewrites: Sequence[Rewrite], uri: str) -> str | None:
    """Apply ``[[rewrites]]`` in order; return the result if at least one matched, else ``None``."""
    current = uri
    matched = False
    for rule in rewrites:
        if rule.match.search(current) is not None:
            matched = True
            current = rule.apply(current)
    return current if matched else None
