"""The shared call registry (config.md §14b): which node owns which call or session id.

Every node writes ``activecall:call:<id>`` → ``{"node", "url"}`` for each id it
hosts (live sessions, inbound calls waiting for their webhook client, playbook
runs waiting for their socket), with a TTL refreshed while the id lives, and
``activecall:node:<node>`` → its URL and load.  A node that receives a socket
or a REST request for an id it does not host asks :meth:`CallRegistry.owner`
where to send it.

The store is injected (:class:`IRegistryStore`: Redis in production, a dict in
tests), and so is the clock.  A store that fails puts the registry *down*:
one warning, lookups answer "unknown" (the node works alone), and the next
refresh that succeeds brings it back up with everything re-written.

States::

    up --store error--> down (warned once; owner() answers None)
    down --a refresh succeeds--> up (all hosted ids written again)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = ["IRegistryStore", "Owner", "CallRegistry", "RegistryService", "CALL_PREFIX", "NODE_PREFIX", "MAX_ID_CHARS"]

CALL_PREFIX = "activecall:call:"
NODE_PREFIX = "activecall:node:"
#: Ids longer than this are never looked up (a dialogId is well below it).
MAX_ID_CHARS = 256


class IRegistryStore(Protocol):
    """A key-value store with expiry (Redis)."""

    def set_many(self, items: Mapping[str, str], ttl_s: int) -> Deferred[None]:
        """Write every item, each expiring ``ttl_s`` from now."""

    def get(self, key: str) -> Deferred[Optional[str]]:
        """The value, or None."""

    def delete_many(self, keys: Sequence[str]) -> Deferred[None]:
        """Remove the keys (missing ones are fine)."""

    def values_with_prefix(self, prefix: str, limit: int) -> Deferred[dict[str, str]]:
        """At most ``limit`` keys starting with ``prefix`` and their values."""


@dataclass(frozen=True)
class Owner:
    """A node of the cluster: its name and HTTP base URL (``advertise_url``)."""

    node: str
    url: str
    load: Optional[Mapping[str, Any]] = None


def _owner_from(text: Optional[str]) -> Optional[Owner]:
    if not text:
        return None
    try:
        obj = json.loads(text)
        node, url = obj["node"], obj["url"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(node, str) or not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    load = obj.get("load")
    return Owner(node, url, load if isinstance(load, dict) else None)


class CallRegistry:
    """This node's view of the registry: claims its ids, refreshes them, finds other nodes' ids."""

    _log = Logger()

    def __init__(self, store: IRegistryStore, clock: IReactorTime, *, node_id: str, url: str, ttl_s: int,
                 hosted: Callable[[], Iterable[str]], load: Callable[[], Mapping[str, Any]] = dict) -> None:
        self._store = store
        self._clock = clock
        self.node_id = node_id
        self.url = url.rstrip("/")
        self.ttl_s = max(3, int(ttl_s))
        self._hosted = hosted
        self._load = load
        self._value = json.dumps({"node": node_id, "url": self.url})
        self._written: set[str] = set()  # ids this node has in the store
        self._loop: Optional[LoopingCall] = None
        self.up = True
        self.failures = 0

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Write this node and its ids now, then every third of the TTL."""
        loop = LoopingCall(self.refresh)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self.ttl_s / 3.0, now=True).addErrback(lambda f: self._log.failure("registry refresh stopped", f))

    def stop(self) -> Deferred[None]:
        """Leave the registry: this node's entry and ids are removed (drain, shutdown)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        keys = [NODE_PREFIX + self.node_id] + [CALL_PREFIX + sid for sid in self._written]
        self._written.clear()
        return self._guard(self._store.delete_many(keys), None)

    # -- this node's ids -----------------------------------------------------

    def claim(self, sid: str) -> Deferred[None]:
        """``sid`` is hosted here from now (a session opened, an inbound call waits for its client)."""
        if len(sid) > MAX_ID_CHARS:
            return succeed(None)
        self._written.add(sid)
        return self._guard(self._store.set_many({CALL_PREFIX + sid: self._value}, self.ttl_s), None)

    def release(self, sid: str) -> Deferred[None]:
        """``sid`` is no longer hosted here."""
        if sid not in self._written:
            return succeed(None)
        self._written.discard(sid)
        return self._guard(self._store.delete_many([CALL_PREFIX + sid]), None)

    def refresh(self) -> Deferred[None]:
        """Rewrite every hosted id and this node's entry (TTL renewed); forget ids that ended."""
        hosted = {sid for sid in self._hosted() if len(sid) <= MAX_ID_CHARS}
        gone = self._written - hosted
        node = json.dumps({"node": self.node_id, "url": self.url, "load": dict(self._load())})
        items = {CALL_PREFIX + sid: self._value for sid in hosted}
        items[NODE_PREFIX + self.node_id] = node
        d = self._store.set_many(items, self.ttl_s)
        if gone:
            d.addCallback(lambda _: self._store.delete_many([CALL_PREFIX + sid for sid in gone]))

        def written(_: Any) -> None:
            self._written = hosted
            if not self.up:
                self.up = True
                self._log.info("call registry reachable again: {n} id(s) written", n=len(hosted))

        d.addCallback(written)
        return self._guard(d, None)

    # -- other nodes' ids ------------------------------------------------------

    def owner(self, sid: str) -> Deferred[Optional[Owner]]:
        """The node owning ``sid`` if it is another node; None when unknown, ours, or the store is down."""
        if len(sid) > MAX_ID_CHARS or not self.up:
            return succeed(None)
        d = self._store.get(CALL_PREFIX + sid)

        def found(text: Optional[str]) -> Optional[Owner]:
            owner = _owner_from(text)
            return owner if owner is not None and owner.node != self.node_id else None

        d.addCallback(found)
        return self._guard(d, None)

    def nodes(self, limit: int = 64) -> Deferred[list[Owner]]:
        """Every node with a live entry (this one included), by name."""
        if not self.up:
            return succeed([Owner(self.node_id, self.url, dict(self._load()))])
        d = self._store.values_with_prefix(NODE_PREFIX, limit)

        def listed(values: dict[str, str]) -> list[Owner]:
            owners = [o for o in (_owner_from(v) for v in values.values()) if o is not None]
            if not any(o.node == self.node_id for o in owners):
                owners.append(Owner(self.node_id, self.url, dict(self._load())))
            return sorted(owners, key=lambda o: o.node)

        d.addCallback(listed)
        return self._guard(d, [Owner(self.node_id, self.url, dict(self._load()))])

    # -- outages --------------------------------------------------------------

    def _guard(self, d: Deferred[Any], fallback: Any) -> Deferred[Any]:
        def failed(f: Failure) -> Any:
            self.failures += 1
            if self.up:
                self.up = False
                self._log.warn("call registry unreachable ({e}): this node works alone until it is back",
                               e=f.getErrorMessage())
            return fallback

        return d.addErrback(failed)


class RegistryService(Service):
    """Runs the registry with the daemon: joins at start; at stop (drain) keeps the ids of running
    calls findable until they ended (at most ``drain_timeout_s``), then leaves and closes the store."""

    def __init__(self, registry: CallRegistry, wait_idle: Callable[[], Deferred[None]], clock: IReactorTime,
                 drain_timeout_s: float, close_store: Callable[[], Deferred[Any]] = lambda: succeed(None)) -> None:
        self.registry = registry
        self._wait_idle = wait_idle
        self._clock = clock
        self._drain_timeout_s = drain_timeout_s
        self._close_store = close_store

    def startService(self) -> None:
        super().startService()
        self.registry.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        idle = self._wait_idle()
        idle.addTimeout(self._drain_timeout_s, self._clock)
        idle.addErrback(lambda f: None)
        idle.addCallback(lambda _: self.registry.stop())
        idle.addCallback(lambda _: self._close_store())
        idle.addErrback(lambda f: None)
        return idle
