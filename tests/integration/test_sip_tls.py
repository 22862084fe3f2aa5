"""SIP over TLS: handshake and peer verification in memory, and a real-socket call round trip."""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase, TestCase

from activecall.config import Config
from activecall.ids import IdSource
from activecall.sip.service import build_sip_service, load_server_tls
from activecall.sip.transport import SipStack, SipStreamFactory, SipStreamProtocol
from activecall.sip.useragent import CallRejected, SipUserAgent
from activecall.testing_sip import AutoAnswerHandler, minimal_sdp


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(directory: str) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1/localhost, written as PEM files."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("test ca")).issuer_name(_name("test ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(2)
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(san, critical=False).sign(ca_key, hashes.SHA256()))
    paths = {n: os.path.join(directory, n + ".pem") for n in ("ca", "cert", "key")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["cert"], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["key"], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


def client_tls_for(ca_path: str) -> Any:
    with open(ca_path, "rb") as f:
        ca = ssl.Certificate.loadPEM(f.read())
    return lambda hostname: ssl.optionsForClientTLS(hostname, trustRoot=ca)


class MemoryTlsTests(SynchronousTestCase):
    """TLS handshake through iosim, with the SIP stream protocol on both ends."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.pki = make_pki(self.dir)

    def handshake(self, hostname: str) -> tuple[Any, Any, Any]:
        server_stack = SipStack(Clock(), IdSource(random.Random(1)), shards=2)
        SipUserAgent(server_stack, ids=IdSource(random.Random(2)))
        # TLS write aggregation flushes on a clock; iosim advances this one as it pumps.
        clock = Clock()
        server_factory = TLSMemoryBIOFactory(load_server_tls(self.pki["cert"], self.pki["key"]), False,
                                             SipStreamFactory(server_stack, "tls"), clock=clock)
        client_stack = SipStack(Clock(), IdSource(random.Random(3)), shards=2)
        client_ua = SipUserAgent(client_stack, ids=IdSource(random.Random(4)))
        client_stack.add_listener("tls", "127.0.0.1", 5061)
        inner = SipStreamProtocol(client_stack, "tls", role="client")
        client_factory = TLSMemoryBIOFactory(client_tls_for(self.pki["ca"])(hostname), True,
                                             SipStreamFactory(client_stack, "tls"), clock=clock)
        client, server, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None), lambda: client_factory.protocol(client_factory, inner),
            clock=clock)
        return inner, client_ua, pump

    def test_verified_handshake(self) -> None:
        """A client trusting the CA completes the handshake and sees the server's certificate."""
        inner, client_ua, pump = self.handshake("127.0.0.1")
        pump.flush()
        self.assertFalse(inner.closed)
        cert = inner.transport.getPeerCertificate()
        self.assertEqual(cert.get_subject().CN, "localhost")

    def test_wrong_name_fails(self) -> None:
        """A certificate not valid for the requested host name fails verification."""
        inner, client_ua, pump = self.handshake("sip.example.org")
        pump.flush()
        self.assertTrue(inner.closed)


class RealTlsTests(TestCase):
    """A call over real TLS sockets on 127.0.0.1 between two SIP services."""

    timeout = 30

    @inlineCallbacks
    def test_call_round_trip(self) -> Any:
        """INVITE over sips: is answered, ACKed and hung up over one verified TLS connection."""
        from twisted.internet import reactor

        pki = make_pki(tempfile.mkdtemp())
        handler = AutoAnswerHandler()
        server = build_sip_service(
            Config(addr="127.0.0.1", udp_port=0, tls_port=0, tls_cert_file=pki["cert"], tls_key_file=pki["key"]),
            reactor, IdSource(random.Random(5)), handler)
        client = build_sip_service(
            Config(addr="127.0.0.1", udp_port=0, tls_port=0, tls_cert_file=pki["cert"], tls_key_file=pki["key"]),
            reactor, IdSource(random.Random(6)), None, client_tls=client_tls_for(pki["ca"]))
        server.startService()
        self.addCleanup(server.stopService)
        client.startService()
        self.addCleanup(client.stopService)
        target = f"sips:agent@127.0.0.1:{server.port('tls')}"
        call = yield client.user_agent.invite(target, "sips:bot@127.0.0.1", sdp=minimal_sdp())
        self.assertEqual(call.remote_sdp, minimal_sdp())
        self.assertTrue(str(call.invite_request.headers.get("Contact")).startswith("<sips:"))
        (inbound,) = handler.calls
        yield inbound.acked
        self.assertEqual(inbound.dialog_id, call.dialog_id)
        response = yield call.bye()
        self.assertEqual(response.status, 200)
        self.assertIn(("terminated", "bye-received"), inbound.listener.events)
        self.assertEqual(len(client.stack._connections), 1)

    @inlineCallbacks
    def test_untrusted_server_rejected(self) -> Any:
        """Without the CA in its trust root the client refuses the server and the call fails."""
        from twisted.internet import reactor

        pki = make_pki(tempfile.mkdtemp())
        other = make_pki(tempfile.mkdtemp())
        server = build_sip_service(
            Config(addr="127.0.0.1", udp_port=0, tls_port=0, tls_cert_file=pki["cert"], tls_key_file=pki["key"]),
            reactor, IdSource(random.Random(5)), AutoAnswerHandler())
        client = build_sip_service(
            Config(addr="127.0.0.1", udp_port=0, tls_port=0, tls_cert_file=pki["cert"], tls_key_file=pki["key"]),
            reactor, IdSource(random.Random(6)), None, client_tls=client_tls_for(other["ca"]))
        server.startService()
        self.addCleanup(server.stopService)
        client.startService()
        self.addCleanup(client.stopService)
        d: Deferred[Any] = client.user_agent.invite(
            f"sips:agent@127.0.0.1:{server.port('tls')}", "sips:bot@127.0.0.1", sdp=minimal_sdp())
        with self.assertRaises(CallRejected) as ctx:
            yield d
        self.assertEqual(ctx.exception.status, 503)
