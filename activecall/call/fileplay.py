"""Audio for ``play``: a local file under the media directories or an http(s) URL, decoded through the media cache."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from activecall.call.services import CallServices
from activecall.fetch import FetchError
from activecall.fileio import UnsafePathError, path_under_any
from activecall.media.audiofile import AudioDecodeError, decode_audio
from activecall.options import CommandError

_log = Logger(namespace="activecall.call.fileplay")


def load_audio(services: CallServices, url: str, rate: int) -> Deferred[bytes]:
    """Decoded PCM of a local file or http(s) URL at ``rate``, through the media cache."""
    key = services.cache.file_key(url, rate)

    def decode_and_store(data: bytes | str) -> bytes:
        pcm = decode_audio(data, rate)
        services.cache.put(key, pcm)
        return pcm

    remote = url.startswith(("http://", "https://"))

    def refused(f: Failure) -> None:
        f.trap(UnsafePathError)
        # The same text whether or not such a file exists: no probing outside the media directories.
        raise CommandError.invalid("url", f"{url} is not in a media directory")

    def from_cache(cached: Optional[bytes]) -> Any:
        if cached is not None:
            return cached
        if remote:
            return services.fetch_url(url).addCallback(
                lambda body: services.run_blocking(decode_and_store, body).addErrback(undecodable))
        return services.run_blocking(decode_and_store, url)

    def undecodable(f: Failure) -> None:
        f.trap(AudioDecodeError)
        # Fetched but not audio reads like any other failure: no probing of what a URL serves.
        _log.info("{url} is not audio: {error}", url=url, error=f.getErrorMessage())
        raise FetchError(url)

    allowed: Deferred[Any] = succeed(None) if remote else services.run_blocking(path_under_any, url, services.media_dirs)
    allowed.addErrback(refused)
    return allowed.addCallback(lambda _: services.run_blocking(services.cache.get, key)).addCallback(from_cache)
