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
            self._failures, self._opened_at, self._probing = 0, None, False
            self.last_failure = ""
        else:
            self._failures += 1
            self.last_failure = cause
            if self._probing or self._failures >= self.failure_threshold:
                self._opened_at = self.clock()
            self._probing = False
