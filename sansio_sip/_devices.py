"""Credential sharing: one account used from several devices at once.

The guide (§3) asks customers not to share one account across devices in
parallel. Without registration bindings there is no list of devices, so
this module remembers, per account, the source addresses that registered
or called within the last ``interval`` seconds (the registration interval:
a device that is still there re-registers within it). A second address
seen while the first is still fresh is a second device.

A device is its source IP, not IP:port: a softphone behind NAT changes
ports when the NAT rebinds, and would otherwise look like two devices.
The price is that two phones behind one NAT look like one; that is the
honest limit of what a server can see. Bounded: ``capacity`` accounts
(least recently seen evicted) and ``per_account`` addresses each.
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["DeviceTracker"]


class DeviceTracker:
    def __init__(self, *, interval: float, capacity: int = 100_000, per_account: int = 8) -> None:
        self.interval = interval
        self.capacity = capacity
        self.per_account = per_account
        self._seen: OrderedDict[str, dict[str, float]] = OrderedDict()

    def others(self, username: str, ip: str, *, now: float) -> list[str]:
        """Other addresses that used ``username`` within the interval."""
        sources = self._seen.get(username)
        if not sources:
            return []
        return [other for other, at in sources.items() if other != ip and now - at <= self.interval]

    def seen(self, username: str, ip: str, *, now: float) -> list[str]:
        """Record a use of ``username`` from ``ip``; returns the other live addresses."""
        sources = self._seen.get(username)
        if sources is None:
            sources = self._seen[username] = {}
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(username)
        for other, at in list(sources.items()):
            if now - at > self.interval:
                del sources[other]
        sources[ip] = now
        if len(sources) > self.per_account:
            oldest = min(sources, key=sources.__getitem__)
            del sources[oldest]
        return [other for other in sources if other != ip]

    def forget(self, username: str, ip: str) -> None:
        """The device at ``ip`` unregistered."""
        sources = self._seen.get(username)
        if sources is not None:
            sources.pop(ip, None)

    def shared(self, *, now: float) -> list[tuple[str, tuple[str, ...]]]:
        """Accounts in use from more than one address now, with those addresses."""
        out: list[tuple[str, tuple[str, ...]]] = []
        for username, sources in self._seen.items():
            live = tuple(sorted(ip for ip, at in sources.items() if now - at <= self.interval))
            if len(live) > 1:
                out.append((username, live))
        return out

    def __len__(self) -> int:
        return len(self._seen)
