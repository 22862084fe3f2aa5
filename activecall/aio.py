"""Bridging asyncio libraries (aiortc, redis-py) into the daemon, which runs on Twisted's asyncio reactor."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure

__all__ = ["asyncio_loop_of", "deferred_from_coroutine"]


def asyncio_loop_of(reactor: Any) -> Optional[asyncio.AbstractEventLoop]:
    """The asyncio loop under ``reactor``, or None when it is not Twisted's asyncio reactor."""
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if isinstance(reactor, AsyncioSelectorReactor):
        return reactor._asyncioEventloop  # type: ignore[no-any-return]
    return None


def deferred_from_coroutine(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    """The coroutine run as a task on ``loop``, as a Deferred; cancelling the Deferred cancels the task
    (and fails it with Twisted's CancelledError, which callers already handle)."""
    future = asyncio.ensure_future(coro, loop=loop)
    d: Deferred[Any] = Deferred(lambda _: future.cancel())

    def done(f: asyncio.Future[Any]) -> None:
        if d.called:
            return
        if f.cancelled():
            d.errback(Failure(CancelledError()))
        elif f.exception() is not None:
            e = f.exception()
            d.errback(Failure(e, type(e), e.__traceback__))
        else:
            d.callback(f.result())

    future.add_done_callback(done)
    return d
