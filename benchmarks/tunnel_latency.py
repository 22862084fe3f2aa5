"""The setup latency a tunnelled control socket adds (docs/cluster.md): two daemons on 127.0.0.1.

A ``POST /api/playbook/run`` id waits on node A; a client opens ``/call?id=`` and sends ``invite``
either on A itself (direct) or on node B, which finds A (through ``peers``, or through Redis with
``--redis``) and tunnels the socket.  Printed: connect (upgrade) and connect + invite -> answer times,
direct and tunnelled, p50/p95 over ``--calls`` calls, and what the tunnel adds.

    python benchmarks/tunnel_latency.py --calls 50 [--redis]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "integration"))

from twisted.internet import reactor, task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from harness import BASE_CONFIG, connect, http_client, start_daemon  # noqa: E402

PLAYBOOK = "---\ntts: {provider: piper}\n---\nYou answer.\n"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_call(owner: Any, via: Any) -> tuple[float, float]:
    response = await http_client().post(f"{owner.base_url}/api/playbook/run", json.dumps({"content": PLAYBOOK}).encode(),
                                        headers={"Content-Type": "application/json"})
    sid = json.loads(await response.content())["session_id"]
    started = reactor.seconds()
    client = await connect(f"{via.ws_url}/call?id={sid}")
    upgraded = reactor.seconds()
    client.send({"command": "invite", "option": {"codec": "pcm", "sampleRate": 16000}})
    await client.wait_event("answer", trackId=sid)
    answered = reactor.seconds()
    client.send({"command": "hangup"})
    await client.wait_closed()
    return (upgraded - started) * 1000, (answered - started) * 1000


async def main(args: argparse.Namespace) -> None:
    workdir = tempfile.mkdtemp(prefix="tunnel-bench-")
    redis = None
    try:
        tables = ""
        if args.redis:
            from test_cluster_tunnel import RedisServer

            class _Test:  # what RedisServer.start needs of a test case
                def mktemp(self) -> str:
                    return os.path.join(workdir, "redis")

                def addCleanup(self, f: Any, *a: Any) -> None:
                    cleanups.append((f, a))

            cleanups: list[Any] = []
            redis = await RedisServer.start(_Test())  # type: ignore[arg-type]
            tables = f'[cluster]\nredis_url = "{redis.url}"\nregistry_ttl = "10s"\nnode_id = "NODE"\n'
        a_dir, b_dir = os.path.join(workdir, "a"), os.path.join(workdir, "b")
        os.makedirs(a_dir)
        os.makedirs(b_dir)
        a = await start_daemon(a_dir, BASE_CONFIG + tables.replace("NODE", "a"))
        top = "" if args.redis else f'peers = ["127.0.0.1:{a.http_port}"]\n'
        b = await start_daemon(b_dir, top + BASE_CONFIG + tables.replace("NODE", "b"))
        try:
            results: dict[str, list[tuple[float, float]]] = {"direct": [], "tunnelled": []}
            for i in range(args.calls + 3):
                for name, via in (("direct", a), ("tunnelled", b)):
                    timing = await one_call(a, via)
                    if i >= 3:  # warm-up
                        results[name].append(timing)
            print(f"calls                 {args.calls} each way, registry: {'Redis' if args.redis else 'static peers'}")
            for name, timings in results.items():
                up = [t[0] for t in timings]
                ans = [t[1] for t in timings]
                print(f"{name:<21} upgrade p50 {pct(up, .5):6.1f} ms p95 {pct(up, .95):6.1f} ms; "
                      f"to answer p50 {pct(ans, .5):6.1f} ms p95 {pct(ans, .95):6.1f} ms")
            added = statistics.median(t[1] for t in results["tunnelled"]) - statistics.median(
                t[1] for t in results["direct"])
            print(f"tunnel adds           {added:.1f} ms to the answer (median)")
        finally:
            await b.stop()
            await a.stop()
    finally:
        if redis is not None:
            await redis.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--redis", action="store_true", help="find the owner through Redis instead of peers")
    options = parser.parse_args()
    task.react(lambda _reactor: Deferred.fromCoroutine(main(options)))
