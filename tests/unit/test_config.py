"""Tests for activecall.config: defaults, overrides, validation errors and helpers."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from activecall.config import (
    DEFAULT_CODECS,
    AmbianceConfig,
    CallRecordConfig,
    Config,
    ConfigError,
    Credential,
    Overrides,
    PlaybookHandlerConfig,
    RecordingConfig,
    WebhookHandlerConfig,
    load_config,
    normalize_codecs,
    parse_config,
    parse_duration,
)
from activecall.dotenv import load_dotenv
from activecall.routing import rewrite_target
from activecall.rustregex import compile_rust_regex, convert_replacement

REPO = Path(__file__).resolve().parents[2]
DEFAULT_FILE = REPO / "etc" / "activecall.toml"

# config.md §16, verbatim.
EXAMPLE_16 = """\
addr = "0.0.0.0"
http_addr = "0.0.0.0:8080"
udp_port = 25060
tls_port = 5061
tls_cert_file = "./certs/cert.pem"
tls_key_file = "./certs/key.pem"
enable_srtp = false
log_level = "info"
external_ip = "203.0.113.10"
rtp_start_port = 20000
rtp_end_port = 30000
media_cache_path = "./config/mediacache"
codecs = ["pcma", "pcmu", "telephone_event"]
peers = ["10.0.0.3:8080"]
graceful_shutdown_timeout = 20

[[ice_servers]]
urls = ["stun:stun.example.org:3478"]

[[register_users]]
server = "pbx.example.org:5060"
username = "2001"
[register_users.credential]
username = "2001"
password = "s3cret"

[handler]
type = "playbook"
default = "reception.md"

[[handler.rules]]
callee = '^sip:2001@'
playbook = "desk.md"

[[trunk_rules]]
rule.match.to.host = "^10\\\\."
rule.rewrite.contact.host = "10.0.0.2"

[recording]
enabled = true
auto_start = true

[callrecord]
type = "local"
root = "./config/cdr"
"""


class _ConfigCase(SynchronousTestCase):
    """Base with a helper asserting the key path and reason of a ConfigError."""

    def assert_error(
        self,
        text: str,
        key_path: str,
        reason: str | None = None,
        overrides: Overrides = Overrides(),
    ) -> ConfigError:
        """Assert that parsing ``text`` fails at ``key_path`` (with ``reason`` if given)."""
        err = self.assertRaises(ConfigError, parse_config, text, overrides)
        self.assertEqual(err.key_path, key_path)
        if reason is not None:
            self.assertEqual(err.reason, reason)
        self.assertEqual(str(err), f"{err.key_path}: {err.reason}")
        return err


def _tempdir(case: SynchronousTestCase) -> Path:
    path = Path(tempfile.mkdtemp(prefix="activecall-config-"))
    case.addCleanup(shutil.rmtree, path, True)
    return path


class DefaultsTests(SynchronousTestCase):
    """Built-in defaults and the shipped default file."""

    def test_no_file_gives_defaults(self) -> None:
        """Loading without a path yields exactly the built-in defaults of config.md §3."""
        config = load_config(None)
        self.assertEqual(config, Config())
        self.assertEqual(config.http_addr, "0.0.0.0:8080")
        self.assertEqual((config.http_host, config.http_port), ("0.0.0.0", 8080))
        self.assertEqual((config.addr, config.udp_port), ("0.0.0.0", 25060))
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.useragent, "activecall(0.1.0)")
        self.assertTrue(config.graceful_shutdown)
        self.assertEqual(config.graceful_shutdown_timeout, 30)
        self.assertEqual(config.accept_timeout_s, 60.0)
        self.assertEqual(
            config.codecs, ("pcmu", "pcma", "g722", "g729", "opus", "telephone_event")
        )
        self.assertEqual((config.rtp_start_port, config.rtp_end_port), (12000, 42000))
        self.assertTrue(config.enable_rtp_latching)
        self.assertIsNone(config.enable_ice_lite)
        self.assertTrue(config.enable_options_response)
        self.assertEqual(config.media_cache_path, "./config/mediacache")
        self.assertIsNone(config.tls_port)
        self.assertFalse(config.enable_srtp)
        self.assertIsNone(config.handler)
        self.assertIsNone(config.callrecord)
        self.assertEqual(config.recording, RecordingConfig())
        self.assertEqual(config.recording.path, "./config/recorders")
        self.assertEqual(config.ambiance, AmbianceConfig())
        self.assertEqual(config.models_dir, "./models")
        self.assertIsNone(config.call)
        self.assertEqual(config.warnings, ())

    def test_empty_text_equals_no_file(self) -> None:
        """An empty TOML document gives the same configuration as no file."""
        self.assertEqual(parse_config(""), load_config(None))

    def test_default_file_matches_defaults(self) -> None:
        """etc/activecall.toml loads without warnings and differs from defaults only in handler and a loopback listener."""
        config = load_config(str(DEFAULT_FILE))
        self.assertEqual(config.warnings, ())
        self.assertEqual((config.http_host, config.http_port), ("127.0.0.1", 8080))
        self.assertEqual(
            dataclasses.replace(config, handler=None, http_addr=Config().http_addr, http_host=Config().http_host),
            Config())

    def test_default_file_answers_with_default_playbook(self) -> None:
        """The shipped file routes inbound calls to the default.md playbook."""
        config = load_config(str(DEFAULT_FILE))
        self.assertEqual(config.handler, PlaybookHandlerConfig(default="default.md", rules=()))

    def test_example_16_loads(self) -> None:
        """The config.md §16 example loads once its TLS files exist in the working directory."""
        tmp = _tempdir(self)
        (tmp / "certs").mkdir()
        (tmp / "certs" / "cert.pem").write_text("CERT")
        (tmp / "certs" / "key.pem").write_text("KEY")
        (tmp / "active-call.toml").write_text(EXAMPLE_16)
        old = os.getcwd()
        os.chdir(tmp)
        self.addCleanup(os.chdir, old)
        config = load_config("active-call.toml")
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.tls_port, 5061)
        self.assertEqual(config.tls_cert_file, "./certs/cert.pem")
        self.assertEqual(config.external_ip, "203.0.113.10")
        self.assertEqual((config.rtp_start_port, config.rtp_end_port), (20000, 30000))
        self.assertEqual(config.codecs, ("pcma", "pcmu", "telephone_event"))
        self.assertEqual(config.peers, ("ws://10.0.0.3:8080",))
        self.assertEqual(config.graceful_shutdown_timeout, 20)
        self.assertEqual(config.ice_servers[0].urls, ("stun:stun.example.org:3478",))
        self.assertEqual(config.ice_servers[0].credential_type, "password")
        user = config.register_users[0]
        self.assertEqual(user.server, "sip:pbx.example.org:5060")
        self.assertEqual(user.username, "2001")
        self.assertEqual(user.credential, Credential("2001", "s3cret", None))
        handler = config.handler
        assert isinstance(handler, PlaybookHandlerConfig)
        self.assertEqual(handler.default, "reception.md")
        self.assertEqual(handler.select("sip:bob@x", "sip:2001@pbx"), "desk.md")
        self.assertEqual(handler.select("sip:bob@x", "sip:2002@pbx"), "reception.md")
        rule = config.trunk_rules[0]
        assert rule.match_to_host is not None
        self.assertEqual(rule.match_to_host.pattern, "^10\\.")
        self.assertEqual(rule.rewrite_contact_host, "10.0.0.2")
        self.assertTrue(config.recording.enabled and config.recording.auto_start)
        self.assertEqual(config.callrecord, CallRecordConfig(type="local", root="./config/cdr"))

    def test_example_16_without_tls_files_is_fatal(self) -> None:
        """The §16 example fails at load when its certificate file does not exist."""
        tmp = _tempdir(self)
        (tmp / "active-call.toml").write_text(EXAMPLE_16)
        old = os.getcwd()
        os.chdir(tmp)
        self.addCleanup(os.chdir, old)
        err = self.assertRaises(ConfigError, load_config, "active-call.toml")
        self.assertEqual(err.key_path, "tls_cert_file")
        self.assertEqual(err.reason, "file not readable: [Errno 2] No such file or directory")


class OverrideTests(_ConfigCase):
    """Command-line overrides, config.md §2."""

    def test_http(self) -> None:
        """--http replaces http_addr and the parsed host and port."""
        config = parse_config('http_addr = "127.0.0.1:1"', Overrides(http="10.0.0.1:9090"))
        self.assertEqual(config.http_addr, "10.0.0.1:9090")
        self.assertEqual((config.http_host, config.http_port), ("10.0.0.1", 9090))

    def test_http_ipv6(self) -> None:
        """--http accepts a bracketed IPv6 address and strips the brackets from http_host."""
        config = parse_config("", Overrides(http="[::1]:8081"))
        self.assertEqual((config.http_host, config.http_port), ("::1", 8081))

    def test_http_invalid(self) -> None:
        """A bad --http value is reported under the option's name."""
        self.assert_error("", "--http", overrides=Overrides(http="localhost:80"))

    def test_sip_port_only(self) -> None:
        """--sip PORT changes only udp_port."""
        config = parse_config('addr = "10.0.0.5"', Overrides(sip="5070"))
        self.assertEqual((config.addr, config.udp_port), ("10.0.0.5", 5070))

    def test_sip_ip_port(self) -> None:
        """--sip IP:PORT changes addr and udp_port."""
        config = parse_config("udp_port = 1", Overrides(sip="192.0.2.1:5080"))
        self.assertEqual((config.addr, config.udp_port), ("192.0.2.1", 5080))

    def test_sip_ipv6_port(self) -> None:
        """--sip [IPv6]:PORT changes addr and udp_port."""
        config = parse_config("", Overrides(sip="[2001:db8::1]:5080"))
        self.assertEqual((config.addr, config.udp_port), ("2001:db8::1", 5080))

    def test_sip_ip_only(self) -> None:
        """--sip IP (v4 or bare v6) changes only addr."""
        config = parse_config("udp_port = 5999", Overrides(sip="192.0.2.7"))
        self.assertEqual((config.addr, config.udp_port), ("192.0.2.7", 5999))
        self.assertEqual(parse_config("", Overrides(sip="::1")).addr, "::1")

    def test_sip_host_name_rejected(self) -> None:
        """--sip with a host name is an error naming --sip."""
        self.assert_error(
            "", "--sip", "must be an IP literal, got 'example.com'", Overrides(sip="example.com")
        )

    def test_sip_port_out_of_range(self) -> None:
        """--sip with an out-of-range port is an error naming --sip."""
        self.assert_error(
            "", "--sip", "expected a port in 1-65535, got 70000", Overrides(sip="70000")
        )
        self.assert_error("", "--sip", overrides=Overrides(sip="10.0.0.1:0"))

    def test_handler_url_replaces_table(self) -> None:
        """--handler URL replaces [handler] with a bare webhook (no method/headers from file)."""
        text = (
            '[handler]\ntype = "webhook"\nurls = ["http://a/x"]\nmethod = "PUT"\n'
            'headers = [["X-A", "1"]]\n'
        )
        config = parse_config(text, Overrides(handler="https://hooks.example/in"))
        self.assertEqual(config.handler, WebhookHandlerConfig(urls=("https://hooks.example/in",)))
        self.assertEqual(config.warnings, ())

    def test_handler_playbook_drops_rules(self) -> None:
        """--handler NAME.md replaces [handler] with that default and drops the file's rules."""
        text = (
            '[handler]\ntype = "playbook"\ndefault = "a.md"\n'
            '[[handler.rules]]\ncaller = "x"\nplaybook = "b.md"\n'
        )
        config = parse_config(text, Overrides(handler="sales.md"))
        self.assertEqual(config.handler, PlaybookHandlerConfig(default="sales.md", rules=()))

    def test_handler_other_is_warned_and_ignored(self) -> None:
        """--handler that is neither URL nor .md leaves [handler] alone and adds a warning."""
        text = '[handler]\ntype = "playbook"\ndefault = "a.md"\n'
        config = parse_config(text, Overrides(handler="ftp://x"))
        self.assertEqual(config.handler, PlaybookHandlerConfig(default="a.md"))
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("--handler", config.warnings[0])

    def test_handler_replaces_ua_handler(self) -> None:
        """--handler also replaces a handler given by the legacy [ua.handler]."""
        text = '[ua.handler]\ntype = "webhook"\nurl = "http://x/"\n'
        config = parse_config(text, Overrides(handler="a.md"))
        self.assertEqual(config.handler, PlaybookHandlerConfig(default="a.md"))

    def test_external_ip(self) -> None:
        """--external-ip sets external_ip and is validated as an IP literal."""
        config = parse_config('external_ip = "198.51.100.1"', Overrides(external_ip="203.0.113.9"))
        self.assertEqual(config.external_ip, "203.0.113.9")
        self.assert_error("", "--external-ip", overrides=Overrides(external_ip="nat.example"))

    def test_codecs_replace(self) -> None:
        """--codecs replaces the file's list (no merge) and is normalized."""
        config = parse_config('codecs = ["g722"]', Overrides(codecs="PCMA, dtmf,,opus"))
        self.assertEqual(config.codecs, ("pcma", "telephone_event", "opus"))

    def test_call_and_models_dir(self) -> None:
        """--call and --models-dir are carried through; models_dir defaults to ./models."""
        config = parse_config("", Overrides(call="sip:bob@192.0.2.1", models_dir="/srv/models"))
        self.assertEqual(config.call, "sip:bob@192.0.2.1")
        self.assertEqual(config.models_dir, "/srv/models")
        self.assertEqual(parse_config("").models_dir, "./models")


class UaAliasTests(_ConfigCase):
    """The legacy [ua] table, config.md §1.8 and §6."""

    def test_alias_used(self) -> None:
        """[ua] addr, udp_port and handler act as the top-level items."""
        text = (
            '[ua]\naddr = "127.0.0.1"\nudp_port = 13050\n'
            '[ua.handler]\ntype = "webhook"\nurl = "http://localhost:8090/webhook"\n'
            'method = "POST"\n'
        )
        config = parse_config(text)
        self.assertEqual((config.addr, config.udp_port), ("127.0.0.1", 13050))
        self.assertEqual(
            config.handler, WebhookHandlerConfig(urls=("http://localhost:8090/webhook",))
        )
        self.assertEqual(config.warnings, ())

    def test_top_level_wins(self) -> None:
        """A top-level key beats the same key in [ua], with a warning."""
        text = 'udp_port = 5060\n[ua]\nudp_port = 13050\naddr = "127.0.0.1"\n'
        config = parse_config(text)
        self.assertEqual((config.addr, config.udp_port), ("127.0.0.1", 5060))
        self.assertEqual(
            config.warnings, ("ua.udp_port ignored: top-level udp_port takes precedence",)
        )

    def test_override_beats_ua(self) -> None:
        """--sip overrides a port that came from [ua]."""
        config = parse_config("[ua]\nudp_port = 13050\n", Overrides(sip="5099"))
        self.assertEqual(config.udp_port, 5099)

    def test_errors_name_ua(self) -> None:
        """Errors in values taken from [ua] name the ua.* key path."""
        self.assert_error('[ua]\naddr = "pbx.local"\n', "ua.addr")
        self.assert_error(
            '[ua]\nudp_port = "x"\n', "ua.udp_port", "expected an integer, got string"
        )
        self.assert_error('[ua.handler]\ntype = "sms"\n', "ua.handler.type")

    def test_ua_not_a_table(self) -> None:
        """A scalar ua is a type error."""
        self.assert_error('ua = "x"', "ua", "expected a table, got string")

    def test_unknown_ua_key_warned(self) -> None:
        """Other keys inside [ua] are unknown keys."""
        self.assertEqual(parse_config("[ua]\nfoo = 1\n").warnings, ("unknown key: ua.foo",))


class ErrorTests(_ConfigCase):
    """Every class of fatal error names the key path and the reason."""

    def test_error_is_value_error(self) -> None:
        """ConfigError is a ValueError whose text is 'key_path: reason'."""
        err = ConfigError("udp_port", "expected an integer, got string")
        self.assertIsInstance(err, ValueError)
        self.assertEqual(str(err), "udp_port: expected an integer, got string")

    def test_toml_syntax_error(self) -> None:
        """A TOML syntax error names the file's base name and line."""
        err = self.assertRaises(
            ConfigError, parse_config, 'a = 1\nb = 2\nc = = 3\n', Overrides(), "etc/activecall.toml"
        )
        self.assertEqual(err.key_path, "activecall.toml line 3")

    def test_unreadable_file(self) -> None:
        """A missing configuration file is fatal and names the path."""
        missing = str(_tempdir(self) / "nope.toml")
        err = self.assertRaises(ConfigError, load_config, missing)
        self.assertEqual(err.key_path, missing)
        self.assertEqual(err.reason, "file not readable: [Errno 2] No such file or directory")

    def test_type_errors(self) -> None:
        """Wrong TOML types anywhere are fatal with the expected/actual type names."""
        self.assert_error('udp_port = "5060"', "udp_port", "expected an integer, got string")
        self.assert_error("udp_port = true", "udp_port", "expected an integer, got boolean")
        self.assert_error("udp_port = 1.5", "udp_port", "expected an integer, got float")
        self.assert_error("http_gzip = 1", "http_gzip", "expected a boolean, got integer")
        self.assert_error("log_level = 3", "log_level", "expected a string, got integer")
        self.assert_error('codecs = "pcmu"', "codecs", "expected an array of strings, got string")
        self.assert_error("codecs = [8]", "codecs[0]", "expected a string, got integer")
        self.assert_error('handler = "x"', "handler", "expected a table, got string")
        self.assert_error("[ambiance]\nenabled = 'yes'\n", "ambiance.enabled")
        self.assert_error(
            "register_users = 3", "register_users", "expected an array of tables, got integer"
        )

    def test_int_accepted_for_float(self) -> None:
        """A TOML integer is fine where a float is expected."""
        config = parse_config("[ambiance]\nduckLevel = 1\nnormalLevel = 0.5\n")
        self.assertEqual((config.ambiance.duck_level, config.ambiance.normal_level), (1.0, 0.5))

    def test_ports_out_of_range(self) -> None:
        """Ports outside 1-65535 are fatal."""
        self.assert_error("udp_port = 0", "udp_port", "expected a port in 1-65535, got 0")
        self.assert_error("udp_port = 65536", "udp_port")
        self.assert_error("rtp_end_port = 70000", "rtp_end_port")
        self.assert_error(
            'tls_port = 99999\ntls_cert_file = "c"\ntls_key_file = "k"', "tls_port"
        )
        self.assert_error('http_addr = "0.0.0.0:0"', "http_addr")

    def test_rtp_range_reversed(self) -> None:
        """rtp_start_port greater than rtp_end_port is fatal."""
        self.assert_error("rtp_start_port = 30000\nrtp_end_port = 20000", "rtp_start_port")

    def test_ip_literals(self) -> None:
        """addr, external_ip and rtp_bind_ip must be IP literals."""
        self.assert_error(
            'addr = "example.com"', "addr", "must be an IP literal, got 'example.com'"
        )
        self.assert_error('external_ip = "1.2.3.4:5060"', "external_ip")
        self.assert_error('rtp_bind_ip = "eth0"', "rtp_bind_ip")
        self.assertEqual(parse_config('rtp_bind_ip = "fe80::1"').rtp_bind_ip, "fe80::1")

    def test_blank_log_file_is_unset(self) -> None:
        """log_file = "" means no log file; a path is kept as given."""
        self.assertIsNone(parse_config('log_file = " "').log_file)
        self.assertEqual(parse_config('log_file = "a.log"').log_file, "a.log")

    def test_empty_addr_allowed(self) -> None:
        """addr = "" means "first non-loopback interface" and is kept for later resolution."""
        self.assertEqual(parse_config('addr = ""').addr, "")

    def test_http_addr_form(self) -> None:
        """http_addr must be IP:PORT."""
        self.assert_error('http_addr = "8080"', "http_addr", "expected IP:PORT, got '8080'")
        self.assert_error('http_addr = "localhost:8080"', "http_addr")
        self.assert_error('http_addr = "0.0.0.0"', "http_addr")

    def test_log_level(self) -> None:
        """log_level is case-insensitive and checked against the valid levels."""
        self.assertEqual(parse_config('log_level = "DEBUG"').log_level, "debug")
        self.assertEqual(parse_config('log_level = "Off"').log_level, "off")
        self.assert_error(
            'log_level = "loud"',
            "log_level",
            "expected one of trace, debug, info, warn, error, off"
        )

    def test_handler_type(self) -> None:
        """[handler] needs a known type."""
        self.assert_error(
            '[handler]\ntype = "sms"\n', "handler.type", "expected one of webhook, playbook"
        )
        self.assert_error('[handler]\nurl = "http://x/"\n', "handler.type")

    def test_webhook_method(self) -> None:
        """A webhook method that is not an HTTP token is fatal; valid ones are upper-cased."""
        self.assert_error('[handler]\ntype = "webhook"\nmethod = "PO ST"\n', "handler.method")
        config = parse_config('[handler]\ntype = "webhook"\nurl = "http://x/"\nmethod = "put"\n')
        assert isinstance(config.handler, WebhookHandlerConfig)
        self.assertEqual(config.handler.method, "PUT")

    def test_webhook_headers(self) -> None:
        """Webhook headers must be [name, value] pairs."""
        self.assert_error(
            '[handler]\ntype = "webhook"\nheaders = { A = "b" }\n',
            "handler.headers",
            "expected an array of [name, value] pairs, got table",
        )
        self.assert_error('[handler]\ntype = "webhook"\nheaders = [["A"]]\n', "handler.headers[0]")
        config = parse_config(
            '[handler]\ntype = "webhook"\nurl = "http://x/"\n'
            'headers = [["Authorization", "Bearer x"]]\n'
        )
        assert isinstance(config.handler, WebhookHandlerConfig)
        self.assertEqual(config.handler.headers, (("Authorization", "Bearer x"),))

    def test_webhook_urls_precede_url(self) -> None:
        """urls takes precedence over url; a webhook without either is a warning."""
        config = parse_config(
            '[handler]\ntype = "webhook"\nurl = "http://a/"\nurls = ["http://b/", "http://c/"]\n'
        )
        assert isinstance(config.handler, WebhookHandlerConfig)
        self.assertEqual(config.handler.urls, ("http://b/", "http://c/"))
        empty = parse_config('[handler]\ntype = "webhook"\n')
        self.assertEqual(empty.handler, WebhookHandlerConfig())
        self.assertEqual(len(empty.warnings), 1)
        self.assert_error(
            '[handler]\ntype = "webhook"\nurls = ["http://b/", "b"]\n', "handler.urls[1]"
        )

    def test_handler_rule_regex(self) -> None:
        """An invalid handler rule regex is fatal with the rule's key path."""
        text = '[handler]\ntype = "playbook"\n[[handler.rules]]\ncallee = "x"\nplaybook = "a.md"\n'
        text += '[[handler.rules]]\ncaller = "[ab"\nplaybook = "b.md"\n'
        self.assert_error(
            text,
            "handler.rules[1].caller",
            "invalid regex: unterminated character set at position 0",
        )

    def test_rust_only_regex_rejected(self) -> None:
        """Rust-only syntax (\\p{..}, POSIX classes) is rejected instead of misread."""
        for pattern in ("'\\p{Han}'", "'[[:alpha:]]+'", "'\\PL'", "'[a-z&&[^aeiou]]'"):
            text = (
                f'[handler]\ntype = "playbook"\n[[handler.rules]]\ncaller = {pattern}\n'
                'playbook = "a.md"\n'
            )
            err = self.assert_error(text, "handler.rules[0].caller")
            self.assertTrue(err.reason.startswith("invalid regex: "), err.reason)

    def test_rule_needs_playbook(self) -> None:
        """A handler rule without playbook is fatal."""
        text = '[handler]\ntype = "playbook"\n[[handler.rules]]\ncaller = "x"\n'
        self.assert_error(text, "handler.rules[0].playbook", "required")

    def test_trunk_rule_regex(self) -> None:
        """An invalid trunk rule regex is fatal with the full dotted key path."""
        text = (
            '[[trunk_rules]]\nrule.rewrite.contact.host = "a"\n'
            '[[trunk_rules]]\nrule.match.from.user = "(x"\n'
        )
        self.assert_error(text, "trunk_rules[1].rule.match.from.user")

    def test_invalid_rewrite_is_skipped(self) -> None:
        """An invalid rewrite pattern is skipped with a warning, not fatal (config.md §12)."""
        text = (
            '[[rewrites]]\nmatch = "(x"\nrewrite = "y"\n'
            '[[rewrites]]\nmatch = "a"\nrewrite = "b"\n'
        )
        config = parse_config(text)
        self.assertEqual(len(config.rewrites), 1)
        self.assertEqual(config.rewrites[0].rewrite, "b")
        self.assertEqual(len(config.warnings), 1)
        self.assertTrue(config.warnings[0].startswith("rewrites[0].match: invalid regex"))

    def test_rewrite_type_error_is_fatal(self) -> None:
        """A rewrite without its replacement string is fatal."""
        self.assert_error('[[rewrites]]\nmatch = "a"\n', "rewrites[0].rewrite", "required")

    def test_tls_needs_cert_and_key(self) -> None:
        """tls_port without certificate or key is fatal."""
        self.assert_error("tls_port = 5061", "tls_cert_file", "required when tls_port is set")
        self.assert_error(
            'tls_port = 5061\ntls_cert_file = "c.pem"',
            "tls_key_file",
            "required when tls_port is set"
        )

    def test_tls_files_must_be_readable(self) -> None:
        """load_config checks the TLS files; parse_config (pure) does not."""
        tmp = _tempdir(self)
        cert = tmp / "cert.pem"
        cert.write_text("x")
        text = f'tls_port = 5061\ntls_cert_file = "{cert}"\ntls_key_file = "{tmp / "key.pem"}"\n'
        self.assertEqual(parse_config(text).tls_port, 5061)
        conf = tmp / "a.toml"
        conf.write_text(text)
        err = self.assertRaises(ConfigError, load_config, str(conf))
        self.assertEqual(err.key_path, "tls_key_file")
        self.assertEqual(err.reason, "file not readable: [Errno 2] No such file or directory")
        (tmp / "key.pem").write_text("k")
        self.assertEqual(load_config(str(conf)).tls_port, 5061)

    def test_ice_servers_urls_array(self) -> None:
        """[[ice_servers]].urls must be an array even for one URI."""
        err = self.assert_error('[[ice_servers]]\nurls = "stun:x"\n', "ice_servers[0].urls")
        self.assertIn("array", err.reason)
        self.assert_error("[[ice_servers]]\nusername = 'u'\n", "ice_servers[0].urls", "required")
        self.assert_error(
            '[[ice_servers]]\nurls = ["stun:a"]\ncredential_type = "x"\n',
            "ice_servers[0].credential_type"
        )

    def test_callrecord(self) -> None:
        """[callrecord] needs a known type, a known s3 vendor and each type's required keys."""
        self.assert_error(
            '[callrecord]\ntype = "ftp"\n', "callrecord.type", "expected one of local, s3, http"
        )
        self.assert_error('[callrecord]\ntype = "local"\n', "callrecord.root", "required")
        s3 = (
            '[callrecord]\ntype = "s3"\nvendor = "{v}"\nbucket = "b"\nregion = "r"\n'
            'access_key = "a"\nsecret_key = "s"\nendpoint = ""\nroot = "cdr"\n'
        )
        self.assert_error(s3.format(v="dropbox"), "callrecord.vendor")
        self.assert_error(
            '[callrecord]\ntype = "s3"\nvendor = "aws"\n', "callrecord.bucket", "required"
        )
        record = parse_config(s3.format(v="aws")).callrecord
        assert record is not None
        self.assertEqual((record.type, record.vendor, record.endpoint), ("s3", "aws", ""))
        self.assert_error('[callrecord]\ntype = "http"\n', "callrecord.url", "required")
        http = parse_config(
            '[callrecord]\ntype = "http"\nurl = "http://x/cdr"\n'
            'headers = { X-Key = "1" }\nwith_media = true\n'
        ).callrecord
        assert http is not None
        self.assertEqual(
            (http.url, http.headers, http.with_media), ("http://x/cdr", (("X-Key", "1"),), True)
        )

    def test_register_users_required_keys(self) -> None:
        """A [[register_users]] entry without server or username is fatal with its index."""
        base = '[[register_users]]\nserver = "a"\nusername = "u"\n'
        self.assert_error(
            base + '[[register_users]]\nusername = "u"\n', "register_users[1].server", "required"
        )
        self.assert_error(base + '[[register_users]]\nserver = "b"\n', "register_users[1].username")
        self.assert_error(
            base + "[register_users.credential]\nusername = 'x'\n",
            "register_users[0].credential.password"
        )

    def test_recording_format(self) -> None:
        """recording.format must be a known format."""
        self.assert_error('[recording]\nformat = "mp3"\n', "recording.format")
        self.assertEqual(parse_config('[recording]\nformat = "PCMU"\npath = " "\n').recording,
                         RecordingConfig(format="pcmu"))

    def test_negative_timeout(self) -> None:
        """graceful_shutdown_timeout cannot be negative."""
        self.assert_error("graceful_shutdown_timeout = -1", "graceful_shutdown_timeout")

    def test_peer_scheme(self) -> None:
        """A peer with an unsupported URL scheme is fatal."""
        self.assert_error('peers = ["ftp://x"]', "peers[0]")


class WarningTests(SynchronousTestCase):
    """Unknown keys and soft problems become warnings."""

    def test_unknown_keys(self) -> None:
        """Each unknown key gives one warning with its full path."""
        text = (
            'foo = 1\nsip_register_proxy = true\n[handler]\ntype = "playbook"\nbar = 2\n'
            '[[register_users]]\nserver = "a"\nusername = "u"\nbaz = 3\n[recording]\nqux = 4\n'
        )
        self.assertEqual(
            parse_config(text).warnings,
            (
                "unknown key: handler.bar",
                "handler: playbook handler has no default and no rules; every INVITE will get 503",
                "unknown key: register_users[0].baz",
                "unknown key: recording.qux",
                "unknown key: foo",
                "unknown key: sip_register_proxy",
            ),
        )


class ValueTests(SynchronousTestCase):
    """Value normalization: durations, codecs, peers, servers, regexes."""

    def test_parse_duration(self) -> None:
        """Humantime durations parse to seconds; garbage gives None."""
        cases = {
            "30s": 30.0,
            "2m": 120.0,
            "1h 5m": 3900.0,
            "1h5m": 3900.0,
            "500ms": 0.5,
            " 1min 30sec ": 90.0,
            "2 hours": 7200.0,
            "": None,
            "60": None,
            "1.5s": None,
            "5 parsecs": None,
        }
        for text, expected in cases.items():
            self.assertEqual(parse_duration(text), expected, text)

    def test_accept_timeout(self) -> None:
        """accept_timeout is parsed; an unparseable value falls back to 60 s with a warning."""
        self.assertEqual(parse_config('accept_timeout = "2m"').accept_timeout_s, 120.0)
        config = parse_config('accept_timeout = "soon"')
        self.assertEqual(config.accept_timeout_s, 60.0)
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("accept_timeout", config.warnings[0])

    def test_codecs_normalization(self) -> None:
        """Codec names are case-folded, aliases mapped, duplicates and unknowns dropped."""
        config = parse_config('codecs = ["OPUS", "2833", "G729", "ilbc", "opus", "dtmf"]')
        self.assertEqual(config.codecs, ("opus", "telephone_event", "g729"))
        self.assertEqual(config.warnings, ("codecs: unknown codec 'ilbc' ignored",))
        self.assertEqual(normalize_codecs(["x"]), ((), ("x",)))
        self.assertEqual(parse_config('codecs = ["x"]').codecs, ())
        self.assertEqual(DEFAULT_CODECS, Config().codecs)

    def test_peers(self) -> None:
        """Peers are normalized to ws:// or wss:// URLs and blanks are skipped."""
        config = parse_config(
            'peers = ["10.0.0.3:8080", " ", "http://a:1", "https://b:2/", "ws://c:3", "WSS://d:4"]'
        )
        self.assertEqual(
            config.peers, ("ws://10.0.0.3:8080", "ws://a:1", "wss://b:2", "ws://c:3", "wss://d:4")
        )

    def test_register_server_scheme(self) -> None:
        """register_users.server gets sip: unless it already has sip: or sips:."""
        text = (
            '[[register_users]]\nserver = "pbx:5060"\nusername = "a"\ndisabled = true\n'
            '[[register_users]]\nserver = "SIPS:pbx.example.org"\nusername = "b"\n'
            '[[register_users]]\nserver = "sip:10.0.0.1"\nusername = "c"\n'
        )
        users = parse_config(text).register_users
        self.assertEqual(
            [u.server for u in users], ["sip:pbx:5060", "sips:pbx.example.org", "sip:10.0.0.1"]
        )
        self.assertEqual([u.disabled for u in users], [True, False, False])

    def test_convert_replacement(self) -> None:
        """Rust $-references become Python group references and backslashes stay literal."""
        self.assertEqual(convert_replacement("sip:$1@internal.net"), "sip:\\1@internal.net")
        self.assertEqual(convert_replacement("${1}0"), "\\g<1>0")
        self.assertEqual(convert_replacement("$$5"), "$5")
        self.assertEqual(convert_replacement("a\\b"), "a\\\\b")
        self.assertEqual(convert_replacement("$user"), "\\g<user>")
        # Rust substitutes missing groups with nothing; "$2y" names the group "2y".
        self.assertEqual(convert_replacement("x${2}y", compile_rust_regex("(a)")), "xy")
        self.assertEqual(convert_replacement("x$1y.", compile_rust_regex("(a)")), "x.")

    def test_rewrite_end_to_end(self) -> None:
        """The config.md §12 example rewrites a target URI with $1."""
        text = '[[rewrites]]\nmatch = "sip:(\\\\d+)@.*"\nrewrite = "sip:$1@internal.net"\n'
        (rule,) = parse_config(text).rewrites
        self.assertEqual(rule.apply("sip:1234@carrier.example"), "sip:1234@internal.net")
        self.assertEqual(rewrite_target((rule,), "sip:1234@c"), "sip:1234@internal.net")
        self.assertIsNone(rewrite_target((rule,), "sip:alice@c"))

    def test_rust_regex_translation(self) -> None:
        """Rust spellings Python lacks (\\z, (?<name>), \\x{..}) are translated."""
        self.assertIsNotNone(compile_rust_regex("a\\z").search("xa"))
        self.assertIsNone(compile_rust_regex("a\\z").search("a\n"))
        self.assertEqual(compile_rust_regex("(?<n>\\d+)").search("x42")["n"], "42")
        self.assertIsNotNone(compile_rust_regex("\\x{263A}").search("\u263a"))
        self.assertIsNotNone(compile_rust_regex("[]a]").search("]"))
        self.assertIsNotNone(compile_rust_regex("\\[\\[:x").search("[[:x"))

    def test_trunk_rule_matching(self) -> None:
        """Trunk rule patterns search user/host parts; a user pattern needs a user part."""
        text = (
            '[[trunk_rules]]\nrule.match.to.user = "^1"\n'
            'rule.rewrite.to.host = "10.0.0.1:5060"\n'
        )
        text += "[[trunk_rules]]\n"
        first, catch_all = parse_config(text).trunk_rules
        self.assertTrue(first.matches(None, "a", "123", "b"))
        self.assertFalse(first.matches("1", "a", None, "b"))
        self.assertTrue(catch_all.matches(None, "a", None, "b"))
        self.assertEqual(first.rewrite_to_host, "10.0.0.1:5060")

    def test_ambiance_camel_case(self) -> None:
        """[ambiance] reads camelCase keys into snake_case attributes."""
        config = parse_config(
            '[ambiance]\npath = "bg.wav"\ntransitionSpeed = 0.02\nenabled = false\n'
        )
        self.assertEqual(
            config.ambiance, AmbianceConfig(path="bg.wav", transition_speed=0.02, enabled=False)
        )


class DotenvTests(SynchronousTestCase):
    """The .env file, config.md §1.3."""

    def test_load(self) -> None:
        """KEY=VALUE lines load with comments, quotes and export; existing variables stay."""
        path = _tempdir(self) / ".env"
        path.write_text(
            "# comment\n"
            "\n"
            "PLAIN=value\n"
            "export EXPORTED = yes\n"
            'DOUBLE="a b\\n#c"\n'
            "SINGLE='x \\n y'\n"
            "INLINE=abc # trailing comment\n"
            "HASH=a#b\n"
            "EMPTY=\n"
            "KEEP=new\n"
            "not a line\n"
            "PLAIN=second\n"
        )
        env = {"KEEP": "old"}
        load_dotenv(str(path), env)
        self.assertEqual(
            env,
            {
                "KEEP": "old",
                "PLAIN": "value",
                "EXPORTED": "yes",
                "DOUBLE": "a b\n#c",
                "SINGLE": "x \\n y",
                "INLINE": "abc",
                "HASH": "a#b",
                "EMPTY": "",
            },
        )

    def test_missing_file(self) -> None:
        """A missing .env file changes nothing."""
        env: dict[str, str] = {}
        load_dotenv(str(_tempdir(self) / ".env"), env)
        self.assertEqual(env, {})


class HardeningTableTests(_ConfigCase):
    """[api], [sip_limits], [webhook] and [fetch] (config.md §14a) and hostile numbers."""

    def test_defaults(self) -> None:
        """Without the tables the limits have their documented defaults and auth is off."""
        config = parse_config("")
        self.assertEqual(config.api.tokens, ())
        self.assertEqual(config.api.max_sessions, 2000)
        self.assertEqual(config.api.max_message_bytes, 1048576)
        self.assertEqual(config.sip_limits.max_calls, 1000)
        self.assertEqual(config.sip_limits.max_pending_invites, 200)
        self.assertIsNone(config.webhook.signing_secret)
        self.assertEqual(config.fetch.media_dirs, ("./config/media",))
        self.assertFalse(config.fetch.follow_redirects)

    def test_values_read(self) -> None:
        """Every key of the four tables is read, durations as text or seconds."""
        config = parse_config(
            '[api]\ntokens = ["t0k-en"]\nallowed_origins = ["https://CRM.example.com/"]\n'
            'env_prefix = "AC_"\nmax_sessions = 5\npong_timeout = 12\nheader_timeout = "3s"\n'
            '[sip_limits]\nmax_calls = 7\nmax_pending_invites = 2\n'
            '[webhook]\nsigning_secret = "s3cret"\n'
            '[fetch]\ntimeout = "2m"\nallowed_hosts = ["*.example.com", "10.0.0.1"]\n'
            'media_dirs = ["/srv/media"]\nfollow_redirects = true\n')
        self.assertEqual(config.api.tokens, ("t0k-en",))
        self.assertEqual(config.api.allowed_origins, ("https://crm.example.com",))
        self.assertEqual(config.api.env_prefix, "AC_")
        self.assertEqual(config.api.max_sessions, 5)
        self.assertEqual(config.api.pong_timeout_s, 12.0)
        self.assertEqual(config.api.header_timeout_s, 3.0)
        self.assertEqual((config.sip_limits.max_calls, config.sip_limits.max_pending_invites), (7, 2))
        self.assertEqual(config.webhook.signing_secret, "s3cret")
        self.assertEqual(config.fetch.timeout_s, 120.0)
        self.assertEqual(config.fetch.allowed_hosts, ("*.example.com", "10.0.0.1"))
        self.assertEqual(config.fetch.media_dirs, ("/srv/media",))
        self.assertTrue(config.fetch.follow_redirects)

    def test_bad_values_name_the_key(self) -> None:
        """A bad value in the new tables is one error naming its key."""
        cases = {
            '[api]\ntokens = ["a b"]': "api.tokens[0]",
            '[api]\ntokens = [""]': "api.tokens[0]",
            '[api]\nallowed_origins = ["crm.example.com"]': "api.allowed_origins[0]",
            '[api]\nenv_prefix = ""': "api.env_prefix",
            '[api]\nmax_sessions = 0': "api.max_sessions",
            '[api]\npong_timeout = "soon"': "api.pong_timeout",
            '[api]\nheader_timeout = inf': "api.header_timeout",
            '[sip_limits]\nmax_calls = -1': "sip_limits.max_calls",
            '[fetch]\nallowed_hosts = ["a/b"]': "fetch.allowed_hosts[0]",
            '[fetch]\nmedia_dirs = [" "]': "fetch.media_dirs[0]",
            '[fetch]\nmax_bytes = 1': "fetch.max_bytes",
        }
        for text, key in cases.items():
            err = self.assertRaises(ConfigError, parse_config, text)
            self.assertEqual(err.key_path, key, text)

    def test_huge_integers_are_config_errors(self) -> None:
        """An integer over Python's 4,300-digit limit or deep nesting is a ConfigError, not a ValueError."""
        for text in ("udp_port = " + "9" * 5000, "x = " + "[" * 100000, 'accept_timeout = "' + "9" * 5000 + 's"'):
            try:
                config = parse_config(text)
            except ConfigError:
                continue
            # A duration that cannot be parsed falls back to the default with a warning.
            self.assertEqual(config.accept_timeout_s, 60.0)


class HugePortTests(_ConfigCase):
    """IP:PORT values with huge or non-ASCII ports are ConfigErrors."""

    def test_huge_port_in_http_addr(self) -> None:
        """A 4301-digit port is 'expected IP:PORT', not a bare ValueError."""
        self.assert_error('http_addr = "127.0.0.1:' + "9" * 4301 + '"', "http_addr")
        self.assert_error('http_addr = "127.0.0.1:\u00b2"', "http_addr")


class ClusterTableTests(_ConfigCase):
    """``[cluster]`` (config.md §14b): the registry's Redis URL, this node's name, URL and TTL."""

    def test_defaults_and_values(self) -> None:
        """Absent: no registry. Given: the URL, node name, advertised URL (no trailing slash) and TTL."""
        self.assertIsNone(parse_config("").cluster.redis_url)
        cluster = parse_config('[cluster]\nredis_url = "redis://127.0.0.1:6379/2"\nnode_id = "edge-1.a"\n'
                               'advertise_url = "http://10.0.0.5:8080/"\nregistry_ttl = "1m"\n').cluster
        self.assertEqual((cluster.redis_url, cluster.node_id, cluster.advertise_url, cluster.registry_ttl_s),
                         ("redis://127.0.0.1:6379/2", "edge-1.a", "http://10.0.0.5:8080", 60.0))

    def test_bad_values_name_their_key(self) -> None:
        """A non-Redis URL, a non-HTTP advertised URL, a bad node name or a tiny TTL is a ConfigError."""
        for text, key in {
            '[cluster]\nredis_url = "http://x"': "cluster.redis_url",
            '[cluster]\nadvertise_url = "ws://x"': "cluster.advertise_url",
            '[cluster]\nnode_id = "a b"': "cluster.node_id",
            '[cluster]\nnode_id = "' + "n" * 70 + '"': "cluster.node_id",
            '[cluster]\nregistry_ttl = "1s"': "cluster.registry_ttl",
        }.items():
            self.assert_error(text, key)
