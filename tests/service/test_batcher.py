"""The batcher driven by fake predict functions: no ONNX Runtime, no HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from deepvit.service.batcher import (
    Batcher,
    BatcherClosedError,
    BatchFailedError,
    ExpiredError,
    QueueFullError,
)

pytestmark = pytest.mark.anyio


class FakeModel:
    """Records every batch; optionally slow, optionally failing on a marked item."""

    def __init__(self, delay_s: float = 0.0, fail_on: object = None, wrong_count: bool = False) -> None:
        self.batches: list[list[object]] = []
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.wrong_count = wrong_count
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: list[object]) -> Sequence[object]:
        self.release.wait(5)
        self.batches.append(list(items))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        out = [("out", i) for i in items]
        return out[:-1] if self.wrong_count else out


def make(model: FakeModel, **kw: float) -> Batcher[object, object]:
    opts = {"max_batch_size": 4, "max_delay_s": 0.05, "max_queue_size": 16, **kw}
    return Batcher(
        model,
        max_batch_size=int(opts["max_batch_size"]),
        max_delay_s=float(opts["max_delay_s"]),
        max_queue_size=int(opts["max_queue_size"]),
    )


def deadline(s: float = 5.0) -> float:
    return time.monotonic() + s


async def test_concurrent_items_are_merged_into_one_batch_in_order() -> None:
    model = FakeModel()
    b = make(model)
    b.start()
    results = await asyncio.gather(*(b.submit(i, deadline()) for i in range(3)))
    assert results == [("out", 0), ("out", 1), ("out", 2)]
    assert model.batches == [[0, 1, 2]]
    await b.close()


async def test_full_batch_goes_at_once_without_waiting_for_the_delay() -> None:
    model = FakeModel()
    b = make(model, max_delay_s=10.0)
    b.start()
    t0 = time.monotonic()
    await asyncio.gather(*(b.submit(i, deadline()) for i in range(4)))
    assert time.monotonic() - t0 < 1.0  # the size trigger, not the 10 s delay
    assert model.batches == [[0, 1, 2, 3]]
    await b.close()


async def test_a_lone_item_waits_at_most_the_delay() -> None:
    model = FakeModel()
    b = make(model, max_delay_s=0.2)
    b.start()
    t0 = time.monotonic()
    await b.submit("x", deadline())
    waited = time.monotonic() - t0
    assert 0.15 <= waited < 1.0
    await b.close()


async def test_more_items_than_a_batch_split_in_arrival_order() -> None:
    model = FakeModel()
    b = make(model, max_batch_size=4)
    b.start()
    results = await asyncio.gather(*(b.submit(i, deadline()) for i in range(10)))
    assert results == [("out", i) for i in range(10)]
    assert [len(x) for x in model.batches] == [4, 4, 2]
    assert [i for batch in model.batches for i in batch] == list(range(10))
    await b.close()


async def test_next_batch_collects_while_one_computes() -> None:
    model = FakeModel(delay_s=0.3)
    b = make(model, max_batch_size=8, max_delay_s=0.0)
    b.start()
    first = asyncio.create_task(b.submit("a", deadline()))
    await asyncio.sleep(0.05)  # "a" is computing now
    rest = [asyncio.create_task(b.submit(i, deadline())) for i in range(5)]
    await asyncio.gather(first, *rest)
    # The five that arrived during the compute went together, though the delay was zero.
    assert model.batches == [["a"], [0, 1, 2, 3, 4]]
    await b.close()


async def test_a_failing_batch_fails_only_its_own_items_and_the_loop_goes_on() -> None:
    model = FakeModel(fail_on="bad")
    b = make(model, max_batch_size=2, max_delay_s=0.0)
    b.start()
    bad = asyncio.create_task(b.submit("bad", deadline()))
    mate = asyncio.create_task(b.submit("mate", deadline()))
    results = await asyncio.gather(bad, mate, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)  # what failed the batch, as predict raised it
    assert await b.submit("good", deadline()) == ("out", "good")
    await b.close()


async def test_a_wrong_output_count_fails_the_batch() -> None:
    b = make(FakeModel(wrong_count=True))
    b.start()
    with pytest.raises(BatchFailedError, match="1 results for 2 inputs"):
        await b.submit_many(["a", "b"], deadline())
    await b.close()


async def test_queue_full_is_refused_at_once_and_nothing_is_half_queued() -> None:
    model = FakeModel()
    model.release.clear()  # the first batch blocks, so the queue fills up
    b = make(model, max_batch_size=1, max_delay_s=0.0, max_queue_size=3)
    b.start()
    first = asyncio.create_task(b.submit("computing", deadline()))
    await asyncio.sleep(0.05)
    behind = asyncio.create_task(b.submit("behind", deadline()))  # a full batch: queued on the instance
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(b.submit(i, deadline())) for i in range(3)]
    await asyncio.sleep(0.01)
    t0 = time.monotonic()
    with pytest.raises(QueueFullError, match="full"):
        await b.submit("one too many", deadline())
    with pytest.raises(QueueFullError):
        await b.submit_many(["x", "y"], deadline())  # all or nothing
    assert time.monotonic() - t0 < 0.1
    assert b.depth == 3
    model.release.set()
    assert await asyncio.gather(first, behind, *queued) == [("out", "computing"), ("out", "behind")] + [
        ("out", i) for i in range(3)
    ]
    await b.close()


async def test_an_item_whose_deadline_passes_in_the_queue_is_never_computed() -> None:
    b, model, blocker = await blocked()
    with pytest.raises(ExpiredError, match="deadline"):
        await b.submit("late", deadline(0.1))
    model.release.set()
    await blocker
    assert await b.submit("after", deadline()) == ("out", "after")
    assert ["late"] not in model.batches
    assert model.batches == [["blocker"], ["after"]]
    await b.close()


async def test_an_item_already_computing_past_its_deadline_still_gets_its_answer() -> None:
    b = make(FakeModel(delay_s=0.3), max_delay_s=0.0)
    b.start()
    assert await b.submit("slow", deadline(0.1)) == ("out", "slow")
    await b.close()


async def test_close_drains_queued_work_then_refuses_new_items() -> None:
    model = FakeModel(delay_s=0.05)
    b = make(model, max_batch_size=2, max_delay_s=0.0)
    b.start()
    tasks = [asyncio.create_task(b.submit(i, deadline())) for i in range(6)]
    await asyncio.sleep(0.01)
    await b.close(drain=True)
    assert await asyncio.gather(*tasks) == [("out", i) for i in range(6)]
    with pytest.raises(BatcherClosedError):
        await b.submit("late", deadline())


@dataclass
class RecordingObserver:
    """What the batcher reports, as the Prometheus adapter would receive it."""

    depths: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    expired_waits: list[float] = field(default_factory=list)

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)

    def batch_done(self, size: int, queue_waits: Sequence[float], compute_s: float) -> None:
        self.sizes.append(size)
        self.waits.extend(queue_waits)

    def expired(self, queue_wait: float) -> None:
        self.expired_waits.append(queue_wait)


async def blocked(
    observer: RecordingObserver | None = None,
) -> tuple[Batcher[object, object], FakeModel, asyncio.Task[object]]:
    """Batches of one, the first ("blocker") computing and held there until ``model.release`` is set."""
    model = FakeModel()
    model.release.clear()
    b: Batcher[object, object] = Batcher(model, max_batch_size=1, max_delay_s=0.0, max_queue_size=8, observer=observer)
    b.start()
    blocker = asyncio.create_task(b.submit("blocker", deadline()))
    await asyncio.sleep(0.05)
    return b, model, blocker


async def test_observer_sees_batches_and_queue_depth() -> None:
    seen = RecordingObserver()
    b: Batcher[int, object] = Batcher(FakeModel(), max_batch_size=4, max_delay_s=0.02, max_queue_size=8, observer=seen)
    b.start()
    await asyncio.gather(*(b.submit(i, deadline()) for i in range(3)))
    assert seen.sizes == [3]
    assert len(seen.waits) == 3
    assert all(w >= 0 for w in seen.waits)
    assert max(seen.depths) == 3
    assert seen.depths[-1] == 0
    await b.close()


async def test_observer_sees_the_waits_of_expired_items() -> None:
    seen = RecordingObserver()
    b, model, blocker = await blocked(seen)
    with pytest.raises(ExpiredError):
        await b.submit_many(["late", "later", "latest"], deadline(0.1))
    await asyncio.sleep(0)  # done-callbacks run on the next turn of the loop
    assert len(seen.expired_waits) == 3  # each image of the request waited, each is observed
    assert min(seen.expired_waits) >= 0.09
    model.release.set()
    await blocker
    await b.close()


async def test_waiting_for_the_window_does_not_spin_the_event_loop() -> None:
    b = make(FakeModel(), max_delay_s=0.05)
    b.start()
    cpu0, wall0 = time.process_time(), time.monotonic()
    for i in range(8):
        await b.submit(i, deadline())
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    assert wall >= 0.35  # eight lone items, each waiting out its window
    assert cpu < wall / 2, f"{cpu:.2f}s of CPU for {wall:.2f}s of waiting: the loop spins"
    await b.close()


async def test_abandoned_entries_free_their_queue_places_at_once() -> None:
    model = FakeModel()
    model.release.clear()
    b = make(model, max_batch_size=1, max_delay_s=0.0, max_queue_size=4)
    b.start()
    blocker = asyncio.create_task(b.submit("blocker", deadline()))
    await asyncio.sleep(0.05)
    late = await asyncio.gather(*(b.submit(i, deadline(0.05)) for i in range(4)), return_exceptions=True)
    assert all(isinstance(r, ExpiredError) for r in late)
    await asyncio.sleep(0.01)
    assert b.depth == 0
    assert b.has_capacity(4)
    queued = asyncio.create_task(b.submit("fits", deadline()))  # not a false "queue full"
    model.release.set()
    assert await queued == ("out", "fits")
    await blocker
    await b.close()


async def test_a_failed_multi_item_request_leaves_no_unretrieved_exceptions(caplog: pytest.LogCaptureFixture) -> None:
    import gc

    b = make(FakeModel(fail_on="bad"))
    b.start()
    with pytest.raises(RuntimeError):
        await b.submit_many(["a", "bad", "c"], deadline())
    gc.collect()
    await asyncio.sleep(0.01)
    assert "never retrieved" not in caplog.text
    await b.close()


async def test_an_item_submitted_alone_waits_for_no_window() -> None:
    """Nothing else is in the caller's pipeline, so nothing would join it: it is computed at once."""
    model = FakeModel()
    b = make(model, max_delay_s=5.0)
    b.start()
    t0 = time.monotonic()
    assert await b.submit("a", deadline(), alone=True) == ("out", "a")
    assert time.monotonic() - t0 < 2.5  # not the 5 s window
    await b.close()


async def test_a_full_batch_starts_when_the_one_before_ends_though_the_event_loop_is_busy() -> None:
    """A full batch is queued on the busy instance's own thread: it does not wait for the event loop to hear
    that the batch before it ended (at capacity that round trip left the instances idle)."""
    spans: list[tuple[float, float]] = []

    def predict(items: list[object]) -> list[object]:
        t0 = time.monotonic()
        time.sleep(0.1)
        spans.append((t0, time.monotonic()))
        return list(items)

    b: Batcher[object, object] = Batcher(predict, max_batch_size=1, max_delay_s=0.0, max_queue_size=8)
    b.start()
    first = asyncio.create_task(b.submit("a", deadline()))
    await asyncio.sleep(0.02)  # "a" computes
    second = asyncio.create_task(b.submit("b", deadline()))
    await asyncio.sleep(0.02)  # "b" is queued behind it
    time.sleep(0.3)  # the event loop is busy well past the end of "a"
    assert await asyncio.gather(first, second) == ["a", "b"]
    assert spans[1][0] - spans[0][1] < 0.05  # "b" started as "a" ended, not when the loop was free (0.2 s later)
    await b.close()


async def test_an_item_queued_behind_a_batch_whose_deadline_passes_meanwhile_is_never_computed() -> None:
    seen = RecordingObserver()
    b, model, blocker = await blocked(seen)
    with pytest.raises(ExpiredError, match="deadline"):
        await b.submit("late", deadline(0.1))  # queued behind "blocker", on its instance
    model.release.set()
    await blocker
    assert await b.submit("after", deadline()) == ("out", "after")
    assert model.batches == [["blocker"], ["after"]]
    assert len(seen.expired_waits) == 1
    assert seen.expired_waits[0] >= 0.09
    await b.close()
