"""Brute-force and scanner protection: who gets answered, and how fast.

A digest-authenticated edge on a public address is probed from its first
minute (sipvicious svwar/svcrack, friendly-scanner). This module decides,
from counts the engine reports, three things:

* **Per-source bans.** ``failures`` authentication failures (wrong password,
  unknown user, source not allowed) from one IP within ``window`` seconds ban
  that IP for ``ban_time``: everything it sends is dropped and counted. A
  ban is per source, so an attacker guessing an account's password can never
  lock the account's owner out: the owner connects from another address.
* **Per-username slow-down.** Failures for one username, from anywhere,
  beyond ``user_failures`` in the window delay the *failure* answers for that
  username (doubling up to ``max_delay``). Successful logins are never
  delayed, so again the owner is not locked out; a serial guesser slows to a
  crawl, and a parallel one is caught by the per-source ban.
* **Scanners by User-Agent** (off by default): requests whose User-Agent
  contains a known scanner signature are dropped without an answer.

One mistyped password (or ten) costs a legitimate user nothing: the default
threshold of 10 failures a minute is far above what a person produces and
far below what a cracker needs (RFC-style guessing at one try a second would
take the lifetime of the universe to find a 10-character password anyway).

Every table is bounded (DESIGN §7): at ``capacity`` entries the oldest entry
is evicted. An attacker spraying from many addresses can evict old counters;
that costs them nothing they did not already have, and never costs memory.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TypeVar

import attrs

_V = TypeVar("_V")

__all__ = ["KNOWN_SCANNERS", "Guard", "GuardConfig"]

KNOWN_SCANNERS: tuple[str, ...] = (
    "friendly-scanner",
    "sipvicious",
    "sipcli",
    "sip-scan",
    "sipsak",
    "vaxsipuseragent",
    "pplsip",
    "iWar",
    "smap",
    "sundayddr",
)
"""Lower-cased substrings of User-Agent values sent by common SIP scanners.
``sipsak`` is a legitimate diagnostic tool too, which is why dropping by
User-Agent is off unless the operator turns it on."""


@attrs.frozen(kw_only=True)
class GuardConfig:
    """The guard's tunables (defaults reasoned in the module docstring):
    ``failures`` authentication failures from one IP within ``window``
    seconds ban it for ``ban_time`` seconds; past ``user_failures`` failures
    in the window for one username, its failure answers wait ``base_delay``
    seconds, doubling up to ``max_delay``; each table holds at most
    ``capacity`` entries; ``drop_scanners`` drops requests whose User-Agent
    contains one of ``scanners``."""

    failures: int = 10
    window: float = 60.0
    ban_time: float = 600.0
    user_failures: int = 5
    base_delay: float = 0.5
    max_delay: float = 8.0
    capacity: int = 100_000
    drop_scanners: bool = False
    scanners: tuple[str, ...] = KNOWN_SCANNERS


class Guard:
    """The state behind the decisions; every method takes the time (``now``)."""

    def __init__(self, config: GuardConfig) -> None:
        self.config = config
        self._source_failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._user_failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._bans: OrderedDict[str, float] = OrderedDict()
        self._scanners = tuple(s.lower() for s in config.scanners)

    # ------------------------------------------------------------- decisions

    def banned(self, ip: str, *, now: float) -> bool:
        """True while ``ip`` is banned (expired bans are forgotten here)."""
        until = self._bans.get(ip)
        if until is None:
            return False
        if until <= now:
            del self._bans[ip]
            return False
        return True

    def is_scanner(self, user_agent: str | None) -> bool:
        """True for a scanner's User-Agent when dropping scanners is enabled."""
        if not self.config.drop_scanners or not user_agent:
            return False
        lowered = user_agent.lower()
        return any(signature in lowered for signature in self._scanners)

    def failure(self, ip: str, username: str | None, *, now: float) -> tuple[bool, float]:
        """Record an authentication failure. Returns (the source is now
        banned, seconds to delay this failure answer)."""
        self._expire(now)
        newly_banned = False
        if self._count(self._source_failures, ip, self.config.failures, now):
            self._remember(self._bans, ip, now + self.config.ban_time)
            self._source_failures.pop(ip, None)
            newly_banned = True
        delay = 0.0
        if username:
            recent = self._recent(self._user_failures, username, now)
            excess = recent - self.config.user_failures
            if excess > 0:
                delay = min(self.config.max_delay, self.config.base_delay * 2 ** (excess - 1))
        return newly_banned, delay

    # ------------------------------------------------------------ operations

    def bans(self, *, now: float) -> list[tuple[str, float]]:
        """The live bans as (ip, seconds left), longest first."""
        live = [(ip, until - now) for ip, until in self._bans.items() if until > now]
        return sorted(live, key=lambda item: -item[1])

    def clear(self, ip: str | None = None) -> int:
        """Lift one ban (or all when ``ip`` is None); returns how many were lifted."""
        if ip is None:
            count = len(self._bans)
            self._bans.clear()
            self._source_failures.clear()
            return count
        self._source_failures.pop(ip, None)
        return 1 if self._bans.pop(ip, None) is not None else 0

    def __len__(self) -> int:
        """Entries held in all tables (for the bounded-memory checks)."""
        return len(self._bans) + len(self._source_failures) + len(self._user_failures)

    # --------------------------------------------------------------- helpers

    def _count(
        self, table: OrderedDict[str, deque[float]], key: str, limit: int, now: float
    ) -> bool:
        """Add a failure; True when ``limit`` failures fall within the window."""
        times = table.get(key)
        if times is None:
            times = deque(maxlen=max(1, limit))
            self._remember(table, key, times)
        else:
            table.move_to_end(key)
        times.append(now)
        return len(times) >= limit and now - times[0] <= self.config.window

    def _recent(self, table: OrderedDict[str, deque[float]], key: str, now: float) -> int:
        """Add a failure for ``key``; how many fall within the window."""
        times = table.get(key)
        if times is None:
            times = deque(maxlen=64)
            self._remember(table, key, times)
        else:
            table.move_to_end(key)
        times.append(now)
        while times and now - times[0] > self.config.window:
            times.popleft()
        return len(times)

    def _expire(self, now: float) -> None:
        """Forget what can no longer count: failure lists whose newest failure
        left the window, and bans that ran out. The failure tables are in
        order of last failure and the bans in order of expiry (one ban time for
        all), so this looks only at the front: a spray from many one-off
        addresses leaves at most one window's worth of entries, not one per
        address for ever."""
        horizon = now - self.config.window
        for table in (self._source_failures, self._user_failures):
            while table:
                times = next(iter(table.values()))
                if times and times[-1] >= horizon:
                    break
                table.popitem(last=False)
        bans = self._bans
        while bans and next(iter(bans.values())) <= now:
            bans.popitem(last=False)

    def _remember(self, table: OrderedDict[str, _V], key: str, value: _V) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.config.capacity:
            table.popitem(last=False)
