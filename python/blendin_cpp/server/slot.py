"""The one Blender behind the server, its worker thread, and the FIFO of requests waiting for it."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import AsyncIterator

from ..blender import Blender, Step
from .schemas import ApiError

PULL_S = 0.025  # longest burst of engine steps between two looks at the client


def _pull(blender: Blender, steps, budget_s: float) -> tuple[list[Step], dict | None]:
    """Worker thread: the next steps of a generation, for at most budget_s seconds (at least one);
    the finished generation's statistics once it ends, else None."""
    out: list[Step] = []
    until = time.perf_counter() + budget_s
    for step in steps:
        out.append(step)
        if step.finish_reason:
            return out, dict(blender.last_stats)
        if time.perf_counter() >= until:
            return out, None
    return out, dict(blender.last_stats)


class Slot:
    """The one Blender, its worker thread, and the FIFO of requests waiting for it."""

    def __init__(self, blender: Blender, max_queue: int):
        self.blender = blender
        self.max_queue = max_queue
        self.waiting = 0
        self._lock = asyncio.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="blendin-engine")

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def _acquire(self) -> None:
        """Wait for the models, first come first served; 503 when too many already wait."""
        if self.waiting >= self.max_queue:
            raise ApiError(503, f"the server is busy ({self.waiting} requests waiting); retry later",
                           type="server_error", code="server_busy")
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1

    async def exclusive(self, fn):
        """Wait for the models, run fn() on the worker, give the models back."""
        await self._acquire()
        try:
            return await self.call(fn)
        finally:
            self._lock.release()

    async def open(self, request, prompt, kwargs: dict) -> "Run | None":
        """Wait for the models, then start the generation; None if the client left meanwhile."""
        await self._acquire()
        try:
            if await request.is_disconnected():
                self._lock.release()
                return None
            steps = await self.call(partial(self.start, prompt, kwargs))
        except BaseException:
            self._lock.release()
            raise
        return Run(self, steps)

    def start(self, prompt, kwargs: dict):
        """Worker thread: set the request's Alignment Vector scales, then start its generation
        (a change of scales empties the base's KV cache: it was computed with the old weights)."""
        kwargs = dict(kwargs)
        scales = kwargs.pop("av_scales", None)
        if scales is not None:
            self.blender.base.set_adapter_scales(scales)
        return self.blender.generate(prompt, **kwargs)

    def release(self, steps) -> None:
        """Give the models to the next request. The generator's close() is queued on the worker
        behind any step still running there, and ahead of the next request's start."""
        self._worker.submit(steps.close)
        self._lock.release()


class Run:
    """One generation holding the slot; `close()` (idempotent) stops it and frees the slot."""

    def __init__(self, slot: Slot, steps):
        self.slot, self._steps, self._open = slot, steps, True
        self.stats: dict = {}
        self.completion_tokens = 0  # the tokens of the text: the end token is not one of them

    async def bursts(self) -> AsyncIterator[list[Step]]:
        is_eog = self.slot.blender.is_end
        try:
            while True:
                steps, stats = await self.slot.call(_pull, self.slot.blender, self._steps, PULL_S)
                self.completion_tokens += sum(not is_eog(s.token) for s in steps)
                yield steps
                if stats is not None:
                    self.stats = stats
                    return
        finally:
            self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self.slot.release(self._steps)
