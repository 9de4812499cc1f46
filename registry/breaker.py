"""`CircuitBreaker`: stop calling a downstream agent that keeps failing.

Closed, it lets every call through and counts consecutive failures; after
`failure_threshold` of them it opens and refuses calls at once, so a broken
sub-agent costs its callers a structured tool error instead of a timeout
each. After `reset_seconds` it is half-open: exactly one probe call goes
through; success closes it, failure opens it for another `reset_seconds`.
It remembers what the last failure was, so a breaker opened by an agent that
could not be reached says so (the registry then answers MESH_UNAVAILABLE: an
outage the caller's attempt waits out, not a verdict on the agent's work).

A breaker is per-process knowledge about a peer's health, not task state:
each registry replica learns it from its own calls, losing it on restart only
costs a few failed calls, and no task's outcome depends on it. That keeps the
services stateless in the sense that matters (any replica can serve any
request), which is why it lives in process memory and not in Redis.

Whoever wants to know when it opens or closes (the registry's metrics) passes
`on_transition`; the breaker itself knows nothing of how that is reported.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 5
    reset_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    last_failure: str = ""
    """What the latest failure of the current streak was (a tool error code), so
    an open breaker can say why it is open; empty while closed."""
    on_transition: Callable[[BreakerState], None] | None = field(
        default=None, repr=False, compare=False
    )
    """Told OPEN on each opening (a failed probe re-opens it too), CLOSED when a call
    closes it again. Half-open is reached by time passing and is not reported."""
    _failures: int = 0
    _opened_at: float | None = None
    _probing: bool = False
    _probe_started: float = field(default=0.0, repr=False)

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self.clock() - self._opened_at >= self.reset_seconds:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        """Seconds until the next probe may go through (0 when calls are allowed)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self.reset_seconds - self.clock())

    def allow(self) -> bool:
        """Whether a call may go through now; a half-open breaker admits one probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        # A probe whose caller vanished without a verdict must not block the
        # breaker forever: after another cool-down a new probe is admitted.
        if self._probing and self.clock() - self._probe_started < self.reset_seconds:
            return False
        self._probing, self._probe_started = True, self.clock()
        return True

    def record(self, ok: bool | None, *, cause: str = "") -> None:
        """The outcome of an allowed call: True success, False failure (`cause` says
        what failed), None no verdict (the caller gave up first: says nothing about
        the peer)."""
        if ok is None:
            self._probing = False
        elif ok:
            was_closed = self._opened_at is None
            self._failures, self._opened_at, self._probing = 0, None, False
            self.last_failure = ""
            if not was_closed:
                self._tell(BreakerState.CLOSED)
        else:
            self._failures += 1
            self.last_failure = cause
            if self._probing or self._failures >= self.failure_threshold:
                # A call let through before the opening that fails now extends the
                # open period; it is no new opening.
                opens = self.state is not BreakerState.OPEN
                self._opened_at = self.clock()
                if opens:
                    self._tell(BreakerState.OPEN)
            self._probing = False

    def _tell(self, state: BreakerState) -> None:
        if self.on_transition is not None:
            self.on_transition(state)
