"""A token quota per tenant per period, shared by every agent process of the mesh.

One Redis counter per tenant and period: each model call's tokens are added
to it once the call returns (`record`), and before each model call the
tenant's use so far is compared with its quota (`check`). The count lives in
Redis, not in the process, so every agent and worker replica charges the same
counter, and a restart forgets nothing.

Periods are fixed windows aligned to the Unix epoch (`Window`): all replicas
agree on a window's bounds without talking to each other, and a refusal can
say exactly when the quota resets. A window's counter expires two periods
after its last write, by which time no one reads it.

The limit is soft by what is in flight: a call's tokens are known only once it
returns, so calls that passed the check together may together go past the
quota, by at most what they spend. The next call is refused.

A tenant without a quota (0) costs no Redis traffic at all: nothing is
counted for it (the Prometheus counters in agents/metrics.py attribute its
usage regardless).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import redis.asyncio as aioredis
import redis.exceptions

from agentplex.contract.reasons import Reason
from agentplex.runtime import errors, principal
from agentplex.runtime.settings import Settings

log = logging.getLogger(__name__)

# Redis failures, as the redis client raises them (a refused connection is an OSError too).
_REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


@dataclass(frozen=True)
class Window:
    """One quota period: [start, end) in Unix seconds."""

    start: int
    period: int

    @classmethod
    def at(cls, now: float, period: int) -> Window:
        """The window `now` falls in: aligned to the epoch, so every replica computes the
        same one from its own clock."""
        if period < 1:
            raise ValueError(f"a quota period must be at least 1 second, not {period}")
        return cls(int(now // period) * period, period)

    @property
    def end(self) -> int:
        """When the next window begins: the quota resets then."""
        return self.start + self.period

    def resets_at(self) -> str:
        """`end` as RFC 3339, UTC (`2025-01-02T00:00:00Z`)."""
        return datetime.fromtimestamp(self.end, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    def seconds_left(self, now: float) -> int:
        """Whole seconds until the reset, at least 1: what a client should wait."""
        return max(1, int(self.end - now + 0.999))


@dataclass(frozen=True)
class QuotaPolicy:
    """Which tenant may spend how many tokens per period (0: unlimited)."""

    tokens: int = 0
    period_seconds: int = 24 * 3600
    per_tenant: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> QuotaPolicy:
        return cls(
            tokens=settings.tenant_token_quota,
            period_seconds=settings.tenant_token_quota_period_seconds,
            per_tenant=dict(settings.tenant_token_quotas),
        )

    @property
    def enabled(self) -> bool:
        """Whether any tenant is limited at all (otherwise no quota object is needed)."""
        return self.tokens > 0 or any(tokens > 0 for tokens in self.per_tenant.values())

    def limit_for(self, who: principal.Principal) -> int:
        """The quota of `who`'s tenant, 0 for none.

        The mesh acting for itself (its own housekeeping, a mesh without tokens) is
        limited only by an explicit `default` entry: the mesh-wide quota is for
        tenants, and would otherwise stop a tokenless mesh as a whole.
        """
        if who.tenant in self.per_tenant:
            return self.per_tenant[who.tenant]
        return 0 if who.is_mesh else self.tokens


class TokenQuota:
    """The tenant quota's counters in Redis, for the tenant of the current principal."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        key_prefix: str,
        policy: QuotaPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._key_prefix = key_prefix
        self.policy = policy
        self._clock = clock

    def window(self) -> Window:
        return Window.at(self._clock(), self.policy.period_seconds)

    def key(self, tenant: str, window: Window) -> str:
        """The counter of `tenant` in `window`, among the tenant's own keys."""
        return f"{principal.tenant_prefix(self._key_prefix, tenant)}:quota:tokens:{window.start}"

    async def used(self, tenant: str | None = None) -> int:
        """Tokens `tenant` (the current one by default) spent in the current window."""
        tenant = principal.current().tenant if tenant is None else tenant
        value = await self._redis.get(self.key(tenant, self.window()))
        return int(value) if value is not None else 0

    async def check(self) -> None:
        """Refuse a model call when the current tenant has used up its quota.

        Raises ResourceExhausted (QUOTA_EXHAUSTED) naming the tenant, the quota, the
        period and when it resets, with the same facts in ErrorInfo metadata; and
        Unavailable (REDIS_UNAVAILABLE) when the counter cannot be read: a limit that
        cannot be checked is not waived, and an outage is retried (a worker runs the
        task again later) rather than failing the task for good.
        """
        who = principal.current()
        quota = self.policy.limit_for(who)
        if quota <= 0:
            return
        now = self._clock()
        window = Window.at(now, self.policy.period_seconds)
        try:
            value = await self._redis.get(self.key(who.tenant, window))
        except _REDIS_DOWN as exc:
            raise errors.Unavailable(
                f"cannot check tenant {who.tenant!r}'s token quota: Redis is unavailable ({exc})",
                reason=Reason.REDIS_UNAVAILABLE,
            ) from exc
        used = int(value) if value is not None else 0
        if used < quota:
            return
        resets_at, retry_after = window.resets_at(), window.seconds_left(now)
        raise errors.ResourceExhausted(
            f"tenant {who.tenant!r} has used {used} of its {quota} tokens for the "
            f"{_period(window.period)} period; the quota resets at {resets_at} "
            f"(in {retry_after} s)",
            reason=Reason.QUOTA_EXHAUSTED,
            metadata={
                "tenant": who.tenant,
                "quota_tokens": str(quota),
                "used_tokens": str(used),
                "period_seconds": str(window.period),
                "resets_at": resets_at,
                "retry_after_seconds": str(retry_after),
            },
        )

    async def record(self, tokens: int) -> None:
        """Charge a returned model call's tokens to the current tenant's window.

        Never raises for Redis: the tokens are already spent, and failing the task now
        would throw away what they bought. The loss (an undercount) is logged.
        """
        who = principal.current()
        if tokens <= 0 or self.policy.limit_for(who) <= 0:
            return
        window = self.window()
        key = self.key(who.tenant, window)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incrby(key, tokens)
                # Two periods after the last write: past the window's end, so no one
                # reads it any more, whatever the clocks of the replicas say.
                pipe.expire(key, 2 * window.period)
                await pipe.execute()
        except _REDIS_DOWN as exc:
            log.warning(
                "could not count %d tokens against tenant %r's quota: %s",
                tokens,
                who.tenant,
                exc,
                extra={"tenant": who.tenant},
            )


def _period(seconds: int) -> str:
    """A period as people say it: `1-day`, `1-hour`, `90-second`."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            return f"{seconds // size}-{unit}"
    return f"{seconds}-second"
