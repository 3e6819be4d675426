"""Which engine samplers the inference endpoints have loaded, least recently used first."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable

MAX_SAMPLERS = 8  # adapters kept loaded for these endpoints by one API process


class SamplerCache:
    def __init__(self, capacity: int = MAX_SAMPLERS) -> None:
        self.capacity = capacity
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._loading: dict[str, asyncio.Future[None]] = {}

    async def get(self, sampler_id: str, load: Callable[[], Awaitable[None]]) -> list[str]:
        """Make sure `sampler_id` is loaded (running `load` once, however many requests ask
        at the same time); returns the samplers pushed out to make room, to unload."""
        if sampler_id in self._loaded:
            self._loaded.move_to_end(sampler_id)
            return []
        if sampler_id in self._loading:
            await asyncio.shield(self._loading[sampler_id])
            return []
        loading = self._loading[sampler_id] = asyncio.get_running_loop().create_future()
        try:
            await load()
        except BaseException as e:
            loading.set_exception(e)
            loading.exception()  # marked retrieved: the waiters re-raise it
            raise
        else:
            loading.set_result(None)
        finally:
            del self._loading[sampler_id]
        self._loaded[sampler_id] = None
        evicted = []
        while len(self._loaded) > self.capacity:
            evicted.append(self._loaded.popitem(last=False)[0])
        return evicted
