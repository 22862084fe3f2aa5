"""End to end: keys pressed on a bridged call reach the other side (``refer``, ``forwardDtmf``).

The caller is SIPp (``sipp/uas_play_pcap.xml``) playing a pcap of RFC 4733 key presses into a ``/call/sip``
call; the transfer target is a second SIPp run with ``-rtp_echo``, which sends back every packet it gets.
What the daemon relays to the target therefore comes back to its transfer leg and is reported as
``dtmf{refer:true}``: RFC 4733 events when the target negotiated telephone-event
(``sipp/uas_telephone_event.xml``), in-band tones (read back by the daemon's tone detector) when it did not
(SIPp's built-in ``uas``).
"""

from __future__ import annotations

import os
import shutil
import socket
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from harness import BASE_CONFIG, Daemon, connect, free_port, start_daemon
from media_peer import RtpStream, dtmf_rtp_packets, g711_rtp_packets, write_rtp_pcap

HERE = os.path.dirname(os.path.abspath(__file__))
CALLER = os.path.join(HERE, "sipp", "uas_play_pcap.xml")
TARGET_TE = os.path.join(HERE, "sipp", "uas_telephone_event.xml")
SID = "relay"
SST = "server-side-track"
KEYS = "42#"


def keys_pcap(path: str, lead_s: float) -> None:
    """``lead_s`` of silence, then each key of KEYS as RFC 4733 events 0.4 s apart, then 1 s of silence."""
    stream = RtpStream()
    packets = g711_rtp_packets(stream, bytes(int(8000 * lead_s) * 2), alaw=False)
    for key in KEYS:
        packets += dtmf_rtp_packets(stream, key)
        packets += g711_rtp_packets(stream, bytes(8000 * 2 * 2 // 5), alaw=False)
    packets += g711_rtp_packets(stream, bytes(8000 * 2), alaw=False)
    write_rtp_pcap(path, packets)


class DtmfRelayTests(TestCase):
    timeout = 90

    def _sipp(self, argv: list[str]) -> tuple[Daemon, int]:
        port = free_port(socket.SOCK_DGRAM)
        peer = Daemon()
        full = ["sipp", *argv, "-p", str(port), "-i", "127.0.0.1", "-mp", str(free_port(socket.SOCK_DGRAM) & ~1),
                "-m", "1", "-nostdin", "-timeout", "60s"]
        reactor.spawnProcess(peer, shutil.which("sipp"), full, env=dict(os.environ), path=self.workdir)
        self.addCleanup(peer.stop)
        return peer, port

    async def _relayed(self, target_argv: list[str]) -> tuple[list[str], list[str]]:
        """The keys the caller pressed (dtmf on the call) and those that came back from the target."""
        if shutil.which("sipp") is None:
            raise SkipTest("sipp is not installed")
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        keys_pcap(os.path.join(self.workdir, "speech.pcap"), lead_s=3.0)
        base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
        daemon = await start_daemon(self.workdir, f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n" + BASE_CONFIG)
        self.addCleanup(daemon.stop)
        target, target_port = self._sipp(target_argv)
        caller, caller_port = self._sipp(["-sf", CALLER])
        client = await connect(f"{daemon.ws_url}/call/sip?id={SID}")
        self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
        client.send({"command": "invite", "option": {"callee": f"sip:caller@127.0.0.1:{caller_port}",
                                                     "caller": "sip:bot@127.0.0.1"}})
        await client.wait_event("answer", trackId=SID)
        client.send({"command": "refer", "caller": "", "callee": f"sip:human@127.0.0.1:{target_port}",
                     "options": {"autoHangup": False}})
        await client.wait_event("answer", trackId=SST, refer=True)
        pressed = [(await client.wait_event("dtmf", trackId=SID, digit=key, timeout_s=20))["digit"] for key in KEYS]
        for key in KEYS:
            await client.wait_event("dtmf", trackId=SST, digit=key, timeout_s=10)
        back = [e["digit"] for e in client.events if e["event"] == "dtmf" and e.get("trackId") == SST]
        client.send({"command": "hangup"})
        await client.wait_event("hangup", trackId=SID)
        for peer in (caller, target):
            (code,) = await peer.wait_exit()
            self.assertEqual(code, 0, peer.output[-2000:])
        return pressed, back

    async def test_keys_relayed_as_rfc4733_events(self) -> None:
        """A target with telephone-event gets the caller's keys as RFC 4733 events (echoed back: dtmf{refer})."""
        pressed, back = await self._relayed(["-sf", TARGET_TE, "-rtp_echo"])
        self.assertEqual((pressed, back), (list(KEYS), list(KEYS)))

    async def test_keys_relayed_as_tones_without_telephone_event(self) -> None:
        """A target without telephone-event gets the keys as in-band tones, which the daemon hears back."""
        pressed, back = await self._relayed(["-sn", "uas", "-rtp_echo"])
        self.assertEqual((pressed, back), (list(KEYS), list(KEYS)))
