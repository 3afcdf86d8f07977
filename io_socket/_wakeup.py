"""How other threads reach the blocking driver's loop: a wake-up socket and a deque of calls.

The selector in server.py watches one end of a socket pair; ``Server.shutdown()``
(also from a signal handler) and ``Server.call_in_loop()`` send a byte on the
other, so a loop waiting in ``select`` returns at once. A call from another
thread waits in a deque until the loop runs it (``run_calls``), between two
engine calls; its caller gives up after a timeout, and a call given up is never run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["Wakeup"]

T = TypeVar("T")


class Wakeup:
    """The socket pair (``out`` is the end the loop reads) and the calls waiting for the loop."""

    def __init__(self) -> None:
        self._in, self.out = socket.socketpair()
        self._in.setblocking(False)  # a full pair means a wake-up is pending
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()

    def wake(self, why: bytes) -> None:
        """Make the loop's ``select`` return (safe from any thread or a signal handler)."""
        with contextlib.suppress(OSError):  # full: a wake-up is already pending
            self._in.send(why)

    def call(self, func: Callable[[], T], timeout: float) -> T:
        """From another thread: have the loop run ``func``, wait for its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.append((func, future))
        self.wake(b"c")
        try:
            return future.result(timeout)
        except TimeoutError:
            if future.cancel():
                raise TimeoutError(f"the driver loop did not answer within {timeout} s") from None
            return future.result()  # it started meanwhile: it is quick, take its answer

    def clear(self) -> None:
        """In the loop: read the wake-up bytes, so the socket is not ready again."""
        with contextlib.suppress(BlockingIOError):
            self.out.recv(4096)

    def run_calls(self) -> None:
        """In the loop: run the calls waiting, each answered through its future."""
        while self._calls:
            func, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = func()
            except Exception as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def close(self) -> None:
        self._in.close()
        self.out.close()
