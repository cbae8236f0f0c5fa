"""Dynamic batching, pure asyncio. It imports neither FastAPI nor ONNX Runtime: tests drive it with a fake
``predict``.

Requests arriving together are merged into one ``predict`` call of at most ``max_batch_size`` items,
waiting at most ``max_delay_s`` after the first item. While a batch computes (off the event loop, on its
instance's own thread), the next one keeps collecting; it is dispatched as soon as an instance frees. Several
``predict`` functions (execution instances, as Triton's instance groups: one session and one thread each)
share one queue, so that as many batches compute at once.

A full batch does not wait for an instance to free: it is queued behind the running batch of the instance
that started first, on that instance's thread, so that it starts the moment the one before ends. Without
that, every batch would wait for the event loop to hear of the last one's end and hand over the next; on a
busy loop that round trip leaves the instances idle between batches.
A partial batch still waits for an instance, collecting meanwhile, so batches are no smaller for it.

Items submitted ``alone`` (the caller knows that nothing else is in its pipeline, decoding included) wait
for no window, since nothing would join them; and an optional ``solo`` predict function (on a CPU: one
session over every core, beside single-threaded instances) takes a batch of them that finds every instance
idle and nothing queued behind it, holding every instance while it computes. At low load a request gets all the
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
import enum
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

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


class Stage(enum.IntEnum):
    """An item's way through the batcher, in order."""

    QUEUED = 0
    DISPATCHED = 1  # taken from the queue into a batch, for an instance (which may still be busy)
    STARTED = 2  # its instance began computing it


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    deadline: float
    enqueued: float
    future: asyncio.Future[R]
    stage: Stage = Stage.QUEUED  # how far it got (STARTED is set on its instance's thread)
    # Why it ends without an answer: "expired" (its deadline passed before it was computed) or "abandoned"
    # (its caller no longer waits); either way an instance that has not started it skips it.
    outcome: Literal["", "expired", "abandoned"] = ""
    alone: bool = False  # submitted with nothing else in the caller's pipeline: the solo function may take it


class Batcher(Generic[T, R]):
    def __init__(
        self,
        predict: Callable[[list[T]], Sequence[R]] | Sequence[Callable[[list[T]], Sequence[R]]],
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
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
        # One thread per instance: a batch queued behind another on an instance runs right after it.
        self._threads = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"predict-{name}-{i}", initializer=thread_initializer)
            for i in range(len(self._predicts))
        ]
        self._observer = observer or _NullObserver()
        self._clock = clock
        self.name = name
        self._queue: deque[_Entry[T, R]] = deque()
        # Entries queued and still wanted: the deque also holds entries whose caller gave up, until the
        # loop pops them, and those must count neither against the limit nor in the depth gauge.
        self._waiting = 0
        self._wakeup = asyncio.Event()
        self._batches_on = [0] * len(self._predicts)  # per instance: batches computing or queued behind
        self._running_since = [0.0] * len(self._predicts)  # per instance: when its running batch started
        self._solo_running = False
        self._finished = asyncio.Event()  # set when a batch ends (an instance frees or starts its next)
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
        for thread in self._threads:
            thread.shutdown(wait=False)

    @property
    def depth(self) -> int:
        return self._waiting

    def has_capacity(self, n: int = 1) -> bool:
        """Whether ``n`` more items would be queued now: an early check before expensive decoding."""
        return not self._closed and self._waiting + n <= self.max_queue_size

    def _on_done_cb(self, entry: _Entry[T, R], _future: asyncio.Future[R]) -> None:
        self._on_done(entry)

    def _on_done(self, entry: _Entry[T, R]) -> None:
        if entry.stage is Stage.QUEUED:  # expired or abandoned while queued
            self._waiting -= 1
            self._observer.queue_depth(self._waiting)
        if entry.outcome == "expired" and entry.stage < Stage.STARTED:
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
                    # Its request's other images expired (this one too, unless computing), or the caller left.
                    expired = e.stage < Stage.STARTED and now >= e.deadline
                    e.outcome = "expired" if expired else "abandoned"
                    e.future.cancel()
                elif not e.future.cancelled():
                    e.future.exception()  # retrieved, so asyncio does not log it as never retrieved

    async def _wait(self, entry: _Entry[T, R]) -> R:
        timeout = entry.deadline - self._clock()
        try:
            return await asyncio.wait_for(asyncio.shield(entry.future), timeout=max(timeout, 0))
        except TimeoutError:  # asyncio's own since Python 3.11 (hence requires-python)
            if entry.stage is Stage.STARTED:  # already computing: its answer is moments away, so take it
                return await entry.future
            entry.outcome = "expired"
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
                target = self._free_instance()
                if target is not None and (full or now >= window_end or self._closed):
                    break
                if target is None and full and (target := self._instance_to_queue_on()) is not None:
                    break  # a full batch: queued behind a running one rather than waiting for the loop
                # Wait for more items (unless full), the end of the window, or a batch to end.
                self._wakeup.clear()
                self._finished.clear()
                waits = [asyncio.ensure_future(self._finished.wait())]
                if not full:
                    waits.append(asyncio.ensure_future(self._wakeup.wait()))
                timeout = window_end - now if now < window_end and not full and target is not None else None
                _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for w in pending:
                    w.cancel()
            batch = self._take_batch()
            if batch:
                if self._takes_solo(batch):
                    assert self._solo is not None
                    instances, predict = list(range(len(self._predicts))), self._solo  # every core
                    self._solo_running = True
                    self.solo_batches += 1
                else:
                    assert target is not None  # the loop above breaks with one
                    instances, predict = [target], self._predicts[target]
                for i in instances:
                    if not self._batches_on[i]:  # it starts now; its thread sets the time again when it does
                        self._running_since[i] = self._clock()
                    self._batches_on[i] += 1
                task = asyncio.create_task(self._compute(batch, instances, predict))
                self._computing.add(task)
                task.add_done_callback(self._computing.discard)

    def _free_instance(self) -> int | None:
        return next((i for i, n in enumerate(self._batches_on) if n == 0), None)

    def _instance_to_queue_on(self) -> int | None:
        """The instance a full batch is queued on when none is free: the one whose running batch started
        first (likely to end first) among those with nothing queued yet; none beside the solo session."""
        if self._solo_running:
            return None
        single = [i for i, n in enumerate(self._batches_on) if n == 1]
        return min(single, key=lambda i: self._running_since[i]) if single else None

    def _takes_solo(self, batch: list[_Entry[T, R]]) -> bool:
        """Whether the solo function computes this batch: items submitted alone, every instance idle, and
        nothing queued behind them."""
        if self._solo is None or any(self._batches_on):
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
        e.outcome = "expired"
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
            e.stage = Stage.DISPATCHED
            self._waiting -= 1
            batch.append(e)
        self._observer.queue_depth(self._waiting)
        return batch

    @property
    def instances(self) -> int:
        return len(self._predicts)

    async def _compute(
        self, batch: list[_Entry[T, R]], instances: list[int], predict: Callable[[list[T]], Sequence[R]]
    ) -> None:
        loop = asyncio.get_running_loop()
        clock = self._clock
        started = clock()  # when its instance's thread takes it up, for a batch queued behind another

        def run() -> tuple[list[_Entry[T, R]], Sequence[R]]:
            """On the instance's thread: what is still wanted of the batch (one queued behind another may
            have expired meanwhile), computed."""
            nonlocal started
            started = clock()
            for i in instances:
                self._running_since[i] = started  # read by the event loop, written before the compute
            wanted = [e for e in batch if not e.outcome and e.deadline > started]
            for e in wanted:
                e.stage = Stage.STARTED
            return wanted, predict([e.item for e in wanted]) if wanted else []

        try:
            computed, results = await loop.run_in_executor(self._threads[instances[0]], run)
            for e in batch:
                if e.stage < Stage.STARTED and not e.future.done():  # expired behind the batch before it
                    self._expire(e)
            batch = computed
            if len(results) != len(batch):
                raise BatchFailedError(
                    f"inference failed: predict returned {len(results)} results for {len(batch)} inputs"
                )
        except Exception as exc:
            log.exception("batch of %d failed on %s", len(batch), self.name)
            for e in batch:
                if e.future.done():
                    continue
                if e.stage is Stage.STARTED:
                    e.future.set_exception(exc)  # every item of the batch fails with what failed it
                else:
                    self._expire(e)  # skipped (expired behind the batch before it), then predict failed
        else:
            for e, r in zip(batch, results, strict=True):
                if not e.future.done():
                    e.future.set_result(r)
        finally:
            if batch:
                self._observer.batch_done(len(batch), [started - e.enqueued for e in batch], clock() - started)
            for i in instances:
                self._batches_on[i] -= 1
            if predict is self._solo:
                self._solo_running = False
            self._finished.set()
            self._wakeup.set()
