"""Rate limits: per-source token buckets and a global ceiling, and log lines.

Modelled on chrony's ``ratelimit``: each source address has a token bucket
(``rate`` tokens a second, up to ``burst``); the table of sources is bounded
(the least recently seen source is forgotten first), so a flood from spoofed
addresses costs a fixed amount of memory; and a source over its limit still
gets one request in ``leak`` through, so a spoofer who floods in a victim's
name cannot cut the victim off completely.  A global bucket caps what the whole
service answers.

Everything takes ``now`` from an injected clock, so tests drive it with
:class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import enum
import random
from collections import OrderedDict
from collections.abc import Hashable
from typing import Protocol

import attrs


class Clock(Protocol):
    def seconds(self) -> float: ...


@attrs.define
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` tokens a second."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate=rate, burst=burst, tokens=burst, updated=now)

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are enough; report whether it did."""
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class Verdict(enum.Enum):
    """What a limiter decided about one request."""

    ALLOW = "allow"
    #: Over the source's limit, but let through by the leak.
    LEAK = "leak"
    #: Over the source's limit.
    SOURCE_LIMIT = "source-limit"
    #: Over the whole service's limit.
    GLOBAL_LIMIT = "global-limit"

    @property
    def allowed(self) -> bool:
        return self in (Verdict.ALLOW, Verdict.LEAK)


@attrs.define
class RateLimiter:
    """Per-source buckets in a bounded table, a leak, and a global ceiling.

    ``rate``/``burst``: per source.  ``global_rate``: requests a second for the
    whole service (its burst is one second's worth); 0 turns it off.
    ``max_sources``: how many sources are remembered.  ``leak``: a limited
    source still gets one request in ``leak`` through (0: never).
    """

    clock: Clock
    rate: float
    burst: float
    max_sources: int
    global_rate: float = 0.0
    leak: int = 0
    random: random.Random = attrs.field(factory=random.Random)
    _sources: OrderedDict[Hashable, TokenBucket] = attrs.field(
        init=False, factory=OrderedDict
    )
    _global: TokenBucket | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.reconfigure(
            self.rate, self.burst, self.max_sources, self.global_rate, self.leak
        )

    def reconfigure(
        self,
        rate: float,
        burst: float,
        max_sources: int,
        global_rate: float = 0.0,
        leak: int = 0,
    ) -> None:
        """Take new limits; buckets already in the table keep their tokens."""
        self.rate, self.burst, self.leak = rate, burst, leak
        self.max_sources = max_sources
        for bucket in self._sources.values():
            bucket.rate, bucket.burst = rate, burst
            bucket.tokens = min(bucket.tokens, burst)
        while len(self._sources) > max_sources:
            self._sources.popitem(last=False)
        self.global_rate = global_rate
        if global_rate > 0:
            self._global = TokenBucket.full(
                global_rate, global_rate, self.clock.seconds()
            )
        else:
            self._global = None

    def __len__(self) -> int:
        """How many sources are remembered."""
        return len(self._sources)

    def check(self, source: Hashable, cost: float = 1.0) -> Verdict:
        """Account for one request from ``source`` and decide on it."""
        now = self.clock.seconds()
        bucket = self._sources.get(source)
        if bucket is None:
            if len(self._sources) >= self.max_sources:
                self._sources.popitem(last=False)
            bucket = self._sources[source] = TokenBucket.full(
                self.rate, self.burst, now
            )
        else:
            self._sources.move_to_end(source)
        if bucket.take(now, cost):
            verdict = Verdict.ALLOW
        elif self.leak and self.random.randrange(self.leak) == 0:
            verdict = Verdict.LEAK
        else:
            return Verdict.SOURCE_LIMIT
        if self._global is not None and not self._global.take(now, cost):
            return Verdict.GLOBAL_LIMIT
        return verdict


@attrs.define
class LogThrottle:
    """One kind of log line: a burst of ``burst``, then ``rate`` lines a second.

    Anyone who can reach a port can make the daemon refuse connections or
    fail authentications as fast as they can open them; one warning each
    would turn that flood into a flood of log lines (and disk).  Each line
    that gets through says how many like it were held back since the last.
    """

    clock: Clock
    rate: float = 1.0
    burst: float = 20.0
    #: Lines held back since the last one let through.
    held: int = 0
    _bucket: TokenBucket | None = attrs.field(init=False, default=None)

    def admit(self) -> int | None:
        """None: do not log this line.  Otherwise log it, saying that this
        many like it were held back before it."""
        now = self.clock.seconds()
        if self._bucket is None:
            self._bucket = TokenBucket.full(self.rate, self.burst, now)
        if not self._bucket.take(now):
            self.held += 1
            return None
        held, self.held = self.held, 0
        return held
