"""Three daemons behind the shipped Kamailio edge (``etc/kamailio/activecall-edge.cfg``), all on 127.0.0.1.

* SIPp places calls through the edge (INVITE, ACK and BYE record-routed, calls held a few seconds)
  and every node answers some (its ``/metrics``, and the edge's log of where each INVITE went);
* one node gets SIGTERM mid-load: it answers the edge's OPTIONS probe 503, the edge takes it out
  within one probe interval, new calls go to the other two, its running calls end normally (SIPp
  counts no failed call) and it exits once they are over;
* a node at ``[sip_limits] max_calls`` answers 503 and the edge retries the INVITE on another node.

Every wait has a deadline; nothing sleeps. Skipped without kamailio/kamcmd or SIPp.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from edge import (Edge, edge_available, node_config, sipp_counts, spawn_edge, spawn_sipp, wait, wait_states,
                  write_playbook)
from harness import Daemon, free_port, http_client, start_daemon
from test_sip_limits_sipp import sample

PING_INTERVAL_S = 1


class ClusterEdgeTestCase(TestCase):
    """Starts N nodes and the edge in front of them; stops every process."""

    timeout = 240

    def setUp(self) -> None:
        missing = edge_available()
        if missing:
            raise SkipTest(missing)
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)

    async def nodes(self, extras: list[str]) -> list[Daemon]:
        """One daemon per entry of ``extras`` (more config for it), each in its own directory with its own ports."""
        nodes = []
        for i, extra in enumerate(extras):
            workdir = os.path.join(self.workdir, f"node{i + 1}")
            write_playbook(workdir)
            base = 20000 + (free_port(socket.SOCK_DGRAM) % 10000 + 1000 * i) % 20000 & ~1
            node = await start_daemon(workdir, node_config(base, "graceful_shutdown_timeout = 60\n", extra))
            self.addCleanup(node.stop)
            nodes.append(node)
        return nodes

    async def edge(self, nodes: list[Daemon], **kwargs: Any) -> Edge:
        """The edge in front of ``nodes``, once it probed every one of them active."""
        # Short path: the control socket's path must fit in 104 bytes.
        edge_dir = tempfile.mkdtemp(prefix="edge-")
        self.addCleanup(shutil.rmtree, edge_dir, True)
        edge = spawn_edge(edge_dir, [n.sip_port for n in nodes],
                          ping_interval_s=PING_INTERVAL_S, **kwargs)
        self.addCleanup(edge.stop)
        await wait_states(edge, {n.sip_port: "A" for n in nodes})
        return edge

    def sipp(self, edge: Edge, *args: str, name: str = "sipp") -> Daemon:
        proc = spawn_sipp(self.workdir, edge.port, *args, name=name)
        self.addCleanup(proc.stop)
        return proc

    async def answered(self, node: Daemon) -> int:
        """INVITEs ``node`` answered 200, from its /metrics."""
        response = await http_client().get(f"{node.base_url}/metrics")
        text = (await treq.content(response)).decode()
        return int(sample(text, "activecall_sip_responses_total", direction="out", method="INVITE", code="200"))

    async def refused_max_calls(self, node: Daemon) -> int:
        response = await http_client().get(f"{node.base_url}/metrics")
        text = (await treq.content(response)).decode()
        return int(sample(text, "activecall_sip_refused_total", reason="max_calls"))


class SpreadAndDrainTests(ClusterEdgeTestCase):
    """Load spread over three nodes; one drains mid-load without losing a call."""

    async def test_every_node_answers_and_a_drained_node_loses_no_call(self) -> None:
        """60 calls of 4 s at 5 calls/s: all three nodes answer; node 3 drains mid-load; no call fails."""
        # (the "-max_retrans 8" keeps SIPp's retransmission budget above the edge's failover time)
        nodes = await self.nodes(["", "", ""])
        edge = await self.edge(nodes)
        total = 60
        sipp = self.sipp(edge, "-r", "5", "-m", str(total), "-l", "40", "-d", "4000", "-timeout", "120s",
                         "-max_retrans", "8")
        answered: dict[int, int] = {}

        async def poll() -> bool:
            for i, node in enumerate(nodes):
                answered[i] = await self.answered(node)
            return min(answered.values()) >= 3

        state = {"ok": False}

        def check() -> bool:
            from twisted.internet.defer import Deferred

            Deferred.fromCoroutine(poll()).addCallback(lambda ok: state.update(ok=ok)).addErrback(lambda f: None)
            return bool(state["ok"])

        # Calls last 4 s: with three answered, node 3 holds established calls when it drains.
        await wait(check, 60, "every node answered three calls", interval_s=0.2)
        drained = nodes[2]
        before = await self.answered(drained)
        self.assertGreaterEqual(before, 3)
        dispatched_before = edge.dispatched(drained.sip_port)

        drained.transport.signalProcess("TERM")
        t0 = time.monotonic()
        await wait_states(edge, {drained.sip_port: "I"}, timeout_s=10)
        out_after_s = time.monotonic() - t0
        # Taken out by its 503 to a probe (or to an INVITE) within one probe interval, plus the time to answer.
        self.assertLess(out_after_s, PING_INTERVAL_S + 1.5, edge.output[-3000:])
        self.assertIn("draining: new INVITEs and out-of-dialog OPTIONS get 503", drained.output)
        dispatched_at_out = edge.dispatched(drained.sip_port)

        (code,) = await sipp.wait_exit(150)
        ok, failed = sipp_counts(sipp.output)
        self.assertEqual((ok, failed), (total, 0), sipp.output[-3000:] + edge.output[-3000:])
        self.assertEqual(code, 0)
        # Nothing more went to the drained node once the edge had taken it out.
        self.assertEqual(edge.dispatched(drained.sip_port), dispatched_at_out)
        self.assertLessEqual(dispatched_at_out - dispatched_before, 1, "at most one INVITE raced the probe (and got 503)")
        # The other two took the rest.
        rest = [await self.answered(n) for n in nodes[:2]]
        self.assertEqual(sum(rest) + before, total, (rest, before))
        # The drained node waited for its calls, then exited cleanly.
        (drained_code,) = await drained.wait_exit(30)
        # twistd ends by re-raising the SIGTERM it handled, once the services stopped.
        self.assertIn(drained_code, (0, -15), drained.output[-3000:])
        self.assertIn("Server Shut Down.", drained.output)
        self.assertNotIn("call(s) still running", drained.output, "no call was cut by the shutdown timeout")


class EdgeConfigTests(TestCase):
    """The shipped configuration parses in each of its variants."""

    def setUp(self) -> None:
        missing = edge_available()
        if missing:
            raise SkipTest(missing)

    async def test_variants_parse(self) -> None:
        """``kamailio -c`` accepts the edge config as shipped, round-robin, with TCP, and with upstream registrations."""
        from twisted.internet.utils import getProcessOutputAndValue

        from edge import EDGE_CFG, KAMAILIO, MODULES
        from harness import REPO

        example = os.path.join(REPO, "etc", "kamailio", "dispatcher.list.example")
        dbtext = os.path.join(REPO, "etc", "kamailio", "dbtext")
        base = ["-c", "-f", EDGE_CFG, "-A", f"EDGE_LISTEN=udp:127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                "-A", f'DISPATCHER_LIST="{example}"', "-A", f'MODULES_PATH="{MODULES}"']
        for extra in ([], ["-A", "WITH_ROUND_ROBIN"],
                      ["-A", "WITH_TCP", "-A", f"EDGE_LISTEN_TCP=tcp:127.0.0.1:{free_port()}"],
                      ["-A", "WITH_UAC_REG", "-A", f'UAC_REG_DB_URL="text://{dbtext}"']):
            out, err, code = await getProcessOutputAndValue(KAMAILIO, base + extra)
            self.assertEqual(code, 0, (extra, err.decode(errors="replace")[-2000:]))


class FullNodeTests(ClusterEdgeTestCase):
    """A node at max_calls answers 503; the edge tries another node."""

    async def test_full_node_503_is_retried_elsewhere(self) -> None:
        """Node 1 (first choice among equals) holds one call at most; its 503s are retried and no call fails."""
        nodes = await self.nodes(["[sip_limits]\nmax_calls = 1\n", "", ""])
        edge = await self.edge(nodes)
        total = 12
        sipp = self.sipp(edge, "-r", "6", "-m", str(total), "-l", "12", "-d", "3000", "-timeout", "60s")
        (code,) = await sipp.wait_exit(90)
        self.assertEqual(sipp_counts(sipp.output), (total, 0), sipp.output[-3000:] + edge.output[-3000:])
        self.assertEqual(code, 0)
        refused = await self.refused_max_calls(nodes[0])
        self.assertGreater(refused, 0, "the full node was asked and refused")
        self.assertIn("retried on node", edge.output)
        answered = [await self.answered(n) for n in nodes]
        self.assertEqual(sum(answered), total, answered)
        self.assertTrue(all(answered), answered)
        self.assertEqual((await wait_states(edge, {nodes[0].sip_port: "A"}))[nodes[0].sip_port][0], "A",
                         "a full node stays in the set")
