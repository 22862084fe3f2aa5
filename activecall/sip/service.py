"""The SIP service: UDP and TCP on addr:udp_port (always, RFC 3261 §18) and TLS on addr:tls_port (when set).

Adapter module, used by the composition root::

    service = build_sip_service(config, reactor, ids, handler)
    service.setServiceParent(root)
    service.user_agent          # the shared SipUserAgent (invite, request, ...)

``addr = ""`` binds the first non-loopback interface address; ``0.0.0.0``
binds every interface and advertises the first non-loopback one in Via and
Contact unless ``external_ip`` is set (config.md §3-§4).  With ``udp_port = 0``
(tests) TCP takes the port the system gave UDP; if that TCP port is taken, both
are bound again on a fresh port (a few tries).
"""

from __future__ import annotations

import fcntl
import ipaddress
import re
import socket
import struct
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from activecall.sip.transaction import TimerConfig
from activecall.sip.transport import SipDatagramProtocol, SipStack, SipStreamFactory
from activecall.sip.useragent import SipUserAgent

__all__ = ["SipService", "build_sip_service", "first_interface_address", "load_server_tls"]

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----\s*", re.DOTALL)
_SIOCGIFADDR = 0x8915


def first_interface_address() -> str:
    """The IPv4 address of the first non-loopback interface (127.0.0.1 if there is none)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # interface without an IPv4 address
            address = socket.inet_ntoa(packed[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                return address
    return "127.0.0.1"


def load_server_tls(cert_file: str, key_file: str) -> Any:
    """Server TLS options from PEM files (certificate chain + key); raises ValueError when unreadable."""
    from twisted.internet import ssl

    try:
        with open(cert_file, "rb") as f:
            cert_pem = f.read()
        with open(key_file, "rb") as f:
            key_pem = f.read()
    except OSError as err:
        raise ValueError(f"cannot read TLS files: {err}") from err
    blocks = _PEM_CERT.findall(cert_pem)
    if not blocks:
        raise ValueError(f"no certificate in {cert_file}")
    try:
        cert = ssl.PrivateCertificate.loadPEM(blocks[0] + b"\n" + key_pem)
        chain = [ssl.Certificate.loadPEM(b).original for b in blocks[1:]]
        return ssl.CertificateOptions(privateKey=cert.privateKey.original, certificate=cert.original,
                                      extraCertChain=chain)
    except Exception as err:  # pyOpenSSL raises its own error types
        raise ValueError(f"bad TLS certificate or key: {err}") from err


class SipService(Service):
    """Binds the SIP listeners to the shared :class:`SipStack` and :class:`SipUserAgent`."""

    _log = Logger()

    def __init__(self, reactor: Any, stack: SipStack, user_agent: SipUserAgent, *, bind: str,
                 advertise: str, udp_port: int, tls_port: int | None = None,
                 tls_options: Any = None) -> None:
        self._reactor = reactor
        self.stack = stack
        self.user_agent = user_agent
        self._bind = bind
        self._advertise = advertise
        self._udp_port = udp_port
        self._tls_port = tls_port
        self._tls_options = tls_options
        self._ports: list[IListeningPort] = []

    def _listen_udp_tcp(self) -> tuple[IListeningPort, IListeningPort, SipDatagramProtocol]:
        """UDP and TCP on the same port; a failure to bind is raised (start-up error)."""
        from twisted.internet.error import CannotListenError

        tries_left = 5 if self._udp_port == 0 else 1
        while True:
            udp = SipDatagramProtocol(self.stack)
            udp_port = self._reactor.listenUDP(self._udp_port, udp, interface=self._bind)
            try:
                tcp_port = self._reactor.listenTCP(udp_port.getHost().port, SipStreamFactory(self.stack, "tcp"),
                                                   interface=self._bind)
            except CannotListenError:
                udp_port.stopListening()
                tries_left -= 1
                if tries_left == 0:
                    raise
                continue
            return udp_port, tcp_port, udp

    def startService(self) -> None:
        """Open UDP and TCP (and TLS when configured); a failure to bind is raised (start-up error)."""
        super().startService()
        port, tcp, udp = self._listen_udp_tcp()
        self._ports += [port, tcp]
        self.stack.add_listener("udp", self._advertise, port.getHost().port, udp)
        self.stack.add_listener("tcp", self._advertise, tcp.getHost().port)
        if self._tls_port is not None:
            tls = self._reactor.listenSSL(self._tls_port, SipStreamFactory(self.stack, "tls"),
                                          self._tls_options, interface=self._bind)
            self._ports.append(tls)
            self.stack.add_listener("tls", self._advertise, tls.getHost().port)
        self._log.info("SIP listening on {addresses}",
                       addresses=", ".join(f"{p.getHost().type}:{p.getHost().port}" for p in self._ports))

    def stopService(self) -> Any:
        """Close the listeners and connections and cancel the transaction timer."""
        super().stopService()
        ports, self._ports = self._ports, []
        for name in ("udp", "tls", "tcp"):
            self.stack.remove_listener(name)
        self.stack.close_connections()
        self.stack.stop()
        from twisted.internet.defer import DeferredList, maybeDeferred

        return DeferredList([maybeDeferred(p.stopListening) for p in ports])

    def port(self, transport: str) -> int | None:
        """The actually bound port of ``transport`` (useful with port 0 in tests)."""
        address = self.stack.local_address(transport)
        return None if address is None else address[1]


def build_sip_service(config: Any, reactor: Any, ids: Any, handler: object | None, *,
                      client_tls: Any = None, timers: TimerConfig | None = None,
                      admit: Callable[[str, float], bool] | None = None,
                      budget: Callable[[str, float], bool] | None = None,
                      penalize: Callable[[str, float], None] | None = None) -> SipService:
    """The SIP service for ``config`` (an ``activecall.config.Config``).

    TLS files are loaded here so that a bad certificate fails at start-up.
    ``client_tls(hostname)`` overrides the outbound TLS options (tests pass
    their own trust root).
    """
    bind = config.addr
    if bind == "":
        bind = first_interface_address()
    advertise = bind
    if bind in ("0.0.0.0", "::"):
        advertise = first_interface_address()
    tls_options = None
    if config.tls_port is not None:
        if not config.tls_cert_file or not config.tls_key_file:
            raise ValueError("tls_port needs tls_cert_file and tls_key_file")
        tls_options = load_server_tls(config.tls_cert_file, config.tls_key_file)
    stack = SipStack(reactor, ids, client_tls=client_tls, timers=timers, admit=admit, budget=budget,
                     penalize=penalize)
    ua = SipUserAgent(
        stack, ids=ids, handler=handler, useragent=config.useragent,
        external_ip=config.external_ip, auto_learn_public_address=config.auto_learn_public_address,
        enable_options_response=config.enable_options_response,
    )
    return SipService(reactor, stack, ua, bind=bind, advertise=advertise, udp_port=config.udp_port,
                      tls_port=config.tls_port, tls_options=tls_options)
