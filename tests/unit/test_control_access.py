"""Bearer tokens, the Origin allow-list, /list redaction and bounded JSON parsing (pure)."""

from __future__ import annotations

import json
import sys

from twisted.trial.unittest import SynchronousTestCase

from activecall.control.access import AccessPolicy, Denial, is_secret_key, redact_secrets
from activecall.control.wirejson import JsonInputError, parse_json


def check(policy: AccessPolicy, *, authorization: str | None = None, token: str | None = None,
          origin: str | None = None, host: str | None = "127.0.0.1:8080") -> Denial | None:
    return policy.check(authorization=authorization, query_token=token, origin=origin, host=host)


class TokenTests(SynchronousTestCase):
    """With tokens configured every request needs one; without, none does."""

    def test_no_tokens_configured_lets_everyone_in(self) -> None:
        """Active Call clients that send no token keep working when no token is configured."""
        self.assertIsNone(check(AccessPolicy()))
        self.assertFalse(AccessPolicy().requires_token)

    def test_bearer_header_or_query_token(self) -> None:
        """``Authorization: Bearer`` (any case of the scheme) and ``?token=`` are both accepted."""
        policy = AccessPolicy(tokens=("alpha", "beta"))
        self.assertIsNone(check(policy, authorization="Bearer beta"))
        self.assertIsNone(check(policy, authorization="bearer  alpha "))
        self.assertIsNone(check(policy, token="alpha"))

    def test_missing_or_wrong_token_is_401(self) -> None:
        """No token, a wrong one, a prefix of one or a non-Bearer scheme → 401."""
        policy = AccessPolicy(tokens=("alpha",))
        for kwargs in ({}, {"authorization": "Bearer alph"}, {"authorization": "Basic alpha"},
                       {"token": "alpha2"}, {"authorization": "Bearer"}, {"token": ""}):
            denial = check(policy, **kwargs)  # type: ignore[arg-type]
            self.assertEqual(denial, Denial(401, "missing or invalid token"), kwargs)


class OriginTests(SynchronousTestCase):
    """Browsers (requests with Origin) only from allowed origins or the daemon's own."""

    def test_no_origin_is_not_a_browser(self) -> None:
        """A request without Origin passes, whatever the allow-list."""
        self.assertIsNone(check(AccessPolicy(allowed_origins=("https://crm.example.com",))))

    def test_own_origin_always_allowed(self) -> None:
        """Origin with the request's Host (same host and port) is the daemon's test page."""
        policy = AccessPolicy()
        self.assertIsNone(check(policy, origin="http://127.0.0.1:8080", host="127.0.0.1:8080"))
        self.assertIsNone(check(policy, origin="https://Voice.Example.com", host="voice.example.com"))
        self.assertIsNone(check(policy, origin="http://[::1]:8080", host="[::1]:8080"))

    def test_foreign_origin_is_403(self) -> None:
        """Another host, another port or a ``null`` origin → 403 naming the origin."""
        policy = AccessPolicy()
        for origin, host in (("http://evil.example", "127.0.0.1:8080"), ("http://127.0.0.1:9999", "127.0.0.1:8080"),
                             ("null", "127.0.0.1:8080"), ("http://127.0.0.1:8080", None)):
            denial = check(policy, origin=origin, host=host)
            self.assertIsNotNone(denial, origin)
            assert denial is not None
            self.assertEqual(denial.code, 403)
            self.assertIn(origin, denial.message)

    def test_allow_list_and_star(self) -> None:
        """Listed origins (case, trailing slash ignored) pass; ``*`` allows every origin."""
        policy = AccessPolicy(allowed_origins=("https://crm.example.com",))
        self.assertIsNone(check(policy, origin="https://CRM.example.com/"))
        self.assertEqual(check(policy, origin="https://crm.example.com.evil.net").code, 403)  # type: ignore[union-attr]
        self.assertIsNone(check(AccessPolicy(allowed_origins=("*",)), origin="http://anything"))

    def test_token_is_checked_before_origin(self) -> None:
        """A foreign browser without a token learns 401, not whether its origin would pass."""
        denial = check(AccessPolicy(tokens=("t",)), origin="http://evil.example")
        self.assertEqual(denial.code, 401)  # type: ignore[union-attr]


class RedactionTests(SynchronousTestCase):
    """Secret-named keys are redacted at any depth, case-insensitively."""

    def test_secret_key_names(self) -> None:
        """apiKey, secret_key, Proxy-Authorization, X-Auth-Token, credential… are secrets; maxTokens is not."""
        for key in ("apiKey", "API_KEY", "secretKey", "secret", "clientSecret", "password", "sipPassword",
                    "token", "X-Auth-Token", "Authorization", "Proxy-Authorization", "credential", "privateKey"):
            self.assertTrue(is_secret_key(key), key)
        for key in ("maxTokens", "username", "provider", "headers", "endpoint", "speaker"):
            self.assertFalse(is_secret_key(key), key)

    def test_nested_dicts_lists_and_header_lines(self) -> None:
        """Values under secret keys become ``[redacted]``; ``"Authorization: …"`` strings in lists too."""
        value = {"a": {"b": [{"Password": "p"}, "Authorization: Bearer x", "X-Trace: 1"]}, "token": None,
                 "llm": {"apiKey": "k", "model": "m"}}
        self.assertEqual(redact_secrets(value), {
            "a": {"b": [{"Password": "[redacted]"}, "Authorization: [redacted]", "X-Trace: 1"]}, "token": None,
            "llm": {"apiKey": "[redacted]", "model": "m"}})
        self.assertEqual(value["llm"]["apiKey"], "k", "the original is not modified")


class JsonTests(SynchronousTestCase):
    """Network JSON: a clear JsonInputError for anything we refuse, never RecursionError."""

    def test_recursion_bomb(self) -> None:
        """Nesting far past the interpreter's recursion limit is a JsonInputError."""
        depth = sys.getrecursionlimit() * 20
        with self.assertRaises(JsonInputError) as caught:
            parse_json("[" * depth + "]" * depth)
        self.assertIn("nested deeper than 64 levels", caught.exception.message)

    def test_depth_limit(self) -> None:
        """64 levels parse; 65 do not."""
        self.assertEqual(parse_json("[" * 64 + "]" * 64, 64), json.loads("[" * 64 + "]" * 64))
        with self.assertRaises(JsonInputError):
            parse_json('{"a":' * 65 + "1" + "}" * 65, 64)

    def test_invalid_json_and_bytes(self) -> None:
        """Syntax errors and invalid UTF-8 name the problem; valid UTF-8 bytes parse."""
        with self.assertRaises(JsonInputError) as caught:
            parse_json("{nope")
        self.assertTrue(caught.exception.message.startswith("invalid JSON: "))
        with self.assertRaises(JsonInputError):
            parse_json(b'"\xff"')
        self.assertEqual(parse_json('{"a":"é"}'.encode()), {"a": "é"})
