"""Tencent Cloud request signatures (pure: stdlib hmac/hashlib/base64 only).

Three schemes, each as Tencent's public documentation defines it; the time
(``timestamp``) and random values (nonces, ids) are parameters, never read here:

* :func:`asr_signature`: real-time ASR (``wss://asr.cloud.tencent.com/asr/v2/<appid>``):
  base64(HMAC-SHA1(secretKey, host + "/asr/v2/<appid>?" + sorted params)).
* :func:`get_signature`: API 2.0-style GET signatures, used by the real-time TTS WebSocket
  (``wss://tts.cloud.tencent.com/stream_ws``): base64(HMAC-SHA1(secretKey,
  "GET" + host + path + "?" + sorted params)).
* :func:`tc3_authorization`: the API 3.0 ``TC3-HMAC-SHA256`` ``Authorization`` header of a
  JSON ``POST`` (``tencent_basic``: TextToVoice on ``tts.tencentcloudapi.com``).

In the HMAC-SHA1 schemes the signed text holds the parameter values as they are
(not URL-encoded), sorted by key; the URL then carries every value URL-encoded and
the signature URL-encoded too (:func:`signed_query`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import datetime, timezone
from typing import Mapping, Optional
from urllib.parse import quote

__all__ = [
    "canonical_params",
    "hmac_sha1_base64",
    "asr_signature",
    "get_signature",
    "signed_query",
    "tc3_authorization",
    "TC3_CONTENT_TYPE",
    "TencentCredentials",
    "resolve_credentials",
]

#: The Content-Type a TC3-signed JSON request must carry byte for byte (it is signed).
TC3_CONTENT_TYPE = "application/json; charset=utf-8"


def canonical_params(params: Mapping[str, object]) -> str:
    """``k1=v1&k2=v2...`` sorted by key, values as they are: the text the HMAC-SHA1 schemes sign."""
    return "&".join(f"{key}={params[key]}" for key in sorted(params))


def hmac_sha1_base64(secret_key: str, text: str) -> str:
    """base64(HMAC-SHA1(secret_key, text)), both UTF-8."""
    digest = hmac.new(secret_key.encode("utf-8"), text.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def asr_signature(secret_key: str, host: str, path: str, params: Mapping[str, object]) -> str:
    """The real-time ASR ``signature``: over ``host + path + "?" + sorted params`` (no method).

    ``path`` is ``/asr/v2/<appid>``; ``params`` are every query parameter except ``signature``.
    """
    return hmac_sha1_base64(secret_key, f"{host}{path}?{canonical_params(params)}")


def get_signature(secret_key: str, host: str, path: str, params: Mapping[str, object]) -> str:
    """A GET ``Signature``: over ``"GET" + host + path + "?" + sorted params`` (``Signature`` excluded)."""
    return hmac_sha1_base64(secret_key, f"GET{host}{path}?{canonical_params(params)}")


def signed_query(params: Mapping[str, object], signature_name: str, signature: str) -> str:
    """The URL query: every value URL-encoded (sorted, for stable URLs), then the encoded signature."""
    parts = [f"{key}={quote(str(params[key]), safe='')}" for key in sorted(params)]
    parts.append(f"{signature_name}={quote(signature, safe='')}")
    return "&".join(parts)


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hmac_sha256(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def tc3_authorization(secret_id: str, secret_key: str, *, service: str, host: str, payload: bytes,
                      timestamp: int, content_type: str = TC3_CONTENT_TYPE) -> str:
    """The ``Authorization`` header of a TC3-HMAC-SHA256 signed ``POST /`` with a JSON ``payload``.

    Signed headers are ``content-type`` and ``host``; the credential scope's date is the UTC
    date of ``timestamp`` (the ``X-TC-Timestamp`` header sent with the request).
    """
    signed_headers = "content-type;host"
    canonical_request = "\n".join([
        "POST",
        "/",
        "",
        f"content-type:{content_type.strip().lower()}\nhost:{host.strip().lower()}\n",
        signed_headers,
        _sha256_hex(payload),
    ])
    date = datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%d")
    scope = f"{date}/{service}/tc3_request"
    string_to_sign = "\n".join([
        "TC3-HMAC-SHA256", str(timestamp), scope, _sha256_hex(canonical_request.encode("utf-8"))])
    secret_date = _hmac_sha256(("TC3" + secret_key).encode("utf-8"), date)
    secret_service = _hmac_sha256(secret_date, service)
    secret_signing = _hmac_sha256(secret_service, "tc3_request")
    signature = hmac.new(secret_signing, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    return (f"TC3-HMAC-SHA256 Credential={secret_id}/{scope}, "
            f"SignedHeaders={signed_headers}, Signature={signature}")


_APP_ID = re.compile(r"[0-9]{1,20}")
_SECRET_ID = re.compile(r"[A-Za-z0-9_\-]{1,128}")


class TencentCredentials:
    """App id, secret id and secret key of one request (``repr`` hides the key)."""

    __slots__ = ("app_id", "secret_id", "secret_key")

    def __init__(self, app_id: str, secret_id: str, secret_key: str) -> None:
        self.app_id = app_id
        self.secret_id = secret_id
        self.secret_key = secret_key

    def __repr__(self) -> str:
        return f"TencentCredentials(app_id={self.app_id!r}, secret_id={self.secret_id!r})"


def resolve_credentials(own: tuple[Optional[str], Optional[str], Optional[str]], environ: Mapping[str, str], *,
                        use_environ: bool, provider: str) -> TencentCredentials:
    """The request's own (appId, secretId, secretKey), each else ``TENCENT_APPID``/``TENCENT_SECRET_ID``/
    ``TENCENT_SECRET_KEY`` when ``use_environ`` (Tencent's own endpoint only).

    :raises ValueError: with the text to report, when one is missing or malformed.
    """
    env = (environ.get("TENCENT_APPID"), environ.get("TENCENT_SECRET_ID"), environ.get("TENCENT_SECRET_KEY"))
    app_id, secret_id, secret_key = (
        (mine or (theirs if use_environ else None) or "").strip() for mine, theirs in zip(own, env))
    if not (app_id and secret_id and secret_key):
        if use_environ:
            raise ValueError(f"{provider}: no credentials (set appId, secretId and secretKey, or TENCENT_APPID, "
                             "TENCENT_SECRET_ID and TENCENT_SECRET_KEY)")
        raise ValueError(f"{provider}: endpoint is not Tencent's; a request with its own endpoint "
                         "must give its own appId, secretId and secretKey")
    if not _APP_ID.fullmatch(app_id):
        raise ValueError(f"{provider}: appId must be the numeric Tencent Cloud AppId")
    if not _SECRET_ID.fullmatch(secret_id):
        raise ValueError(f"{provider}: secretId is malformed")
    return TencentCredentials(app_id, secret_id, secret_key)
