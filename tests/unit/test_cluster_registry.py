"""The shared call registry on a Clock with an in-memory store that expires keys and can fail."""

from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from activecall.cluster.registry import CALL_PREFIX, NODE_PREFIX, CallRegistry, Owner


class MemoryStore:
    """Redis in a dict: values expire on the clock; ``down`` makes every operation fail."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.data: dict[str, tuple[str, float]] = {}
        self.down = False

    def _live(self) -> dict[str, str]:
        now = self.clock.seconds()
        return {k: v for k, (v, until) in self.data.items() if until > now}

    def set_many(self, items: Mapping[str, str], ttl_s: int) -> Deferred[None]:
        if self.down:
            return fail(ConnectionRefusedError("redis down"))
        for k, v in items.items():
            self.data[k] = (v, self.clock.seconds() + ttl_s)
        return succeed(None)

    def get(self, key: str) -> Deferred[Optional[str]]:
        return fail(ConnectionRefusedError("redis down")) if self.down else succeed(self._live().get(key))

    def delete_many(self, keys: Sequence[str]) -> Deferred[None]:
        if self.down:
            return fail(ConnectionRefusedError("redis down"))
        for k in keys:
            self.data.pop(k, None)
        return succeed(None)

    def values_with_prefix(self, prefix: str, limit: int) -> Deferred[dict[str, str]]:
        if self.down:
            return fail(ConnectionRefusedError("redis down"))
        return succeed(dict(sorted((k, v) for k, v in self._live().items() if k.startswith(prefix))[:limit]))


class RegistryTests(SynchronousTestCase):
    """Ids are claimed, refreshed while hosted, found from other nodes, and survive a store outage."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(self.clock)
        self.hosted_a: set[str] = set()
        self.a = CallRegistry(self.store, self.clock, node_id="a", url="http://127.0.0.1:8001/", ttl_s=30,
                              hosted=lambda: self.hosted_a, load=lambda: {"calls": len(self.hosted_a)})
        self.b = CallRegistry(self.store, self.clock, node_id="b", url="http://127.0.0.1:8002", ttl_s=30,
                              hosted=lambda: ())
        self.a.start()
        self.b.start()
        self.addCleanup(self.a.stop)
        self.addCleanup(self.b.stop)

    def owner(self, registry: CallRegistry, sid: str) -> Optional[Owner]:
        return self.successResultOf(registry.owner(sid))

    def test_another_node_finds_the_owner(self) -> None:
        """A claimed id points at its node's URL from the other node; the owner itself sees None."""
        self.hosted_a.add("call-1")
        self.successResultOf(self.a.claim("call-1"))
        self.assertEqual(self.owner(self.b, "call-1"), Owner("a", "http://127.0.0.1:8001"))
        self.assertIsNone(self.owner(self.a, "call-1"))
        self.assertIsNone(self.owner(self.b, "nobody"))

    def test_entries_live_while_hosted_and_expire_after(self) -> None:
        """Refreshes keep a hosted id past its TTL; an id no longer hosted is removed at the next refresh."""
        self.hosted_a.add("call-1")
        self.a.claim("call-1")
        self.clock.advance(100)  # many TTLs, refreshed every 10 s
        self.assertIsNotNone(self.owner(self.b, "call-1"))
        self.hosted_a.clear()
        self.clock.advance(10)
        self.assertIsNone(self.owner(self.b, "call-1"))
        self.assertNotIn(CALL_PREFIX + "call-1", self.store.data)

    def test_a_crashed_node_expires(self) -> None:
        """A node that stops refreshing (killed) drops out after its TTL, without anyone deleting it."""
        self.hosted_a.add("call-1")
        self.a.claim("call-1")
        self.a._loop.stop()  # the process died: no refresh, no stop()
        self.clock.advance(31)
        self.assertIsNone(self.owner(self.b, "call-1"))
        self.assertEqual([o.node for o in self.successResultOf(self.b.nodes())], ["b"])

    def test_release_and_stop_leave_the_registry(self) -> None:
        """release drops one id at once; stop (drain) drops the node and all its ids."""
        self.hosted_a.update({"c1", "c2"})
        self.a.claim("c1")
        self.a.claim("c2")
        self.a.release("c1")
        self.assertIsNone(self.owner(self.b, "c1"))
        self.assertEqual([o.node for o in self.successResultOf(self.b.nodes())], ["a", "b"])
        self.successResultOf(self.a.stop())
        self.assertIsNone(self.owner(self.b, "c2"))
        self.assertEqual([o.node for o in self.successResultOf(self.b.nodes())], ["b"])

    def test_nodes_carry_their_load(self) -> None:
        """The node entry names its URL and the load it reported at its last refresh."""
        self.hosted_a.add("c1")
        self.clock.advance(10)
        a = [o for o in self.successResultOf(self.b.nodes()) if o.node == "a"][0]
        self.assertEqual((a.url, a.load), ("http://127.0.0.1:8001", {"calls": 1}))

    def test_outage_degrades_to_local_and_recovers(self) -> None:
        """Store down: one warning, lookups answer None, nothing raises; back up: ids are rewritten."""
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.store.down = True
        self.hosted_a.add("c1")
        self.successResultOf(self.a.claim("c1"))
        self.clock.advance(10)
        self.assertIsNone(self.owner(self.b, "c1"))
        self.assertFalse(self.a.up)
        self.clock.advance(30)
        warnings = [e for e in logged if "unreachable" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 2)  # once per node, not once per refresh
        self.store.data.clear()  # Redis restarted empty
        self.store.down = False
        self.clock.advance(10)
        self.assertTrue(self.a.up and self.b.up)
        self.assertEqual(self.owner(self.b, "c1"), Owner("a", "http://127.0.0.1:8001"))

    def test_hostile_entries_and_ids(self) -> None:
        """A corrupt or foreign value is ignored; an over-long id is never written or looked up."""
        self.store.data[CALL_PREFIX + "x"] = ("not json", 1e12)
        self.store.data[CALL_PREFIX + "y"] = (json.dumps({"node": "z", "url": "file:///etc/passwd"}), 1e12)
        self.store.data[NODE_PREFIX + "z"] = (json.dumps(["x"]), 1e12)
        self.assertIsNone(self.owner(self.b, "x"))
        self.assertIsNone(self.owner(self.b, "y"))
        self.assertEqual([o.node for o in self.successResultOf(self.b.nodes())], ["a", "b"])
        long_id = "i" * 300
        self.successResultOf(self.a.claim(long_id))
        self.assertNotIn(CALL_PREFIX + long_id, self.store.data)
        self.assertIsNone(self.owner(self.b, long_id))
