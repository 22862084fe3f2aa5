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
import re
import shutil
import socket
import tempfile
import time
from typing import Any
from urllib.parse import quote

import treq
from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, TestCase

from edge import (Edge, edge_available, node_config, sipp_counts, spawn_edge, spawn_sipp, wait, wait_states,
                  write_playbook)
from harness import Daemon, free_port, http_client, start_daemon
from test_sip_limits_sipp import sample

from activecall.media._audioop import audioop


def audioop_rms(pcm: bytes) -> float:
    return float(audioop.rms(pcm, 2)) if len(pcm) >= 2 else 0.0

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

    @staticmethod
    def answered(node: Daemon) -> int:
        """Inbound calls ``node`` took: one session per answered call in its log (a refusal opens none)."""
        return len(re.findall(r"session \S+ opened \(sip\)", node.output))

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
        # Calls last 4 s: with three answered, node 3 holds established calls when it drains.
        await wait(lambda: min(self.answered(n) for n in nodes) >= 3, 60, "every node answered three calls")
        drained = nodes[2]
        before = self.answered(drained)
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
        # Since the SIGTERM: an INVITE already on its way, one that raced the probe (and got 503).
        self.assertLessEqual(dispatched_at_out - dispatched_before, 2)
        # The other two took the rest.
        (drained_code,) = await drained.wait_exit(30)
        rest = [self.answered(n) for n in nodes[:2]]
        after = self.answered(drained)
        self.assertEqual(sum(rest) + after, total, (rest, after))
        self.assertLessEqual(after - before, 1, "at most an INVITE already on its way when the drain began")
        # The drained node waited for its calls, then exited cleanly.
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
        answered = [self.answered(n) for n in nodes]
        self.assertEqual(sum(answered), total, answered)
        self.assertTrue(all(answered), answered)
        self.assertEqual((await wait_states(edge, {nodes[0].sip_port: "A"}))[nodes[0].sip_port][0], "A",
                         "a full node stays in the set")


class TrunkRegistrationTests(ClusterEdgeTestCase):
    """``WITH_UAC_REG``: the edge, not the nodes, registers to an upstream registrar (Kamailio with digest)
    and routes the trunk's calls to the nodes."""

    timeout = 90

    async def trunk_edge(self, node_ports: list[int], rows: str = "") -> tuple[Edge, int, str, Daemon]:
        """A registrar (Kamailio with digest) and the edge with one uacreg account, l_uuid ``trunk1`` for
        local user 2001, registered there, plus ``rows`` (more uacreg lines):
        (edge, edge port, the registrar's control socket, registrar)."""
        from test_sip_kamailio import CONFIG, PASSWORD, Kamailio as Registrar

        from edge import KAMAILIO, MODULES
        from harness import REPO

        tmp = tempfile.mkdtemp(prefix="reg-")
        self.addCleanup(shutil.rmtree, tmp, True)
        registrar_port = free_port(socket.SOCK_DGRAM)
        registrar_ctl = os.path.join(tmp, "r.sock")
        cfg = os.path.join(tmp, "registrar.cfg")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(port=registrar_port, modules=MODULES, ctl=registrar_ctl, password=PASSWORD)
                    .replace('modparam("registrar", "max_expires", 3)', 'modparam("registrar", "max_expires", 60)'))
        registrar = Registrar()
        reactor.spawnProcess(registrar, KAMAILIO, [KAMAILIO, "-DD", "-E", "-f", cfg, "-Y", tmp, "-w", tmp],
                             env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
        self.addCleanup(registrar.stop)

        # The shipped empty table plus the account.
        dbtext = os.path.join(tmp, "dbtext")
        shutil.copytree(os.path.join(REPO, "etc", "kamailio", "dbtext"), dbtext)
        with open(os.path.join(dbtext, "uacreg"), "a") as f:
            f.write(f"1:trunk1:2001:127.0.0.1:2001:127.0.0.1:127.0.0.1:2001:{PASSWORD}::"
                    f"sip\\:127.0.0.1\\:{registrar_port}:60:0:0::\n" + rows)
        edge_dir = os.path.join(tmp, "e")
        edge_port = free_port(socket.SOCK_DGRAM)
        edge = spawn_edge(edge_dir, node_ports, ping_interval_s=PING_INTERVAL_S, defines=(
            "WITH_UAC_REG", f'UAC_REG_DB_URL="text://{dbtext}"', f'UAC_REG_CONTACT="127.0.0.1:{edge_port}"'),
            port=edge_port)
        self.addCleanup(edge.stop)
        return edge, edge_port, registrar_ctl, registrar

    async def test_edge_registers_the_uacreg_account(self) -> None:
        """A uacreg row makes the edge REGISTER (answering the digest challenge); the registrar binds the edge's contact."""
        from twisted.internet.task import deferLater
        from twisted.internet.utils import getProcessOutputAndValue

        edge, edge_port, registrar_ctl, registrar = await self.trunk_edge([free_port(socket.SOCK_DGRAM)])
        deadline = time.monotonic() + 30
        dump = ""
        while f"sip:trunk1@127.0.0.1:{edge_port}" not in dump:
            if time.monotonic() > deadline:
                self.fail(f"no binding at the registrar: {dump}\n{edge.output[-3000:]}\n"
                          f"{registrar.log.decode(errors='replace')[-2000:]}")
            await deferLater(reactor, 0.2, lambda: None)
            out, _, code = await getProcessOutputAndValue("kamcmd", ["-s", f"unix:{registrar_ctl}", "ul.dump"])
            dump = out.decode(errors="replace") if code == 0 else ""
        self.assertIn("AoR: 2001", dump)
        info = await edge.kamcmd("uac.reg_info", "l_uuid", "trunk1")
        self.assertIn("trunk1", info)

    async def test_call_from_the_trunk_reaches_a_node(self) -> None:
        """The carrier sends a call to the registered contact (sip:trunk1@edge): the edge restores the local
        user (sip:2001@...) and dispatches it to a node, which answers; the call completes through the edge."""
        [node] = await self.nodes([""])
        edge, _, _, _ = await self.trunk_edge([node.sip_port])
        await wait_states(edge, {node.sip_port: "A"})
        carrier = self.sipp(edge, "-s", "trunk1", "-m", "1", "-d", "1000", "-timeout", "30s")
        (code,) = await carrier.wait_exit(45)
        self.assertEqual(sipp_counts(carrier.output), (1, 0), carrier.output[-3000:] + edge.output[-3000:])
        self.assertEqual(code, 0)
        self.assertIn("call from a registered trunk for sip:2001@127.0.0.1", edge.output)
        self.assertEqual(self.answered(node), 1)


    async def test_node_call_out_on_a_trunk_gets_the_accounts_credentials(self) -> None:
        """A node calls a number with the account's l_uuid as its From user: the edge sends the INVITE to
        that number at the carrier (the account's auth_proxy), answers the carrier's digest challenge with
        the account's credentials (SIPp verifies them), and the call is answered, then hung up by the node."""
        [node] = await self.nodes([""])
        carrier_port = free_port(socket.SOCK_DGRAM)
        # Account trunk2: registration disabled (flags 1), calls only; SIPp's scenario expects agent/s3cret.
        row = f"2:trunk2:2002:127.0.0.1:agent:127.0.0.1:sipp.test:agent:s3cret::sip\\:127.0.0.1\\:{carrier_port}:60:1:0::\n"
        edge, edge_port, _, _ = await self.trunk_edge([node.sip_port], rows=row)
        await wait_states(edge, {node.sip_port: "A"})
        from edge import SIPP
        from harness import connect

        carrier = Daemon()
        reactor.spawnProcess(carrier, SIPP, [
            SIPP, "-sf", os.path.join(os.path.dirname(__file__), "sipp", "uas_auth.xml"), "-i", "127.0.0.1",
            "-p", str(carrier_port), "-mp", str(free_port(socket.SOCK_DGRAM) & ~1), "-m", "1", "-nostdin",
            "-timeout", "40s", "-trace_msg", "-message_file", os.path.join(self.workdir, "carrier.log")],
            env=dict(os.environ), path=self.workdir)
        self.addCleanup(carrier.stop)
        client = await connect(f"{node.ws_url}/call/sip?id=trunk-out")
        client.send({"command": "invite", "option": {
            "callee": f"sip:5550100@127.0.0.1:{edge_port}", "caller": "sip:trunk2@127.0.0.1"}})
        await client.wait_event("answer", trackId="trunk-out")
        client.send({"command": "hangup"})
        await client.wait_closed()
        (code,) = await carrier.wait_exit(30)
        with open(os.path.join(self.workdir, "carrier.log"), errors="replace") as f:
            messages = f.read()
        self.assertEqual(code, 0, carrier.output[-2000:] + messages[-3000:] + edge.output[-3000:])
        self.assertIn("INVITE sip:5550100@127.0.0.1 SIP/2.0", messages)
        self.assertRegex(messages, r'Authorization: Digest [^\n]*username="agent"')
        self.assertIn("call out on trunk trunk2: sip:5550100@127.0.0.1", edge.output)


class ClusterRegistryTests(ClusterEdgeTestCase):
    """Redis, the edge and three webhook nodes: the application may reach a call through any node."""

    async def test_webhook_client_through_another_node_and_redis_restart(self) -> None:
        """SIPp calls through the edge; the webhook names the owner; the application connects to another
        node, accepts and hears the call (SIPp echoes the agent's TTS: both directions cross the tunnel);
        Redis stops and comes back (the call goes on; the next call, which may arrive meanwhile, is found
        again); /kill through a third node ends each call."""
        from test_cluster_tunnel import RedisServer
        from test_daemon_sip import webhook_app
        from harness import BASE_CONFIG, connect

        redis = await RedisServer.start(self)
        hook_url, hooks = webhook_app(self)
        nodes = []
        for i in range(3):
            workdir = os.path.join(self.workdir, f"node{i + 1}")
            os.makedirs(workdir)
            base = 20000 + (free_port(socket.SOCK_DGRAM) % 10000 + 1000 * i) % 20000 & ~1
            config = (f"rtp_start_port = {base}\nrtp_end_port = {base + 400}\n" + BASE_CONFIG
                      + f'[handler]\ntype = "webhook"\nurl = "{hook_url}"\n[sip_rate_limit]\nenabled = false\n'
                      + f'[cluster]\nredis_url = "{redis.url}"\nnode_id = "n{i + 1}"\nregistry_ttl = "3s"\n')
            node = await start_daemon(workdir, config)
            self.addCleanup(node.stop)
            nodes.append(node)
        by_name = {f"n{i + 1}": node for i, node in enumerate(nodes)}
        edge = await self.edge(nodes)

        async def attach_elsewhere() -> tuple[Any, Any, Any]:
            """The next webhook call, accepted through a node that does not own it."""
            payload = await hooks.get()
            owner = by_name[payload["node"]]
            self.assertEqual(payload["wsUrl"].split("/call/sip?id=")[0], owner.ws_url)
            other = next(n for n in nodes if n is not owner)
            client = await connect(f"{other.ws_url}/call/sip?id={quote(payload['dialogId'], safe='')}")
            self.addCleanup(lambda: client.transport.loseConnection() if not client.closed else None)
            client.send({"command": "accept", "option": {"subscribe": True, "tts": {"provider": "piper"}}})
            await client.wait_event("answer", trackId=payload["dialogId"])
            return payload, owner, client

        async def hears_echo(client: Any, text: str) -> None:
            before = len(client.frames)
            client.send({"command": "tts", "text": text, "endOfStream": True})
            # Binary frames tagged 0x01 are the caller's audio: SIPp's echo of the agent's speech.
            await client.factory.waiters.wait(
                lambda: sum(1 for _, f in client.frames[before:] if f[:1] == b"\x01" and audioop_rms(f[1:]) > 300) >= 25,
                30, "the caller's echo of the agent's speech")

        first_call = self.sipp(edge, "-m", "2", "-r", "1", "-rp", "4000", "-d", "60000", "-rtp_echo", name="calls")
        payload, owner, client = await attach_elsewhere()
        await hears_echo(client, "Hello, this is the agent speaking through another node.")
        # Redis away: the tunnel already up carries on; every node says so once.
        await redis.stop()
        await hears_echo(client, "The registry is down but this call goes on.")
        for node in nodes:
            await node.wait_output("call registry unreachable")
        await RedisServer.start(self, port=redis.port)
        for node in nodes:
            await node.wait_output("call registry reachable again", timeout_s=20)
        second, second_owner, second_client = await attach_elsewhere()
        await hears_echo(second_client, "A second call, found again through the registry.")
        # /kill through a node that is neither the owner nor the one the client used.
        for payload_, owner_, client_ in ((payload, owner, client), (second, second_owner, second_client)):
            third = next(n for n in nodes if n is not owner_ and f"ws://127.0.0.1:{n.http_port}" not in str(client_.factory.url))
            killed = await http_client().get(f"{third.base_url}/kill/{quote(payload_['dialogId'], safe='')}")
            self.assertEqual((await killed.json())["status"], "killed")
            await client_.wait_event("hangup", trackId=payload_["dialogId"])
        await first_call.wait_exit(60)
