"""Operators' console sessions and the limit on failed logins: plain data, no HTTP.

A session id is opaque and random; it stands for an operator token only inside the desk.
The token stays with the session so a token revoked from console_tokens_file ends every
session opened with it at the next request (TokenFile reads the file again on change).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

IDLE_SECONDS = 12 * 3600  # a shift; an idle console must log in again after it
MAX_SESSIONS = 1000  # a desk has a few operators: past this the least recently used go
FAILS_BURST = 5  # failed logins one address may make at once ...
FAILS_PER_SECOND = 1.0  # ... and then this many a second
MAX_ADDRESSES = 10_000  # addresses tracked by the limiter; a flood cannot grow it further


@dataclass
class Session:
    id: str
    operator: str
    token: str
    address: str
    created: float = field(default_factory=time.monotonic)
    seen: float = field(default_factory=time.monotonic)


class Sessions:
    def __init__(self, idle: float = IDLE_SECONDS) -> None:
        self.idle = idle
        self._by_id: dict[str, Session] = {}

    def open(self, operator: str, token: str, address: str) -> Session:
        self._expire()
        while len(self._by_id) >= MAX_SESSIONS:
            oldest = min(self._by_id.values(), key=lambda s: s.seen)
            del self._by_id[oldest.id]
        session = Session(secrets.token_urlsafe(32), operator, token, address)
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str, touch: bool = True) -> Session | None:
        """The live session, its idle clock restarted if `touch`; None if unknown or
        expired."""
        session = self._by_id.get(session_id) if session_id else None
        if session is None:
            return None
        now = time.monotonic()
        if now - session.seen > self.idle:
            del self._by_id[session.id]
            return None
        if touch:
            session.seen = now
        return session

    def close(self, session_id: str) -> Session | None:
        return self._by_id.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._by_id)

    def _expire(self) -> None:
        now = time.monotonic()
        for session in [s for s in self._by_id.values() if now - s.seen > self.idle]:
            del self._by_id[session.id]


class FailLimit:
    """A token bucket per client address, spent by failed logins: a few guesses a second
    at most, so guessing a 128-bit token stays hopeless even without the tokens' length."""

    def __init__(self, burst: int = FAILS_BURST, rate: float = FAILS_PER_SECOND) -> None:
        self.burst, self.rate = float(burst), rate
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)

    def _level(self, address: str, now: float) -> float:
        tokens, when = self._buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.rate)

    def allowed(self, address: str) -> bool:
        """May this address try to log in now?"""
        return self._level(address, time.monotonic()) >= 1.0

    def retry_after(self, address: str) -> float:
        return max(0.0, (1.0 - self._level(address, time.monotonic())) / self.rate)

    def failed(self, address: str) -> None:
        now = time.monotonic()
        if address not in self._buckets and len(self._buckets) >= MAX_ADDRESSES:
            # Forget addresses whose buckets are full again: they owe nothing.
            self._buckets = {a: b for a, b in self._buckets.items()
                             if self._level(a, now) < self.burst}
        self._buckets[address] = (self._level(address, now) - 1.0, now)
