"""End to end: two /call sessions on one daemon bridged (``bridge``/``unbridge``, protocol.md §5.8).

Each WebSocket client is a caller sending a tone as raw PCM; once A bridges to B, each client hears the
other's tone in the audio the daemon sends back, each session reports its ``bridge:`` track, and after
``unbridge`` (or when one call ends) the audio stops.
"""

from __future__ import annotations

import os

import numpy as np
from twisted.trial.unittest import TestCase

from harness import BASE_CONFIG, CallClient, connect, start_daemon, talk_in_loop
from media_peer import power_at, tone

RATE = 16000


class BridgeTests(TestCase):
    timeout = 60

    async def _session(self, daemon: object, sid: str, hz: float) -> CallClient:
        client = await connect(f"{daemon.ws_url}/call?id={sid}")  # type: ignore[attr-defined]
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": RATE}})
        await client.wait_event("answer", trackId=sid)
        talk_in_loop(self, client, tone(hz, 1.0, RATE, 8000))
        return client

    def heard(self, client: CallClient, since: int, hz: float) -> bool:
        pcm = b"".join(f for _, f in client.frames[since:])
        return len(pcm) >= 640 * 25 and power_at(np.frombuffer(pcm[-640 * 25:], dtype="<i2"), hz, RATE) > 500

    async def test_two_callers_hear_each_other_until_unbridged(self) -> None:
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        daemon = await start_daemon(workdir, BASE_CONFIG)
        self.addCleanup(daemon.stop)
        a = await self._session(daemon, "br-a", 440.0)
        b = await self._session(daemon, "br-b", 1000.0)
        a.send({"command": "bridge", "targetSessionId": "br-b"})
        await a.wait_event("trackStart", trackId="bridge:br-a:to:br-b")
        await b.wait_event("trackStart", trackId="bridge:br-b:to:br-a")
        mark_a, mark_b = len(a.frames), len(b.frames)
        await a.factory.waiters.wait(lambda: self.heard(a, mark_a, 1000.0), 10, "A hearing B's 1 kHz")
        await b.factory.waiters.wait(lambda: self.heard(b, mark_b, 440.0), 10, "B hearing A's 440 Hz")
        self.assertFalse(self.heard(a, mark_a, 440.0), "A does not hear itself")
        a.send({"command": "unbridge", "targetSessionId": "br-b"})
        await a.wait_event("trackEnd", trackId="bridge:br-a:to:br-b")
        await b.wait_event("trackEnd", trackId="bridge:br-b:to:br-a")
        a.send({"command": "bridge", "targetSessionId": "nobody"})
        error = await a.wait_event("error", sender="command")
        self.assertEqual(error["error"], "bridge target session not found: nobody")
        # Bridged again, B hangs up: A's bridge track ends and A's call goes on.
        a.send({"command": "bridge", "targetSessionId": "br-b"})
        await a.factory.waiters.wait(
            lambda: sum(1 for e in a.events if e.get("trackId") == "bridge:br-a:to:br-b"
                        and e["event"] == "trackStart") == 2, 10, "the second bridge")
        b.send({"command": "hangup"})
        await b.wait_event("hangup", trackId="br-b")
        await a.factory.waiters.wait(
            lambda: sum(1 for e in a.events if e.get("trackId") == "bridge:br-a:to:br-b"
                        and e["event"] == "trackEnd") == 2, 10, "the bridge's end with B's call")
        a.send({"command": "tts", "text": "Still here.", "playId": "p", "endOfStream": True,
                "option": {"provider": "piper"}})
        await a.wait_event("trackEnd", trackId="server-side-track", playId="p", timeout_s=30)
