"""WebhookNotifier with a real treq client over real TCP sockets on 127.0.0.1."""

from __future__ import annotations

import json
import socket

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from activecall.config import FetchConfig, WebhookHandlerConfig
from activecall.fetch import Fetcher, http_client_for
from activecall.handlers.webhook import WebhookError, WebhookNotifier


def _closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


class _Hook(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.signatures: list[str | None] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.bodies.append(request.content.read())
        self.signatures.append(request.getHeader("x-activecall-signature"))
        return b"ok"


class RealSocketTests(TestCase):
    """Connection refused is a transport error; the next URL is then tried."""

    timeout = 20

    def setUp(self) -> None:
        self.hook = _Hook()
        self.port = reactor.listenTCP(0, Site(self.hook), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
        self.addCleanup(self.port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.refused = f"http://127.0.0.1:{_closed_port()}/hook"
        self.live = f"http://127.0.0.1:{self.port.getHost().port}/hook"  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_connection_refused(self):  # type: ignore[no-untyped-def]
        """A closed port errbacks WebhookError naming the refused connection."""
        notifier = WebhookNotifier(WebhookHandlerConfig(urls=(self.refused,)), self.client, reactor)
        with self.assertRaises(WebhookError) as caught:
            yield notifier.notify({"event": "invite"})
        self.assertIn("ConnectionRefusedError", str(caught.exception))
        self.assertTrue(str(caught.exception).startswith("failed to send invite to webhook: "))

    @inlineCallbacks
    def test_refused_then_next_url(self):  # type: ignore[no-untyped-def]
        """With the first URL refused, the same INVITE is delivered to the second one."""
        notifier = WebhookNotifier(WebhookHandlerConfig(urls=(self.refused, self.live)), self.client, reactor)
        result = yield notifier.notify({"event": "invite", "dialogId": "x"})
        self.assertIsNone(result)
        self.assertEqual([json.loads(b) for b in self.hook.bodies], [{"event": "invite", "dialogId": "x"}])


class FetcherSocketTests(RealSocketTests):
    """The same, with the daemon's bounded Fetcher in front, and a signing secret."""

    def setUp(self) -> None:
        super().setUp()
        config = FetchConfig(connect_timeout_s=5.0)
        self.client = Fetcher(http_client_for(reactor, config, HTTPConnectionPool(reactor, persistent=False)),
                              reactor, config)

    @inlineCallbacks
    def test_signed_body_verifies(self):  # type: ignore[no-untyped-def]
        """The receiver recomputes the HMAC over the bytes it received and it matches."""
        import hashlib
        import hmac

        notifier = WebhookNotifier(WebhookHandlerConfig(urls=(self.refused, self.live)), self.client, reactor,
                                   signing_secret="whsec")
        yield notifier.notify({"event": "invite", "dialogId": "x"})
        [body], [header] = self.hook.bodies, self.hook.signatures
        assert header is not None
        fields = dict(part.split("=", 1) for part in header.split(","))
        expected = hmac.new(b"whsec", fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
        self.assertTrue(hmac.compare_digest(expected, fields["v1"]))
