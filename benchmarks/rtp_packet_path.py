"""Micro-benchmark of the per-packet RTP path; prints microseconds per packet.

Receive: parse_rtp (reused view) -> RtpSession.receive_rtp -> JitterBuffer.put -> pop.
Send:    RtpStream.build (preallocated buffer) -> SrtpContext.protect.
Unprotect: SrtpContext.unprotect -> parse_rtp.

Run: ``python benchmarks/rtp_packet_path.py [packets]``.  At 50 packets/s per
stream, N µs/packet means one core serves about 20000/N streams on this path.
"""

from __future__ import annotations

import random
import sys
import timeit

from activecall.rtp.jitter import JitterBuffer
from activecall.rtp.packet import RtpHeaderView, build_rtp, parse_rtp
from activecall.rtp.session import RtpSession
from activecall.rtp.srtp import AES_CM_128_HMAC_SHA1_80, SrtpContext, generate_crypto


def _receive(count: int) -> float:
    packets = [build_rtp(0, i & 0xFFFF, 160 * i, 0x1234, b"\xff" * 160) for i in range(count)]
    session = RtpSession(random.Random(7), 0.0, clock_rate_hz=8000, payload_type=0, cname=b"bench", min_sequential=1)
    jb = JitterBuffer()
    view = RtpHeaderView()

    def run() -> None:
        now = 0.0
        for data in packets:
            h = parse_rtp(data, into=view)
            session.receive_rtp(h, now)
            jb.put(h.sequence, h.timestamp, h.payload, now, h.marker)
            jb.pop(now)
            now += 0.02

    return min(timeit.repeat(run, number=1, repeat=5)) / count * 1e6


def _send(count: int) -> tuple[float, float, float]:
    rng = random.Random(7)
    a, b = generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng), generate_crypto(1, AES_CM_128_HMAC_SHA1_80, rng)
    tx = SrtpContext.from_sdes(a, b)
    session = RtpSession(rng, 0.0, clock_rate_hz=8000, payload_type=0, cname=b"bench")
    payload = memoryview(b"\xff" * 160)
    wire: list[bytes] = []

    def build_only() -> None:
        stream = session.sender
        for i in range(count):
            stream.build(payload, 160, i * 0.02)

    def build_protect() -> None:
        # Reads the current ``session``/``tx``; they are rebound below for the wire run.
        stream = session.sender
        wire.clear()
        for i in range(count):
            wire.append(tx.protect(stream.build(payload, 160, i * 0.02)))

    view = RtpHeaderView()

    def unprotect() -> None:
        ctx = SrtpContext.from_sdes(b, a)  # fresh replay window each repeat
        for w in wire:
            parse_rtp(ctx.unprotect(w), into=view)

    b_only = min(timeit.repeat(build_only, number=1, repeat=5)) / count * 1e6
    b_prot = min(timeit.repeat(build_protect, number=1, repeat=5)) / count * 1e6
    # Fresh sender and keys' sending side, so the wire starts at rollover counter 0.
    tx = SrtpContext.from_sdes(a, b)
    session = RtpSession(random.Random(8), 0.0, clock_rate_hz=8000, payload_type=0, cname=b"bench")
    build_protect()
    unprot = min(timeit.repeat(unprotect, number=1, repeat=5)) / count * 1e6
    return b_only, b_prot, unprot


def main() -> None:
    """Print µs/packet for each stage."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    recv = _receive(count)
    b_only, b_prot, unprot = _send(count)
    print(f"packets per run: {count} (PCMU, 160-byte payload)")
    print(f"parse -> stats -> jitter put -> pop : {recv:7.2f} us/packet")
    print(f"build (preallocated)                : {b_only:7.2f} us/packet")
    print(f"build + SRTP protect (_80)          : {b_prot:7.2f} us/packet")
    print(f"SRTP unprotect + parse              : {unprot:7.2f} us/packet")
    per_stream = (recv + b_prot + unprot) * 50
    print(f"one SRTP stream, both directions    : {per_stream:7.0f} us/s of CPU (~{1e6 / per_stream:.0f} streams/core)")


if __name__ == "__main__":
    main()
