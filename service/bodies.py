"""What request bodies may hold, process-wide: the bytes held for bodies being uploaded or still in use
(``DEEPVIT_MAX_UPLOAD_BYTES``) and the bodies in transit (``DEEPVIT_MAX_UPLOADS``).

Uploading is not work the model does, so it is bounded on its own terms rather than by admission. Each
request's body is bounded already (``DEEPVIT_MAX_BODY_BYTES``, ``DEEPVIT_BODY_TIMEOUT_S``); what those do not
bound is the sum: 160 clients each sending a 19 MB body at once made the process hold 2.4 GB. Here a body
reserves what its ``Content-Length`` declares before a byte of it is read (a chunked body reserves as it
arrives) and holds it until its request has been answered; a new upload that would take the sum over the
bound, or one more body in transit than allowed, is refused at once with 503 and ``Retry-After``, before its
body is read. A body that trickles in holds only its own reservation, never admission capacity or a model's
queue (:mod:`.pipeline`).

It runs on the event loop only (the middleware), so it needs no lock.
"""

from __future__ import annotations

from .errors import UnavailableError

_MIB = 1 << 20


class BodyBudget:
    def __init__(self, max_bytes: int, max_bodies: int) -> None:
        self.max_bytes = max_bytes
        self.max_bodies = max_bodies
        self.held_bytes = 0  # reserved by the bodies of requests not yet answered
        self.in_transit = 0  # bodies not yet wholly received

    def begin(self, declared: int | None) -> Body:
        """A body is about to be read: reserve what it declares (``None``: chunked, reserved as it arrives),
        or refuse with ``UnavailableError`` (503, reason ``upload_budget``) before anything is read."""
        if self.in_transit >= self.max_bodies:
            raise self._refusal(f"{self.in_transit} uploads are in progress (the limit is {self.max_bodies})")
        reserve = declared or 0
        if self.held_bytes + reserve > self.max_bytes:
            raise self._refusal(self._held_text(reserve))
        self.held_bytes += reserve
        self.in_transit += 1
        return Body(self, reserve)

    def _held_text(self, more: int) -> str:
        return (
            f"request bodies hold {self.held_bytes / _MIB:.1f} MiB and this one needs {more / _MIB:.1f} MiB more, "
            f"over the {self.max_bytes / _MIB:.0f} MiB allowed for uploads"
        )

    def _refusal(self, why: str) -> UnavailableError:
        return UnavailableError(f"the server is busy receiving uploads: {why}; retry shortly", "upload_budget")


class Body:
    """One request's share of the budget, from its head to its answer."""

    def __init__(self, budget: BodyBudget, reserved: int) -> None:
        self._budget = budget
        self.reserved = reserved
        self._in_transit = True
        self._released = False

    def received(self, total: int) -> None:
        """``total`` bytes of the body have arrived: reserve the part over what was reserved (a chunked
        body), or refuse (503) when the bound is reached."""
        more = total - self.reserved
        if more <= 0:
            return
        b = self._budget
        if b.held_bytes + more > b.max_bytes:
            raise b._refusal(b._held_text(more))
        b.held_bytes += more
        self.reserved = total

    def arrived(self) -> None:
        """The whole body is in: no longer in transit (its bytes stay held until ``release``)."""
        if self._in_transit:
            self._in_transit = False
            self._budget.in_transit -= 1

    def release(self) -> None:
        """The request has been answered (or failed): what it held goes back."""
        self.arrived()
        if not self._released:
            self._released = True
            self._budget.held_bytes -= self.reserved
