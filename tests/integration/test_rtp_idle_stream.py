"""Issue 10.3 end to end: an answered call whose agent says nothing still gets RTP every 20 ms.

The real daemon (``twistd activecall``) answers an inbound INVITE through a
playbook without greeting, so no command ever plays audio.  The caller here
is a small SIP/RTP peer of our own on 127.0.0.1: it sends the INVITE (and
its ACK and BYE) and counts the RTP packets the daemon sends it, without
sending any media itself.  Everything waits with deadlines.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import Any, Optional

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import TestCase

from harness import BASE_CONFIG, _Waiters, free_port, start_daemon

_RTP = struct.Struct("!BBHII")
_PACKETS = 100


class _RtpCounter(DatagramProtocol):
    """Records (arrival, payload type, marker, seq, ts, payload) of every RTP packet (RTCP is ignored)."""

    def __init__(self, waiters: _Waiters) -> None:
        self.packets: list[tuple[float, int, bool, int, int, bytes]] = []
        self._waiters = waiters

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if len(data) < 12 or 200 <= data[1] <= 204:
            return
        _, mpt, seq, ts, _ = _RTP.unpack_from(data)
        self.packets.append((reactor.seconds(), mpt & 0x7F, bool(mpt & 0x80), seq, ts, data[12:]))
        self._waiters.poke()


class _SipCaller(DatagramProtocol):
    """A one-call SIP UAC: INVITE with our SDP, ACK the 200, BYE at the end."""

    def __init__(self, waiters: _Waiters) -> None:
        self.responses: list[bytes] = []
        self._waiters = waiters

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if data.startswith(b"SIP/2.0 "):
            self.responses.append(data)
        elif not data.startswith(b"ACK "):
            # A request from the daemon (BYE, OPTIONS...): 200 it so nothing retransmits.
            self.transport.write(_reply_ok(data), addr)
        self._waiters.poke()

    def final(self, method: bytes) -> Optional[bytes]:
        for r in self.responses:
            if not r.startswith(b"SIP/2.0 1") and _header(r, b"cseq").endswith(method):
                return r
        return None


def _header(msg: bytes, name: bytes) -> bytes:
    for line in msg.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return b""


def _reply_ok(request: bytes) -> bytes:
    keep = [line for line in request.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
            if line.split(b":", 1)[0].strip().lower() in (b"via", b"from", b"to", b"call-id", b"cseq")]
    return b"SIP/2.0 200 OK\r\n" + b"\r\n".join(keep) + b"\r\nContent-Length: 0\r\n\r\n"


class IdleStreamTests(TestCase):
    """The daemon sends 50 packets/s of silence on an answered SIP call with nothing to say."""

    timeout = 90

    async def _call(self, daemon: Any, call_id: str, formats: str, rtpmaps: str) -> tuple[_RtpCounter, Any]:
        waiters = _Waiters()
        rtp = _RtpCounter(waiters)
        rtp_port = reactor.listenUDP(0, rtp, interface="127.0.0.1")
        self.addCleanup(rtp_port.stopListening)
        sip = _SipCaller(waiters)
        sip_port = reactor.listenUDP(free_port(socket.SOCK_DGRAM), sip, interface="127.0.0.1")
        self.addCleanup(sip_port.stopListening)
        me, media = sip_port.getHost().port, rtp_port.getHost().port
        target = ("127.0.0.1", daemon.sip_port)
        sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               f"m=audio {media} RTP/AVP {formats}\r\n{rtpmaps}a=ptime:20\r\na=sendrecv\r\n")
        head = (f"Via: SIP/2.0/UDP 127.0.0.1:{me};branch=z9hG4bK{call_id}{{n}};rport\r\n"
                f"From: <sip:alice@127.0.0.1:{me}>;tag=a{call_id}\r\n")
        sip.transport.write((
            f"INVITE sip:idle@127.0.0.1:{daemon.sip_port} SIP/2.0\r\n" + head.format(n=1)
            + f"To: <sip:idle@127.0.0.1:{daemon.sip_port}>\r\nCall-ID: {call_id}\r\nCSeq: 1 INVITE\r\n"
            f"Max-Forwards: 70\r\nContact: <sip:alice@127.0.0.1:{me}>\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(sdp)}\r\n\r\n{sdp}").encode(), target)
        ok = await waiters.wait(lambda: sip.final(b"INVITE"), 30, "the final response to the INVITE")
        self.assertTrue(ok.startswith(b"SIP/2.0 200"), ok[:200])
        to = _header(ok, b"to").decode()
        contact = _header(ok, b"contact").decode().strip("<>").split(">")[0]
        dialog = f"To: {to}\r\nCall-ID: {call_id}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n"
        sip.transport.write((f"ACK {contact} SIP/2.0\r\n" + head.format(n=2) + dialog + "CSeq: 1 ACK\r\n\r\n").encode(),
                            target)

        async def hang_up() -> None:
            sip.transport.write((f"BYE {contact} SIP/2.0\r\n" + head.format(n=3) + dialog + "CSeq: 2 BYE\r\n\r\n")
                                .encode(), target)
            bye = await waiters.wait(lambda: sip.final(b"BYE"), 30, "the response to our BYE")
            self.assertTrue(bye.startswith(b"SIP/2.0 200"), bye[:200])

        return rtp, (waiters, hang_up)

    async def test_idle_call_gets_50_packets_per_second(self) -> None:
        """Without CN offered: >= 45 packets/s of PCMU silence, continuous seq/ts, one marker; with CN: CN packets only."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "config", "playbook"))
        with open(os.path.join(workdir, "config", "playbook", "idle.md"), "w") as f:
            f.write("---\nllm:\n  provider: openai\n---\nYou say nothing.\n")
        base = 20000 + free_port(socket.SOCK_DGRAM) % 20000 & ~1
        config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 100}\n" + BASE_CONFIG
                  + '[handler]\ntype = "playbook"\n[[handler.rules]]\ncallee = "^sip:idle@"\nplaybook = "idle.md"\n')
        daemon = await start_daemon(workdir, config)
        self.addCleanup(daemon.stop)

        rtp, (waiters, hang_up) = await self._call(daemon, "idle-1", "0 101", "a=rtpmap:101 telephone-event/8000\r\n")
        await waiters.wait(lambda: len(rtp.packets) >= _PACKETS, 10, f"{_PACKETS} RTP packets")
        pkts = rtp.packets[:_PACKETS]
        rate = (len(pkts) - 1) / (pkts[-1][0] - pkts[0][0])
        self.assertGreaterEqual(rate, 45.0, f"{rate:.1f} packets/s")
        self.assertEqual({p[1] for p in pkts}, {0})
        self.assertEqual({p[5] for p in pkts}, {b"\xff" * 160}, "PCMU silence")
        self.assertEqual([(p[3] - pkts[0][3]) & 0xFFFF for p in pkts], list(range(_PACKETS)))
        self.assertEqual([(p[4] - pkts[0][4]) & 0xFFFFFFFF for p in pkts], [160 * k for k in range(_PACKETS)])
        self.assertEqual([p[2] for p in pkts], [True] + [False] * (_PACKETS - 1), "a marker on the first packet only")
        await hang_up()

        # Comfort noise offered: a CN packet at the start of the silence, then one a second, nothing between.
        rtp, (waiters, hang_up) = await self._call(daemon, "idle-2", "0 13", "")
        await waiters.wait(lambda: len(rtp.packets) >= 2, 10, "two CN packets")
        first, second = rtp.packets[:2]
        self.assertEqual({(p[1], len(p[5])) for p in rtp.packets}, {(13, 1)})
        self.assertEqual(((second[3] - first[3]) & 0xFFFF, (second[4] - first[4]) & 0xFFFFFFFF), (1, 50 * 160))
        self.assertGreater(second[0] - first[0], 0.8)
        await hang_up()
