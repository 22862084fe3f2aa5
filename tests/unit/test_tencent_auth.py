"""Tencent Cloud signatures against Tencent's documented examples and a hand-built ASR vector."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import parse_qsl

from twisted.trial.unittest import SynchronousTestCase

from activecall.speech.tencent_auth import (
    TencentCredentials,
    asr_signature,
    canonical_params,
    get_signature,
    resolve_credentials,
    signed_query,
    tc3_authorization,
)

# Tencent's API 3.0 signature example (CVM DescribeInstances), fictitious keys from the docs.
DOC_SECRET_ID = "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE"
DOC_SECRET_KEY = "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE"
DOC_PAYLOAD = b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], "Name": "instance-name"}]}'


class Tc3Tests(SynchronousTestCase):
    def test_documented_example(self) -> None:
        """The TC3-HMAC-SHA256 Authorization of Tencent's worked example, byte for byte."""
        self.assertEqual(
            tc3_authorization(DOC_SECRET_ID, DOC_SECRET_KEY, service="cvm", host="cvm.tencentcloudapi.com",
                              payload=DOC_PAYLOAD, timestamp=1551113065),
            "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/2019-02-25/cvm/tc3_request, "
            "SignedHeaders=content-type;host, "
            "Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168")

    def test_documented_example_masked_key(self) -> None:
        """The current docs' variant of the example (key written with asterisks) gives its printed signature."""
        auth = tc3_authorization("AKIDz8krbsJ5yKBZQpn74WFkmLPx3*******", "Gu5t9xGARNpq86cd98joQYCN3*******",
                                 service="cvm", host="cvm.tencentcloudapi.com", payload=DOC_PAYLOAD,
                                 timestamp=1551113065)
        self.assertTrue(auth.endswith("Signature=2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c"))

    def test_date_is_utc(self) -> None:
        """The credential scope uses the UTC date of the timestamp (00:44 in UTC+8 is still the day before)."""
        auth = tc3_authorization("id", "key", service="tts", host="tts.tencentcloudapi.com", payload=b"{}",
                                 timestamp=1551113065)
        self.assertIn("Credential=id/2019-02-25/tts/tc3_request,", auth)

    def test_signature_covers_payload_and_host(self) -> None:
        """Another body or host gives another signature."""
        base = dict(service="tts", host="tts.tencentcloudapi.com", payload=b'{"Text":"a"}', timestamp=1)
        auth = tc3_authorization("id", "key", **base)  # type: ignore[arg-type]
        other_body = {**base, "payload": b'{"Text":"b"}'}
        other_host = {**base, "host": "evil.example"}
        self.assertNotEqual(auth, tc3_authorization("id", "key", **other_body))  # type: ignore[arg-type]
        self.assertNotEqual(auth, tc3_authorization("id", "key", **other_host))  # type: ignore[arg-type]


class HmacSha1Tests(SynchronousTestCase):
    def test_documented_get_signature(self) -> None:
        """Tencent's API 3.0 signature v1 example (GET, HmacSHA1) gives EliP9YW3pW28FpsEdkXt/+WcGeI=."""
        params = {"Action": "DescribeInstances", "InstanceIds.0": "ins-09dx96dg", "Limit": 20, "Nonce": 11886,
                  "Offset": 0, "Region": "ap-guangzhou", "SecretId": DOC_SECRET_ID, "Timestamp": 1465185768,
                  "Version": "2017-03-12"}
        self.assertEqual(get_signature(DOC_SECRET_KEY, "cvm.tencentcloudapi.com", "/", params),
                         "EliP9YW3pW28FpsEdkXt/+WcGeI=")

    def test_asr_vector(self) -> None:
        """The ASR text to sign is host + /asr/v2/<appid> + ? + sorted raw params (the doc's example string);
        the expected value was computed independently with ``openssl dgst -sha1 -hmac``."""
        params = {"secretid": "AKIDexamplesecretid0000", "voice_id": "c64385ee-3e5c-4fc5-bbfd-7c71addb35b0",
                  "timestamp": "1673408372", "nonce": "1673408372", "expired": "1673494772", "needvad": "1",
                  "voice_format": "1", "engine_model_type": "16k_zh"}
        self.assertEqual(
            "asr.cloud.tencent.com/asr/v2/1259228442?" + canonical_params(params),
            "asr.cloud.tencent.com/asr/v2/1259228442?engine_model_type=16k_zh&expired=1673494772&needvad=1"
            "&nonce=1673408372&secretid=AKIDexamplesecretid0000&timestamp=1673408372&voice_format=1"
            "&voice_id=c64385ee-3e5c-4fc5-bbfd-7c71addb35b0")
        self.assertEqual(asr_signature("exampleSecretKey0000", "asr.cloud.tencent.com", "/asr/v2/1259228442", params),
                         "6Q4itSGfEdg8jRsWUnf3QYh6MvA=")

    def test_signed_query_encodes_values_not_the_signed_text(self) -> None:
        """The URL carries values and signature URL-encoded; decoding gives back what was signed."""
        params = {"Text": "你好 a&b=c+/", "Action": "X"}
        query = signed_query(params, "Signature", "ab+/c=")
        self.assertEqual(query, "Action=X&Text=%E4%BD%A0%E5%A5%BD%20a%26b%3Dc%2B%2F&Signature=ab%2B%2Fc%3D")
        self.assertEqual(dict(parse_qsl(query)), {"Action": "X", "Text": "你好 a&b=c+/", "Signature": "ab+/c="})
        self.assertEqual(canonical_params(params), "Action=X&Text=你好 a&b=c+/")


class CredentialTests(SynchronousTestCase):
    ENV = {"TENCENT_APPID": "1", "TENCENT_SECRET_ID": "AKIDenv", "TENCENT_SECRET_KEY": "envkey"}

    def test_precedence_and_environment(self) -> None:
        """Own values win one by one; the environment fills the rest only when allowed."""
        creds = resolve_credentials(("2", None, "mine"), self.ENV, use_environ=True, provider="p")
        self.assertEqual((creds.app_id, creds.secret_id, creds.secret_key), ("2", "AKIDenv", "mine"))
        with self.assertRaises(ValueError) as e:
            resolve_credentials(("2", None, "mine"), self.ENV, use_environ=False, provider="p")
        self.assertIn("own appId", str(e.exception))

    def test_validation_and_repr(self) -> None:
        """AppId is numeric, SecretId has no odd characters; repr never shows the key."""
        with self.assertRaises(ValueError):
            resolve_credentials(("12a", "AKID", "k"), {}, use_environ=False, provider="p")
        with self.assertRaises(ValueError):
            resolve_credentials(("12", "AK ID&x=1", "k"), {}, use_environ=False, provider="p")
        self.assertNotIn("secret-key", repr(TencentCredentials("1", "AKID", "secret-key")))

    def test_pure(self) -> None:
        """The module imports neither Twisted nor a reactor (a pure helper)."""
        code = ("import sys, activecall.speech.tencent_auth; "
                "print(any(m.startswith(('twisted', 'asyncio', 'socket')) for m in sys.modules))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), "False")
