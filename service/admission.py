"""Admission over the whole pipeline: a request's images count from the moment it is admitted (before its body
is read) until its answer, decoding included, so that nothing waits unboundedly anywhere.

The design is an estimate of the wait, from measured throughput (Little's law). Every image admitted and not
yet answered is *pending*. While the server is busy, the time between completions, per image, is the
pipeline's cost of one image at the concurrency it runs at (decode pool, batcher and sessions together); its
moving average is ``per_image_s``. A new request of ``n`` images would be answered after about
``(pending + n) * per_image_s``. If that exceeds the wait allowed (``DEEPVIT_ADMISSION_MAX_WAIT_S``, by
default half the request deadline, so that what is admitted finishes in time even when the estimate is off
by a factor of two), the request is refused at once with 503 and a ``Retry-After`` of the estimated wait:
the refusal costs a few arithmetic operations and reads no body. A hard cap on pending images
(``DEEPVIT_MAX_PENDING_IMAGES``) bounds memory whatever the estimate says (before the first measurement too).

Why not a fixed concurrency limit: the right one depends on the model, the batch size and the hardware, and
moves with them; the estimate adapts by itself, and its figures (pending, per-image cost, estimated wait)
are what an operator wants on a dashboard. Why not only the batcher's queue bound: under overload requests
wait before they reach it (for a decode thread), and expire there, which is where the work is wasted.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from .errors import UnavailableError

# Weight of a new sample in the moving average of the per-image cost: about the last 30 completions.
_ALPHA = 1 / 32


class Admission:
    def __init__(
        self,
        max_wait_s: float,
        max_pending_images: int,
        clock: Callable[[], float] = time.monotonic,
        per_image_s: float | None = None,
    ) -> None:
        self.max_wait_s = max_wait_s
        self.max_pending_images = max_pending_images
        self.pending = 0  # images admitted and not answered yet
        # Requests whose body is in and that are not answered yet, admitted or not (the HTTP protocol counts
        # them): the requests on their way to admission that ``check_arrivals`` sees ahead of a new one.
        self.arrived = 0
        self.per_image_s = per_image_s  # None until measured (or seeded by a warm-up)
        self._clock = clock
        self._last_done: float | None = None  # the last completion while busy
        self._lock = threading.Lock()  # released from decode threads too

    def estimated_wait_s(self, images: int = 0) -> float:
        return (self.pending + images) * (self.per_image_s or 0.0)

    def seed(self, per_image_s: float) -> None:
        """A first estimate (a warm-up's inference time per image) until completions measure it."""
        with self._lock:
            if self.per_image_s is None:
                self.per_image_s = per_image_s

    def check(self, images: int = 1) -> None:
        """Raise what ``admit`` would, reserving nothing: the middleware's refusal before any routing."""
        with self._lock:
            self._check(images)

    def admit(self, images: int) -> None:
        """Reserve ``images``, or raise ``UnavailableError`` (503) when they cannot be answered in time."""
        with self._lock:  # the check and the reservation in one step
            self._check(images)
            if self.pending == 0:
                self._last_done = self._clock()  # a busy period starts: completions measure from here
            self.pending += images

    def check_arrivals(self) -> None:
        """``check`` of a request whose head has just been parsed, counting ahead of it, besides the images
        admitted, the requests whose bodies are in and are on their way to admission: above capacity most
        of those will be refused too, later and at a higher cost (routing, the middleware, the body read)."""
        with self._lock:
            self._check(1, max(self.pending, self.arrived))

    def _check(self, images: int, ahead: int | None = None) -> None:
        ahead = self.pending if ahead is None else ahead
        if ahead + images > self.max_pending_images:
            raise self._refusal(f"{ahead} images are in the pipeline (the limit is {self.max_pending_images})")
        wait = (ahead + images) * (self.per_image_s or 0.0)
        if ahead and wait > self.max_wait_s:
            raise self._refusal(
                f"the estimated wait is {wait:.2f}s ({ahead} images ahead at "
                f"{1000 * (self.per_image_s or 0):.1f} ms each), over the {self.max_wait_s:g}s allowed"
            )

    def release(self, images: int, completed: bool) -> None:
        """``images`` leave the pipeline; ``completed`` when they were computed (they measure the cost)."""
        with self._lock:
            now = self._clock()
            if completed and images and self._last_done is not None:
                sample = (now - self._last_done) / images
                self.per_image_s = (
                    sample if self.per_image_s is None else self.per_image_s + _ALPHA * (sample - self.per_image_s)
                )
            self.pending = max(0, self.pending - images)
            self._last_done = now if self.pending else None

    def _refusal(self, why: str) -> UnavailableError:
        retry = max(1, math.ceil(min(self.estimated_wait_s(), 30.0)))
        return UnavailableError(f"the server is overloaded: {why}; retry shortly", "overloaded", retry_after_s=retry)
