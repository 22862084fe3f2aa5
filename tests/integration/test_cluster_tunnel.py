"""Two real daemons on 127.0.0.1: a socket for an id the other node owns is tunnelled there, found
through the static ``peers`` list or through the Redis call registry (config.md §14b)."""

from __future__ import annotations

import json
import os
import shutil
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SkipTest, TestCase

from harness import BASE_CONFIG, Daemon, connect, free_port, http_client, start_daemon

PLAYBOOK = """---
tts: {provider: piper}
greeting: Hello from the node that owns this call.
---
You are a greeter.
"""


class RedisServer(Daemon):
    """A throwaway redis-server on a free 127.0.0.1 port, no persistence."""

    @classmethod
    async def start(cls, test: TestCase, port: int = 0) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise SkipTest("redis-server is not installed")
        server = cls()
        server.port = port or free_port()
        workdir = os.path.abspath(test.mktemp())
        os.makedirs(workdir, exist_ok=True)
        argv = [binary, "--port", str(server.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", workdir]
        reactor.spawnProcess(server, binary, argv, env=dict(os.environ), path=workdir)
        test.addCleanup(server.stop)
        await server.wait_output("Ready to accept connections")
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class _Collect(Protocol):
    """Keeps the chunks of a streamed response body."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


class TunnelTests(TestCase):
    """A client of node B reaches a playbook run waiting on node A; A's audio and events come through B."""

    timeout = 120

    async def _daemon(self, name: str, top: str = "", tables: str = "") -> Any:
        workdir = os.path.abspath(self.mktemp() + name)
        os.makedirs(workdir)
        daemon = await start_daemon(workdir, top + BASE_CONFIG + tables)
        self.addCleanup(daemon.stop)
        return daemon

    async def _run_on(self, daemon: Any) -> str:
        response = await http_client().post(f"{daemon.base_url}/api/playbook/run",
                                            json.dumps({"content": PLAYBOOK}).encode(),
                                            headers={"Content-Type": "application/json"})
        self.assertEqual(response.code, 200)
        return json.loads(await response.content())["session_id"]

    async def _call_through(self, owner: Any, other: Any, sid: str) -> None:
        client = await connect(f"{other.ws_url}/call?id={sid}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": 16000}})
        await client.wait_event("answer", trackId=sid)
        listed_owner = await (await http_client().get(owner.base_url + "/list")).json()
        listed_other = await (await http_client().get(other.base_url + "/list")).json()
        self.assertIn(sid, [c["id"] for c in listed_owner["active_calls"]])
        self.assertNotIn(sid, [c["id"] for c in listed_other["active_calls"]])
        # The greeting is synthesized on the owner and its frames come through the tunnel.
        await client.wait_event("trackEnd", trackId="server-side-track", timeout_s=30)
        audio = b"".join(frame for _, frame in client.frames)
        self.assertGreater(len(audio), 16000 * 2)  # more than a second of 16 kHz speech
        client.send({"command": "hangup"})
        hangup = await client.wait_event("hangup", trackId=sid)
        self.assertEqual(hangup["trackId"], sid)
        await client.wait_closed()

    async def _rest_through(self, a: Any, b: Any) -> None:
        """/command, /events and /kill for a call on A, sent to B; /list?scope=cluster on B shows it on A."""
        sid = await self._run_on(a)
        client = await connect(f"{a.ws_url}/call?id={sid}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": 16000}})
        await client.wait_event("answer", trackId=sid)
        events = await http_client().get(f"{b.base_url}/events/{sid}")
        self.assertEqual(events.code, 200)
        self.assertEqual(events.headers.getRawHeaders(b"content-type"), [b"text/event-stream;charset=utf-8"])
        seen = []
        events.deliverBody(_Collect(seen))
        sent = await http_client().post(f"{b.base_url}/command/{sid}",
                                        json.dumps({"command": "custom", "data": {"via": "b"}}).encode(),
                                        headers={"Content-Type": "application/json"})
        self.assertEqual(json.loads(await sent.content()), {"status": "sent", "id": sid})
        custom = await client.wait_event("custom")
        self.assertEqual(custom["data"], {"via": "b"})
        listed = await (await http_client().get(f"{b.base_url}/list?scope=cluster")).json()
        self.assertIn((sid, "a"), [(c["id"], c["node"]) for c in listed["active_calls"]])
        self.assertEqual(sorted(n["node"] for n in listed["nodes"]), ["a", "b"])
        health = await (await http_client().get(f"{a.base_url}/health")).json()
        self.assertEqual((health["status"], health["node"], health["sessions"]), ("ok", "a", 1))
        killed = await http_client().get(f"{b.base_url}/kill/{sid}")
        self.assertEqual(json.loads(await killed.content()), {"status": "killed", "id": sid})
        await client.wait_event("hangup", trackId=sid)
        await client.wait_closed()
        self.assertTrue(any(b'"event":"custom"' in chunk for chunk in seen), seen[:3])
        missing = await http_client().get(f"{b.base_url}/kill/nobody")
        self.assertEqual(missing.code, 404)

    async def test_static_peers(self) -> None:
        """peers = [A] on B: B probes A with forward=true; A takes the run's socket."""
        a = await self._daemon("a")
        b = await self._daemon("b", top=f'peers = ["127.0.0.1:{a.http_port}"]\n')
        sid = await self._run_on(a)
        await self._call_through(a, b, sid)
        await self._drain_keeps_the_tunnel(a, b)

    async def _drain_keeps_the_tunnel(self, a: Any, b: Any) -> None:
        """SIGTERM on the owner: its HTTP side stays up for the call (health 503 draining), the call
        tunnelled through B goes on, /kill through B ends it, and then the owner exits."""
        sid = await self._run_on(a)
        client = await connect(f"{b.ws_url}/call?id={sid}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": 16000}})
        await client.wait_event("answer", trackId=sid)
        a.transport.signalProcess("TERM")
        await a.wait_output("shutting down: waiting up to")
        health = await http_client().get(f"{a.base_url}/health")
        self.assertEqual((health.code, (await health.json())["status"]), (503, "draining"))
        client.send({"command": "history", "speaker": "user", "text": "still here"})
        await client.wait_event("addHistory")
        killed = await http_client().get(f"{b.base_url}/kill/{sid}")
        self.assertEqual(json.loads(await killed.content()), {"status": "killed", "id": sid})
        await client.wait_event("hangup", trackId=sid)
        await a.wait_exit()

    async def test_registry_then_redis_restart(self) -> None:
        """With Redis, B asks the registry where the id lives; Redis restarted empty: calls go on, ids return."""
        redis = await RedisServer.start(self)
        cluster = f'[cluster]\nredis_url = "{redis.url}"\nregistry_ttl = "3s"\nnode_id = "NODE"\n'
        a = await self._daemon("a", tables=cluster.replace("NODE", "a"))
        b = await self._daemon("b", tables=cluster.replace("NODE", "b"))
        sid = await self._run_on(a)
        await self._call_through(a, b, sid)
        await self._rest_through(a, b)
        # Redis goes away: each node says so once and goes on alone.
        await redis.stop()
        alone = await self._run_on(a)
        client = await connect(f"{a.ws_url}/call?id={alone}")
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": 16000}})
        await client.wait_event("answer", trackId=alone)
        await a.wait_output("call registry unreachable")
        await b.wait_output("call registry unreachable")  # B's next refresh (a third of the TTL) fails
        # Back (empty) on the same port: the next refresh rewrites what A hosts, and B finds it again.
        await RedisServer.start(self, port=redis.port)
        await a.wait_output("call registry reachable again", timeout_s=15)
        await b.wait_output("call registry reachable again", timeout_s=15)
        sid2 = await self._run_on(a)
        await self._call_through(a, b, sid2)
        client.send({"command": "hangup"})
        await client.wait_event("hangup", trackId=alone)
