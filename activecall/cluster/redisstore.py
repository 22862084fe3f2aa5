"""The registry's store in Redis, through redis-py's asyncio client on the asyncio reactor's loop.

The only module that imports redis.  Every operation has a deadline
(``timeout_s``): a Redis that stopped answering fails the operation, which puts
the registry down (local-only operation) instead of stalling calls.  The client
reconnects by itself on the next operation.
"""

from __future__ import annotations

import asyncio
from typing import Mapping, Optional, Sequence

import redis.asyncio as aioredis
from twisted.internet.defer import Deferred

from activecall.aio import deferred_from_coroutine

__all__ = ["RedisStore"]


class RedisStore:
    """:class:`~activecall.cluster.registry.IRegistryStore` over one Redis (``redis://host:port/db``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, timeout_s: float = 2.0) -> None:
        self._loop = loop
        self._timeout_s = timeout_s
        self._client = aioredis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s,
                                         decode_responses=True, health_check_interval=0)

    def _run(self, coro: object) -> Deferred:
        async def bounded() -> object:
            return await asyncio.wait_for(coro, self._timeout_s)  # type: ignore[arg-type]

        return deferred_from_coroutine(self._loop, bounded())

    def set_many(self, items: Mapping[str, str], ttl_s: int) -> Deferred:
        async def write() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, ex=ttl_s)
                await pipe.execute()

        return self._run(write())

    def get(self, key: str) -> Deferred:
        return self._run(self._client.get(key))

    def delete_many(self, keys: Sequence[str]) -> Deferred:
        async def delete() -> None:
            if keys:
                await self._client.delete(*keys)

        return self._run(delete())

    def values_with_prefix(self, prefix: str, limit: int) -> Deferred:
        async def scan() -> dict[str, str]:
            keys: list[str] = []
            async for key in self._client.scan_iter(match=prefix + "*", count=100):
                keys.append(key)
                if len(keys) >= limit:
                    break
            if not keys:
                return {}
            values: Sequence[Optional[str]] = await self._client.mget(keys)
            return {k: v for k, v in zip(keys, values) if v is not None}

        return self._run(scan())

    def close(self) -> Deferred:
        """Close the connection pool (service stop)."""
        return self._run(self._client.aclose())
