"""Dynamic batching, pure asyncio. It imports neither FastAPI nor ONNX Runtime: tests drive it with a fake
``predict``.

Requests arriving together are merged into one ``predict`` call of at most ``max_batch_size`` items,
waiting at most ``max_delay_s`` after the first item. While a batch computes (off the event loop, in the
injected executor), the next one keeps collecting; it is dispatched as soon as a compute slot frees. Several
``predict`` functions (execution instances, as Triton's instance groups: one session each) share one queue,
each a slot of its own, so that as many batches compute at once.

Items submitted ``alone`` (the caller knows that nothing else is in its pipeline, decoding included) wait
for no window, since nothing would join them; and an optional ``solo`` predict function (on a CPU: one
session over every core, beside single-threaded instances) takes a batch of them that finds every instance
idle and nothing queued behind it, holding every slot while it computes. At low load a request gets all the
cores (the latency of a wide session); under load the instances keep the throughput of narrow ones. The
batcher's own queue is no load signal: where decoding is the bottleneck it holds one item at a time however
busy the server is.

The queue is bounded (``QueueFullError`` at once when full). Every item carries a deadline on the
monotonic clock: one that expires while queued fails with ``ExpiredError`` and is never
computed. A failing batch fails its own items only, each with the exception ``predict`` raised (a wrong
number of results is a ``BatchFailedError``), and the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

log = logging.getLogger("deepvit.batcher")

T = TypeVar("T")
R = TypeVar("R")


class QueueFullError(Exception):
    pass


class ExpiredError(Exception):
    """The item's deadline passed while it was queued: it was never computed."""


class BatchFailedError(Exception):
    """``predict`` answered a batch with the wrong number of results."""


class BatcherClosedError(Exception):
    pass


class BatchObserver(Protocol):
    def queue_depth(self, depth: int) -> None: ...
    def batch_done(self, size: int, queue_waits: Sequence[float], compute_s: float) -> None: ...
    def expired(self, queue_wait: float) -> None:
        """An item's deadline passed while it was queued: it waited this long and was never computed (the
        waits that matter most when the server is overloaded)."""


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def batch_done(self, size: int, queue_waits: Sequence[float], compute_s: float) -> None:
        pass

    def expired(self, queue_wait: float) -> None:
        pass


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    deadline: float
    enqueued: float
    future: asyncio.Future[R]
    dispatched: bool = False
    expired: bool = False  # its deadline passed while it was queued
    alone: bool = False  # submitted with nothing else in the caller's pipeline: the solo function may take it


class Batcher(Generic[T, R]):
    def __init__(
        self,
        predict: Callable[[list[T]], Sequence[R]] | Sequence[Callable[[list[T]], Sequence[R]]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "model",
        thread_initializer: Callable[[], None] | None = None,
        solo: Callable[[list[T]], Sequence[R]] | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1, max_delay_s >= 0")
        self._predicts = list(predict) if isinstance(predict, Sequence) else [predict]
        if not self._predicts:
            raise ValueError("at least one predict function is needed")
        self._solo = solo
        self.solo_batches = 0  # batches the solo function computed
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(
            max_workers=len(self._predicts), thread_name_prefix=f"predict-{name}", initializer=thread_initializer
        )
        self._observer = observer or _NullObserver()
        self._clock = clock
        self.name = name
        self._queue: deque[_Entry[T, R]] = deque()
        # Entries queued and still wanted: the deque also holds entries whose caller gave up, until the
        # loop pops them, and those must count neither against the limit nor in the depth gauge.
        self._waiting = 0
        self._wakeup = asyncio.Event()
        self._free_slots = list(range(len(self._predicts)))  # instances not computing now
        self._slot_free = asyncio.Event()  # set while a slot is free
        self._slot_free.set()
        self._computing: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"batcher-{self.name}")

    async def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking items; with ``drain`` finish every queued and computing batch first (for at most
        ``timeout`` seconds: what is still queued then fails with ``BatcherClosedError``)."""
        self._closed = True
        if drain:
            loop = asyncio.get_running_loop()
            end = None if timeout is None else loop.time() + timeout
            while (self._queue or self._computing) and (end is None or loop.time() < end):
                self._wakeup.set()
                await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for entry in self._queue:
            if not entry.future.done():
                entry.future.set_exception(BatcherClosedError("the model was unloaded before this request ran"))
        self._queue.clear()
        if self._computing:
            await asyncio.gather(*self._computing, return_exceptions=True)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    @property
    def depth(self) -> int:
        return self._waiting

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._computing

    def has_capacity(self, n: int = 1) -> bool:
        """Whether ``n`` more items would be queued now: an early check before expensive decoding."""
        return not self._closed and self._waiting + n <= self.max_queue_size

    def _on_done_cb(self, entry: _Entry[T, R], _future: asyncio.Future[R]) -> None:
        self._on_done(entry)

    def _on_done(self, entry: _Entry[T, R]) -> None:
        if not entry.dispatched:  # expired or abandoned while queued
            self._waiting -= 1
            self._observer.queue_depth(self._waiting)
            if entry.expired:
                self._observer.expired(self._clock() - entry.enqueued)

    # -- submitting -----------------------------------------------------------------------------
    async def submit(self, item: T, deadline: float, alone: bool = False) -> R:
        return (await self.submit_many([item], deadline, alone))[0]

    async def submit_many(self, items: Sequence[T], deadline: float, alone: bool = False) -> list[R]:
        """Queue all items or none; wait for their results (in order) until ``deadline``. ``alone``: nothing
        else is in the caller's pipeline, so a solo function may compute them."""
        if self._closed:
            raise BatcherClosedError("not accepting requests: shutting down")
        if self._waiting + len(items) > self.max_queue_size:
            raise QueueFullError(
                f"the queue of {self.name} is full ({self._waiting} of {self.max_queue_size} images waiting)"
            )
        loop = asyncio.get_running_loop()
        now = self._clock()
        entries = [_Entry[T, R](item, deadline, now, loop.create_future(), alone=alone) for item in items]
        for e in entries:
            e.future.add_done_callback(functools.partial(self._on_done_cb, e))
        self._queue.extend(entries)
        self._waiting += len(entries)
        self._observer.queue_depth(self._waiting)
        self._wakeup.set()
        try:
            return [await self._wait(e) for e in entries]
        finally:
            now = self._clock()
            for e in entries:  # the caller gave up (deadline, error, disconnect): don't compute the rest
                if not e.future.done():
                    e.expired = not e.dispatched and now >= e.deadline  # the request's other images expired too
                    e.future.cancel()
                elif not e.future.cancelled():
                    e.future.exception()  # retrieved, so asyncio does not log it as never retrieved

    async def _wait(self, entry: _Entry[T, R]) -> R:
        timeout = entry.deadline - self._clock()
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout=max(timeout, 0))
        except TimeoutError:  # asyncio's own since Python 3.11 (hence requires-python)
            if entry.dispatched:  # already computing: its answer is moments away, so take it
                return await entry.future
            entry.expired = True
            entry.future.cancel()
            raise ExpiredError(
                f"the request's deadline passed after {self._clock() - entry.enqueued:.3f}s in the queue"
            ) from None

    # -- the loop -------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            while not self._live_head():
                self._wakeup.clear()
                await self._wakeup.wait()
            head = self._queue[0]
            # Submitted alone (nothing else in the caller's pipeline to join it): no window to wait out.
            window_end = head.enqueued + (0.0 if head.alone else self.max_delay_s)
            while True:
                live = self._count_live(self.max_batch_size)
                full = live >= self.max_batch_size
                now = self._clock()
                if self._slot_free.is_set() and (full or now >= window_end or self._closed):
                    break
                # Wait for more items (unless full), the end of the window, or a busy slot to free up.
                self._wakeup.clear()
                waits = []
                if not self._slot_free.is_set():
                    waits.append(asyncio.ensure_future(self._slot_free.wait()))
                if not full:
                    waits.append(asyncio.ensure_future(self._wakeup.wait()))
                timeout = window_end - now if now < window_end and not full else None
                _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
            batch = self._take_batch()
            if batch:
                solo = self._solo if self._takes_solo(batch) else None
                if solo is not None:
                    slots, predict = list(self._free_slots), solo  # alone: every slot, every core
                    self._free_slots.clear()
                    self.solo_batches += 1
                else:
                    slots = [self._free_slots.pop()]
                    predict = self._predicts[slots[0]]
                if not self._free_slots:
                    self._slot_free.clear()
                task = asyncio.create_task(self._compute(batch, slots, predict))
                self._computing.add(task)
                task.add_done_callback(self._computing.discard)

    def _takes_solo(self, batch: list[_Entry[T, R]]) -> bool:
        """Whether the solo function computes this batch: items submitted alone, every instance idle, and
        nothing queued behind them."""
        if self._solo is None or len(self._free_slots) < len(self._predicts):
            return False
        return all(e.alone for e in batch) and not self._live_head()

    def _drop_dead_head(self) -> None:
        now = self._clock()
        while self._queue:
            e = self._queue[0]
            if e.future.done():
                self._queue.popleft()
            elif e.deadline <= now:
                self._queue.popleft()
                self._expire(e)
            else:
                break

    @staticmethod
    def _expire(e: _Entry[T, R]) -> None:
        e.expired = True
        e.future.set_exception(ExpiredError("the request's deadline passed while queued"))

    def _live_head(self) -> bool:
        self._drop_dead_head()
        return bool(self._queue)

    def _count_live(self, limit: int) -> int:
        n = 0
        for e in self._queue:
            if not e.future.done():
                n += 1
                if n >= limit:
                    break
        return n

    def _take_batch(self) -> list[_Entry[T, R]]:
        batch: list[_Entry[T, R]] = []
        now = self._clock()
        while self._queue and len(batch) < self.max_batch_size:
            e = self._queue.popleft()
            if e.future.done():
                continue
            if e.deadline <= now:  # expired while queued: never computed
                self._expire(e)
                continue
            e.dispatched = True
            self._waiting -= 1
            batch.append(e)
        self._observer.queue_depth(self._waiting)
        return batch

    @property
    def instances(self) -> int:
        return len(self._predicts)

    async def _compute(
        self, batch: list[_Entry[T, R]], slots: list[int], predict: Callable[[list[T]], Sequence[R]]
    ) -> None:
        loop = asyncio.get_running_loop()
        started = self._clock()
        waits = [started - e.enqueued for e in batch]
        try:
            results = await loop.run_in_executor(self._executor, predict, [e.item for e in batch])
            if len(results) != len(batch):
                raise BatchFailedError(
                    f"inference failed: predict returned {len(results)} results for {len(batch)} inputs"
                )
        except Exception as exc:
            log.exception("batch of %d failed on %s", len(batch), self.name)
            for e in batch:
                if not e.future.done():
                    e.future.set_exception(exc)  # every item of the batch fails with what failed it
        else:
            for e, r in zip(batch, results, strict=True):
                if not e.future.done():
                    e.future.set_result(r)
        finally:
            compute_s = self._clock() - started
            self._observer.batch_done(len(batch), waits, compute_s)
            self._free_slots.extend(slots)
            self._slot_free.set()
            self._wakeup.set()
