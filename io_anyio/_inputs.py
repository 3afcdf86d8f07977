"""The engine's input queue: bounded, many producers, one consumer (the loop).

What anyio's memory object stream did for the driver, at a fraction of the
cost per input: its ``receive`` built a task-info object and a generic item
holder on every wait (``get_current_task``, ``MemoryObjectItemReceiver[T]()``),
12 % of the server's CPU per OPTIONS when each datagram wakes the loop on its
own (py-spy, bench/calls.py's pace). Here an input is a deque append, and a
wait is one ``anyio.Event``.

Semantics kept: ``put_nowait`` raises ``anyio.WouldBlock`` at the bound (the
UDP reader drops and counts); ``put`` waits for room (TCP reads, back-end
results: back-pressure, never an unbounded queue); ``get`` is a checkpoint
even when an input is waiting, so the loop lets the other tasks run between
two batches, and a cancelled ``get`` (the timer's deadline) loses nothing: an
input stays queued until ``get_nowait`` takes it.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

__all__ = ["InputQueue"]

T = TypeVar("T")


class InputQueue(Generic[T]):
    """A bounded FIFO of ``bound`` items for one consumer task."""

    def __init__(self, bound: int) -> None:
        if bound < 1:
            raise ValueError("the bound must be at least 1")
        self._items: deque[T] = deque()
        self._bound = bound
        self._ready: anyio.Event | None = None  # the consumer waits for an item
        self._room: deque[anyio.Event] = deque()  # producers wait for room

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: T) -> None:
        """Queue ``item``; raises ``anyio.WouldBlock`` when the queue is full."""
        if len(self._items) >= self._bound:
            raise anyio.WouldBlock
        self._items.append(item)
        ready = self._ready
        if ready is not None:
            self._ready = None
            ready.set()

    async def put(self, item: T) -> None:
        """Queue ``item``, waiting for room (a checkpoint, as a stream's send is)."""
        await anyio.lowlevel.checkpoint()
        while len(self._items) >= self._bound:
            room = anyio.Event()
            self._room.append(room)
            try:
                await room.wait()
            except BaseException:
                if room in self._room:
                    self._room.remove(room)
                elif len(self._items) < self._bound:
                    self._wake_producer()  # it was woken for room it will not use
                raise
        self.put_nowait(item)

    def get_nowait(self) -> T:
        """The oldest item; raises ``anyio.WouldBlock`` when there is none."""
        if not self._items:
            raise anyio.WouldBlock
        item = self._items.popleft()
        if self._room:
            self._wake_producer()
        return item

    async def get(self) -> T:
        """The oldest item, waiting for one (always a checkpoint; cancellable)."""
        if self._items:
            await anyio.lowlevel.checkpoint()
        while not self._items:
            ready = self._ready = anyio.Event()
            await ready.wait()
        return self.get_nowait()

    def _wake_producer(self) -> None:
        self._room.popleft().set()
