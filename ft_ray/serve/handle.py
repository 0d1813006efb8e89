"""A submitted request's handle: how results cross from the engine's loop thread to the caller.

The loop thread `put`s items (stream events, then one `End`) into the handle; the caller reads them:
- in asyncio (the Serve deployment): the handle was made inside a running event loop, so items
  arrive through `loop.call_soon_threadsafe` into an `asyncio.Queue`: `await handle` gives the
  `GenerationResult`, `async for event in handle` the `StreamEvent`s of a streamed request; both
  raise the request's error (`GenerationError`, `RequestCancelled`) when it failed;
- in plain threads (`Engine.generate`, `Engine.stream`): a `queue.SimpleQueue`, read by the engine.
No thread pool is involved, so a thousand open streams hold a thousand queues, not threads.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ft_ray.serve.requests import GenerationRequest
from ft_ray.serve.results import GenerationError, GenerationResult, PromptScore, StreamEvent

_ids = itertools.count()


@dataclass
class End:
    """The last item of a handle: the result (a generation's, or a prompt score's), or the error
    the request failed with."""

    result: GenerationResult | PromptScore | None = None
    error: BaseException | None = None

    def unwrap(self) -> GenerationResult | PromptScore:
        if self.error is not None:
            raise self.error
        assert self.result is not None  # every End is made with a result or an error
        return self.result


class RequestHandle:
    """One submitted request. `stream` handles also receive `StreamEvent`s before the end.

    finished_step: the scheduler step in which the request ended (None while it runs): tests use
    it to check that a short request returns while long ones still decode.
    """

    def __init__(self, request: GenerationRequest, stream: bool, loop: asyncio.AbstractEventLoop | None):
        self.id = next(_ids)
        self.request, self.stream = request, stream
        self.finished_step: int | None = None
        self.cancel_requested = False  # set by any thread; the loop frees the rows at its next step
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()

    @property
    def done(self) -> bool:
        return self.finished_step is not None

    # ------------------------------------------------------------------ producer (the loop thread)
    def put(self, item: StreamEvent | End) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ------------------------------------------------------------------ asyncio consumer
    def __await__(self):
        return self._result().__await__()

    async def _result(self) -> GenerationResult | PromptScore:
        self._check_async()
        while True:
            item = await self._queue.get()
            if isinstance(item, End):  # a stream's events are skipped: the result has them all
                return item.unwrap()

    def __aiter__(self) -> AsyncIterator[StreamEvent]:
        self._check_async()
        if not self.stream:
            raise TypeError("only a handle submitted with stream=True yields events; await it instead")
        return self._events()

    async def _events(self) -> AsyncIterator[StreamEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, End):
                item.unwrap()  # raises the request's error, if any
                return
            yield item

    async def event_batches(self, min_events: int = 1) -> AsyncIterator[list[StreamEvent]]:
        """The stream's events in lists: each waits for one event and takes every event that is
        already queued behind it. A consumer that falls behind the decode loop (a slow client, a
        busy proxy) then sends one message per batch instead of one per token. After the first
        list (sent at once: time to first token), each waits for `min_events` events or the end
        (vLLM's stream_interval): fewer, larger writes for a small delay."""
        self._check_async()
        wanted = 1
        while True:
            batch, end = [await self._queue.get()], None
            while not isinstance(batch[-1], End) and (len(batch) < wanted or not self._queue.empty()):
                batch.append(await self._queue.get() if self._queue.empty() else self._queue.get_nowait())
            wanted = min_events
            if isinstance(batch[-1], End):
                end = batch.pop()
            if batch:
                yield batch
            if end is not None:
                end.unwrap()  # raises the request's error, if any
                return

    def _check_async(self) -> None:
        if self._loop is None:
            raise TypeError("this handle was submitted outside an event loop: use Engine.generate/stream")

    # ------------------------------------------------------------------ thread consumer
    def get(self, timeout: float | None = None) -> StreamEvent | End:
        """The next item, waiting up to `timeout` seconds (None: forever, 0: not at all);
        queue.Empty when there is none."""
        if self._loop is not None:
            raise TypeError("this handle belongs to an event loop: await it")
        assert isinstance(self._queue, queue.SimpleQueue)  # made without a loop
        return self._queue.get_nowait() if timeout == 0 else self._queue.get(timeout=timeout)


def failed(error: BaseException) -> End:
    """The end item of a request that failed with `error` (wrapped unless already one of ours;
    the original stays attached as the cause, for the log)."""
    if not isinstance(error, GenerationError):
        wrapped = GenerationError(f"generation failed: {type(error).__name__}: {error}")
        wrapped.__cause__ = error
        error = wrapped
    return End(error=error)
