"""Cross-layer seams (zope.interface only)."""

from __future__ import annotations

from zope.interface import Interface


class IControlChannel(Interface):
    """The client side of one session: a control WebSocket connection."""

    def send_text(text: str) -> None:
        """Send one Text frame (an event as JSON)."""

    def send_binary(data: bytes) -> None:
        """Send one Binary frame (audio)."""

    def send_ping(payload: bytes) -> None:
        """Send a Ping frame."""

    def close() -> None:
        """Close the connection with 1000 (normal closure): the call is over."""


class ISessionListener(Interface):
    """An observer of a session's traffic, e.g. a Server-Sent Events stream."""

    def on_event(json_text: str) -> None:
        """An event was emitted."""

    def on_command(json_text: str) -> None:
        """A command was received."""

    def on_binary(data: bytes) -> None:
        """Agent audio was sent to the client."""

    def on_ping(json_text: str) -> None:
        """A keep-alive ping was sent (as its JSON event form)."""

    def on_close() -> None:
        """The session ended."""
