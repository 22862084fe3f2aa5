"""activecall.sip.uri.transport_for_uri: the one "which transport for this URI" rule."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from activecall.sip.uri import parse_uri, transport_for_uri

#: (URI, transport) per RFC 3261 §26.2.2 / RFC 3263 §4.1 without NAPTR/SRV.
CASES = (
    ("sip:alice@example.org", "udp"),
    ("sip:alice@example.org:5080", "udp"),
    ("sip:alice@192.0.2.1;transport=udp", "udp"),
    ("sip:alice@192.0.2.1;transport=tcp", "tcp"),
    ("sip:alice@192.0.2.1;transport=TCP", "tcp"),
    ("sip:alice@192.0.2.1;transport=tls", "tls"),
    ("sip:pbx.example.org;transport=TLS", "tls"),
    ("sip:alice@[2001:db8::1]:5061;transport=tls;lr", "tls"),
    ("sips:alice@example.org", "tls"),
    ("SIPS:alice@example.org", "tls"),
    ("sips:alice@example.org;transport=tcp", "tls"),
    ("sips:alice@example.org;transport=udp", "tls"),
    ("sip:alice@example.org;transport=sctp", "udp"),
    ("sip:alice@example.org;transport=ws", "udp"),
    ("sip:alice@example.org;maddr=192.0.2.9;transport=tcp", "tcp"),
    # The parameter is parsed, not found by substring: these are not ;transport=tls.
    ("sip:transport=tls@example.org", "udp"),
    ("sip:alice@example.org;xtransport=tls", "udp"),
    ("sip:alice@example.org;transport=tlsx", "udp"),
    ("sip:alice@example.org?subject=transport%3Dtls", "udp"),
    ("tel:+15551234567", "udp"),
)


class TransportForUriTests(SynchronousTestCase):
    """sips: is TLS, the ;transport= parameter names the rest, UDP is the default."""

    def test_table_parsed_uris(self) -> None:
        """Every parsed URI of the table gets its transport."""
        for text, expected in CASES:
            self.assertEqual(transport_for_uri(parse_uri(text)), expected, text)

    def test_table_strings(self) -> None:
        """A URI string is parsed first and gets the same answer."""
        for text, expected in CASES:
            self.assertEqual(transport_for_uri(text), expected, text)

    def test_unreadable_string_is_udp(self) -> None:
        """A string that is no URI gets the UDP default instead of an error."""
        for text in ("", "not a uri", "sip:", "sip:a@h;transport=tls>junk"):
            self.assertEqual(transport_for_uri(text), "udp", text)
