"""The one thread that owns the models: running requests decoded together (continuous batching),
and the queue of what waits for them.

Every call on the Blender and its models happens on this thread, so nothing else needs a lock on
them. Each loop: take what arrived (new requests, cancellations, whole-model jobs), admit waiting
requests to free slots (first come, first served), and decode one token for every running request
(`_core.Scheduler.step`: one batched decode per model and phase). A job that needs the models alone
(best_of's rewards, scoring an echoed prompt, or a request with other Alignment Vector scales,
which change the base's weights) waits at the head of the queue until the running requests finish;
the requests behind it wait too, so none overtakes another. A client that leaves takes its request
or job out of the queue (a job already running finishes: it is bounded by one request's context).

A request that fails ends alone (the scheduler's error names it). Should the thread itself fail,
or the server close, every request waiting or running gets that reason as its error (503), later
ones are refused with it, and /health says so.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import AsyncIterator, Callable

from .. import _core
from ..blender import Blender, Step
from .schemas import ApiError

WAIT_POLL_S = 0.5  # how often a waiting request looks whether its client is still there


def stopped(reason: str) -> ApiError:
    """The error of every request the engine thread can no longer serve."""
    return ApiError(503, reason, type="server_error", code="engine_stopped")


class Run:
    """One request's generation: created on the event loop, fed by the engine thread."""

    def __init__(self, batcher: "Batcher", tokens, params, scales):
        self.batcher, self.tokens, self.params, self.scales = batcher, tokens, params, scales
        self.loop = asyncio.get_running_loop()
        self.admitted: asyncio.Future = self.loop.create_future()
        self._queue: asyncio.Queue = asyncio.Queue()  # steps; then ("end", stats) or ("error", exception)
        self.stats: dict = {}
        self.completion_tokens = 0  # the tokens of the text: the end token is not one of them
        self._open = True

    # --- the engine thread's side -------------------------------------------------------------------
    def _admit(self, error: BaseException | None) -> None:
        _settle(self.loop, self.admitted, None, error)

    def _push(self, item) -> None:
        _deliver([(self, item)])

    # --- the request's side ---------------------------------------------------------------------------
    async def bursts(self) -> AsyncIterator[list[Step]]:
        """The steps as they come, in bursts (all that arrived since the last look)."""
        is_end = self.batcher.blender.is_end
        try:
            while True:
                items = [await self._queue.get()]
                while not self._queue.empty():
                    items.append(self._queue.get_nowait())
                steps: list[Step] = []
                end = None
                for item in items:
                    if isinstance(item, Step):
                        steps.append(item)
                    else:
                        end = item
                self.completion_tokens += sum(not is_end(s.token) for s in steps)
                if steps:
                    yield steps
                if end is not None:
                    kind, value = end
                    if kind == "error":
                        raise value  # ValueError: the request's own; BlendError; ApiError: the engine stopped
                    self.stats = value
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Stop the generation (idempotent): its slot is free at the next step."""
        if self._open:
            self._open = False
            self.batcher._cancel(self)


async def gather_while_connected(request, coros) -> list | None:
    """Run the coroutines together (one request's parts: candidates, prompts) and return their
    results; None as soon as the client leaves, and one's error as soon as it fails. Either way
    the others are cancelled: their runs close and their queued jobs are dropped."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    gathered = asyncio.gather(*tasks)
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=WAIT_POLL_S)
            if done:
                return gathered.result()
            if await request.is_disconnected():
                return None
    finally:
        for t in tasks:  # a gather that ended with one's error leaves the others running
            t.cancel()


def _settle(loop, future: asyncio.Future, result, error: BaseException | None) -> None:
    """From the engine thread: give `future` its result or exception on its event loop (unless a
    client that went away has cancelled it)."""
    def settle():
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
    loop.call_soon_threadsafe(settle)


def _deliver(items: list[tuple[Run, object]]) -> None:
    """Hand items to their runs' queues: one wake-up of each event loop for all of them."""
    by_loop: dict = {}
    for run, item in items:
        by_loop.setdefault(run.loop, []).append((run, item))
    for loop, pairs in by_loop.items():
        def put(pairs=pairs):
            for run, item in pairs:
                run._queue.put_nowait(item)
        loop.call_soon_threadsafe(put)


class _Job:
    """fn() to run with the models alone; its result or exception settles `future`. `kind` names it
    in /health and /metrics."""

    def __init__(self, fn: Callable, loop, kind: str):
        self.fn, self.loop, self.kind = fn, loop, kind
        self.future: asyncio.Future = loop.create_future()
        self.cancelled = False  # its client left: not run (set on the event loop, read by the engine thread)

    def run(self) -> None:
        try:
            result, error = self.fn(), None
        except BaseException as e:  # delivered to the request that asked
            result, error = None, e
        _settle(self.loop, self.future, result, error)

    def fail(self, error: BaseException) -> None:
        _settle(self.loop, self.future, None, error)


class Batcher:
    """The engine thread, the scheduler it drives, and the queue in front of it."""

    def __init__(self, blender: Blender, parallel: int, max_queue: int):
        self.blender, self.parallel, self.max_queue = blender, parallel, max_queue
        self.slot_ctx = min(m.n_ctx_seq for m in blender._models())
        self.scheduler = _core.Scheduler(blender._engine, parallel, self.slot_ctx)
        self._cond = threading.Condition()
        # guarded by _cond: what arrived, what is cancelled, and the counts /health reads
        self._inbox: deque = deque()
        self._cancelled: deque[Run] = deque()
        self._waiting = 0   # requests and jobs not yet admitted
        self._running = 0
        self._job: str | None = None  # the kind of the job running with the models alone
        self._closed = False
        self._failure: str | None = None  # why the engine thread stopped, if it did
        self.kv_tokens: dict[str, int] = {}  # what the models' KV caches hold, after the last step (for /metrics)
        # the engine thread's own
        self._queue: deque = deque()
        self._runs: dict[int, Run] = {}
        self._thread = threading.Thread(target=self._loop, name="blendin-engine", daemon=True)
        self._thread.start()

    # --- the event loop's side ---------------------------------------------------------------------
    def counts(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._cond:
            return self._running, self._waiting

    def state(self) -> dict:
        """What /health and /metrics report: running requests, the job running with the models
        alone (its kind, or None), what waits, and why the engine thread stopped (None: it runs)."""
        with self._cond:
            return {"running": self._running, "job": self._job, "waiting": self._waiting, "failure": self._failure}

    def _enqueue(self, item) -> None:
        with self._cond:
            if self._closed:
                raise stopped(self._failure or "the server is shutting down")
            if self._waiting >= self.max_queue:
                raise ApiError(503, f"the server is busy ({self._waiting} requests waiting); retry later",
                               type="server_error", code="server_busy")
            self._waiting += 1
            self._inbox.append(item)
            self._cond.notify()

    async def open(self, request, tokens, kwargs: dict) -> Run | None:
        """Queue a generation and wait until it runs; None if the client left meanwhile.
        ValueError/TypeError: the request cannot run (bad parameters)."""
        kwargs = dict(kwargs)
        scales = kwargs.pop("av_scales", None)
        settings = {k: kwargs.pop(k) for k in Blender.SETTINGS if k in kwargs}
        params = self.blender.gen_params(**kwargs, settings={**self.blender.defaults, **settings})
        self.blender._engine.check(params)  # reads nothing that changes: the models' vocabularies
        run = Run(self, tokens, params, scales)
        self._enqueue(run)
        try:
            while True:  # a client that leaves while it waits leaves the queue
                done, _ = await asyncio.wait({run.admitted}, timeout=WAIT_POLL_S)
                if await request.is_disconnected():
                    run.close()
                    return None
                if done:
                    run.admitted.result()  # raises what made the request fail to start
                    return run
        except BaseException:
            run.close()
            raise

    async def exclusive(self, request, fn: Callable, kind: str):
        """Run fn() on the engine thread with the models alone (after the running requests); None
        if the client of `request` (None: no client to watch) left first (the job then does not run)."""
        job = _Job(fn, asyncio.get_running_loop(), kind)
        self._enqueue(job)
        try:
            while True:
                done, _ = await asyncio.wait({job.future}, timeout=WAIT_POLL_S)
                if done:
                    return job.future.result()
                if request is not None and await request.is_disconnected():
                    job.cancelled = True
                    return None
        except BaseException:
            job.cancelled = True
            raise

    def _cancel(self, run: Run) -> None:
        with self._cond:
            self._cancelled.append(run)
            self._cond.notify()

    def close(self) -> None:
        """Stop the engine thread after its current step: what waits or runs gets a 503."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # --- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        reason = "the server is shutting down"
        try:
            while True:
                with self._cond:
                    while not (self._inbox or self._cancelled or self._runs or self._closed):
                        self._cond.wait()
                    if self._closed:
                        break
                    self._queue.extend(self._inbox)
                    self._inbox.clear()
                    cancelled = list(self._cancelled)
                    self._cancelled.clear()
                for run in cancelled:
                    self._drop(run)
                self._admit()
                if self._runs:
                    self._step()
        except BaseException as e:  # nothing can run any more: say why, to every request and to /health
            reason = f"the engine thread stopped: {type(e).__name__}: {e}"
            with self._cond:
                self._failure = reason
        self._end(stopped(reason))

    def _end(self, error: ApiError) -> None:
        """The engine thread's last act: what waits or runs fails with `error`, later requests are
        refused with it."""
        with self._cond:
            self._closed = True
            self._queue.extend(self._inbox)
            self._inbox.clear()
            self._running = self._waiting = 0
            self._job = None
        for item in self._queue:
            if isinstance(item, _Job):
                item.fail(error)
            else:
                item._admit(error)
        self._queue.clear()
        _deliver([(run, ("error", error)) for run in self._runs.values()])
        self._runs.clear()

    def _drop(self, run: Run) -> None:
        """A request that left: out of the queue or out of its slot."""
        if run in self._queue:
            self._queue.remove(run)
            self._counts(waiting=-1)
            return
        rid = next((k for k, v in self._runs.items() if v is run), None)
        if rid is not None:
            self.scheduler.cancel(rid)
            del self._runs[rid]
            self._counts(running=-1)

    def _counts(self, running: int = 0, waiting: int = 0) -> None:
        with self._cond:
            self._running += running
            self._waiting += waiting

    def _admit(self) -> None:
        base = self.blender.base
        while self._queue:
            item = self._queue[0]
            if isinstance(item, _Job):
                if item.cancelled:
                    self._queue.popleft()
                    self._counts(waiting=-1)
                    continue
                if self._runs:
                    return  # the models alone: after the running requests
                self._queue.popleft()
                with self._cond:
                    self._waiting -= 1
                    self._job = item.kind
                try:
                    item.run()
                finally:
                    with self._cond:
                        self._job = None
                self._note_kv()
                continue
            if item.scales is not None and list(item.scales) != base.adapter_scales():
                if self._runs:
                    return  # other weights: after the running requests
                try:
                    base.set_adapter_scales(item.scales)
                except Exception as e:  # this request's scales: it fails alone
                    self._queue.popleft()
                    self._counts(waiting=-1)
                    item._admit(e)
                    continue
            if len(self._runs) >= self.parallel:
                return
            self._queue.popleft()
            try:
                rid = self.scheduler.add(item.tokens.base, item.tokens.guide, item.params)
            except Exception as e:  # this request alone cannot run
                self._counts(waiting=-1)
                item._admit(e)
                continue
            self._runs[rid] = item
            self._counts(running=1, waiting=-1)
            item._admit(None)

    def _note_kv(self) -> None:
        """Publish what the KV caches hold (read here, by the thread that owns the models)."""
        self.kv_tokens = {role: m._handle.kv_tokens for role, m in self.blender._roles().items()}

    def _step(self) -> None:
        try:
            events = self.scheduler.step()
        except Exception as e:  # nothing the scheduler could pin on one request: all running ones end
            failed = list(self._runs.items())
            self._runs.clear()
            self._counts(running=-len(failed))
            for rid, _ in failed:
                self.scheduler.cancel(rid)
            _deliver([(run, ("error", e)) for _, run in failed])
            return
        out, ended = [], 0
        for rid, step, stats, error in events:
            run = self._runs.get(rid)
            if run is None:
                continue
            if error is not None:
                out.append((run, ("error", error)))
            else:
                out.append((run, step))
                if stats is not None:
                    out.append((run, ("end", stats)))
            if error is not None or stats is not None:
                del self._runs[rid]
                ended += 1
        self._counts(running=-ended)  # before the answers go out: a client that got its answer sees it counted
        self._note_kv()
        _deliver(out)
