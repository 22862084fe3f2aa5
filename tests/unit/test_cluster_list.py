"""/list?scope=cluster is bounded: each other node within a deadline and a body size, all of them
within an entry cap; a node that fails says so in the answer instead of failing it."""

from __future__ import annotations

import json
from typing import Any, Callable, Optional

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from activecall import web
from activecall.cluster.registry import Owner
from activecall.web import CLUSTER_LIST_NODE_MAX_BYTES, CLUSTER_LIST_TIMEOUT_S, ApiResource

from test_web_hardening import FakeSessions, make_request


class BodyTransport:
    """The transport a response body is delivered over; aborting it ends the body with a lost connection."""

    def __init__(self) -> None:
        self.aborted = False
        self.protocol: Any = None

    def abortConnection(self) -> None:
        if not self.aborted:
            self.aborted = True
            self.protocol.connectionLost(Failure(ConnectionLost()))

    def stopProducing(self) -> None:
        self.abortConnection()


class FakeResponse:
    """A peer node's answer; ``chunks`` is called with a send function once the body is wanted."""

    def __init__(self, code: int = 200, chunks: Optional[Callable[[BodyTransport, Any], None]] = None,
                 length: Any = UNKNOWN_LENGTH) -> None:
        self.code = code
        self.length = length
        self.headers = Headers()
        self.phrase = b"OK"
        self._chunks = chunks
        self.transport = BodyTransport()

    def deliverBody(self, protocol: Any) -> None:
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)
        if self._chunks is not None and not self.transport.aborted:
            self._chunks(self.transport, protocol)


def complete(body: bytes) -> Callable[[BodyTransport, Any], None]:
    def send(transport: BodyTransport, protocol: Any) -> None:
        protocol.dataReceived(body)
        protocol.connectionLost(Failure(ResponseDone()))
    return send


def endless(transport: BodyTransport, protocol: Any) -> None:
    """1 MiB chunks as long as the reader takes them (64 MiB at most)."""
    chunk = b"x" * (1024 * 1024)
    for _ in range(64):
        if transport.aborted:
            return
        protocol.dataReceived(chunk)
    protocol.connectionLost(Failure(ResponseDone()))


def silent(transport: BodyTransport, protocol: Any) -> None:
    """Headers came, the body never does."""


class FakeAgent:
    """Answers GET <node>/list?forward=true per node host; records what was asked."""

    def __init__(self, answers: dict[str, Callable[[], Deferred[Any]]]) -> None:
        self.answers = answers
        self.asked: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, body: Any = None) -> Deferred[Any]:
        self.asked.append(uri)
        host = uri.split(b"/")[2].decode()
        return self.answers[host]()


def calls(*ids: str) -> bytes:
    return json.dumps({"active_calls": [{"id": i} for i in ids]}).encode()


class ClusterListTests(SynchronousTestCase):
    """One slow, huge or broken peer costs the answer nothing but its own entry."""

    def list_cluster(self, answers: dict[str, Callable[[], Deferred[Any]]],
                     advance: float = 0.0) -> tuple[dict[str, Any], FakeAgent]:
        clock = Clock()
        agent = FakeAgent(answers)
        nodes = [Owner("me", "http://me:8080")] + [Owner(h.split(":")[0], f"http://{h}") for h in answers]
        resource = ApiResource(FakeSessions("mine"), clock, (), cluster_nodes=lambda: succeed(nodes),
                               node_id="me", http_agent=agent)
        request = make_request(b"GET", b"/list", args={b"scope": [b"cluster"]})
        self.assertEqual(resource.render(request), web.NOT_DONE_YET)
        clock.advance(advance)
        self.assertEqual((request.finished, request.responseCode or 200), (1, 200))
        self.assertEqual(clock.getDelayedCalls(), [])
        return json.loads(b"".join(request.written)), agent

    def nodes(self, body: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {n["node"]: n for n in body["nodes"]}

    def test_healthy_peer(self) -> None:
        """Each node's calls carry its name; no errors entry when nobody failed."""
        body, agent = self.list_cluster({"b:8080": lambda: succeed(FakeResponse(chunks=complete(calls("x"))))})
        self.assertEqual(body["active_calls"], [{"id": "mine", "node": "me"}, {"id": "x", "node": "b"}])
        self.assertEqual(self.nodes(body)["b"], {"node": "b", "url": "http://b:8080", "reachable": True, "calls": 1})
        self.assertNotIn("errors", body)
        self.assertEqual(agent.asked, [b"http://b:8080/list?forward=true"])

    def test_huge_body_is_cut_off(self) -> None:
        """A peer streaming without end is dropped past the byte cap; the others are listed."""
        huge = FakeResponse(chunks=endless)
        body, _ = self.list_cluster({"huge:8080": lambda: succeed(huge),
                                     "b:8080": lambda: succeed(FakeResponse(chunks=complete(calls("x"))))})
        self.assertTrue(huge.transport.aborted)
        error = f"answer larger than {CLUSTER_LIST_NODE_MAX_BYTES} bytes"
        self.assertEqual(self.nodes(body)["huge"], {"node": "huge", "url": "http://huge:8080", "reachable": False,
                                                    "calls": 0, "error": error})
        self.assertEqual(body["errors"], [{"node": "huge", "error": error}])
        self.assertEqual([c["id"] for c in body["active_calls"]], ["mine", "x"])

    def test_announced_huge_body_is_not_read(self) -> None:
        """A Content-Length over the cap fails the node before a byte is read."""
        huge = FakeResponse(chunks=endless, length=CLUSTER_LIST_NODE_MAX_BYTES + 1)
        body, _ = self.list_cluster({"huge:8080": lambda: succeed(huge)})
        self.assertTrue(huge.transport.aborted)
        self.assertIn("larger than", self.nodes(body)["huge"]["error"])

    def test_slow_body_hits_the_deadline(self) -> None:
        """Headers then silence: after the deadline the connection is dropped and the node reported."""
        slow = FakeResponse(chunks=silent)
        clock_answers = {"slow:8080": lambda: succeed(slow)}
        body, _ = self.list_cluster(clock_answers, advance=CLUSTER_LIST_TIMEOUT_S)
        self.assertTrue(slow.transport.aborted)
        self.assertEqual(self.nodes(body)["slow"]["error"], f"no answer within {CLUSTER_LIST_TIMEOUT_S:g} s")

    def test_no_headers_hits_the_deadline(self) -> None:
        """A node that never answers at all is reported at the deadline too."""
        body, _ = self.list_cluster({"mute:8080": lambda: Deferred()}, advance=CLUSTER_LIST_TIMEOUT_S)
        self.assertEqual(self.nodes(body)["mute"]["reachable"], False)
        self.assertIn("no answer within", self.nodes(body)["mute"]["error"])

    def test_failing_nodes_are_named(self) -> None:
        """A 500, a refused connection and a non-JSON body: each node named with its error."""
        body, _ = self.list_cluster({
            "e500:8080": lambda: succeed(FakeResponse(code=500, chunks=complete(b"boom"))),
            "down:8080": lambda: fail(ConnectionRefusedError()),
            "junk:8080": lambda: succeed(FakeResponse(chunks=complete(b"<html>"))),
        })
        self.assertEqual({e["node"]: e["error"] for e in body["errors"]},
                         {"e500": "HTTP 500", "down": "unreachable", "junk": "invalid JSON"})
        self.assertEqual([c["id"] for c in body["active_calls"]], ["mine"])

    def test_total_entry_cap(self) -> None:
        """Past the entry cap the rest of the calls are left out and the cut node is marked truncated."""
        self.patch(web, "CLUSTER_LIST_MAX_ENTRIES", 4)
        body, _ = self.list_cluster({
            "b:8080": lambda: succeed(FakeResponse(chunks=complete(calls("b1", "b2")))),
            "c:8080": lambda: succeed(FakeResponse(chunks=complete(calls("c1", "c2", "c3")))),
        })
        self.assertEqual([c["id"] for c in body["active_calls"]], ["mine", "b1", "b2", "c1"])
        self.assertEqual((self.nodes(body)["c"]["calls"], self.nodes(body)["c"]["truncated"]), (1, True))
        self.assertEqual(body["errors"], [{"node": "c", "error": "more than 4 calls in the cluster"}])

    def test_registry_failure_is_reported(self) -> None:
        """The registry cannot name the nodes: this node's calls, and an error naming the registry."""
        resource = ApiResource(FakeSessions("mine"), Clock(), (), cluster_nodes=lambda: fail(ConnectionLost()),
                               node_id="me", http_agent=FakeAgent({}))
        request = make_request(b"GET", b"/list", args={b"scope": [b"cluster"]})
        resource.render(request)
        body = json.loads(b"".join(request.written))
        self.assertEqual((request.responseCode or 200, [c["id"] for c in body["active_calls"]]), (200, ["mine"]))
        self.assertEqual(body["errors"], [{"node": "registry", "error": "registry unreachable"}])
