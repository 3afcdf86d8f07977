"""io_anyio's engine input queue (io_anyio/_inputs.py), on asyncio and trio."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from io_anyio._inputs import InputQueue

BACKENDS = ["asyncio", "trio"]
WAIT = 5.0  # upper bound of every wait; never an assertion about speed


def run(backend: str, test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(WAIT):
            await test()

    anyio.run(bounded, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_in_first_out_up_to_the_bound(backend: str) -> None:
    async def test() -> None:
        queue: InputQueue[int] = InputQueue(3)
        for item in (1, 2, 3):
            queue.put_nowait(item)
        with pytest.raises(anyio.WouldBlock):
            queue.put_nowait(4)
        assert len(queue) == 3
        assert [await queue.get(), queue.get_nowait(), await queue.get()] == [1, 2, 3]
        with pytest.raises(anyio.WouldBlock):
            queue.get_nowait()

    run(backend, test)
    with pytest.raises(ValueError):
        InputQueue(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_get_waits_for_a_put_and_a_cancelled_get_loses_nothing(backend: str) -> None:
    async def test() -> None:
        queue: InputQueue[str] = InputQueue(4)
        with anyio.move_on_after(0.05) as scope:
            await queue.get()
        assert scope.cancelled_caught
        got: list[str] = []

        async def consume() -> None:
            got.append(await queue.get())

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(consume)
            await anyio.wait_all_tasks_blocked()
            queue.put_nowait("a")
        assert got == ["a"]
        # A get cancelled at its checkpoint, with an input waiting, leaves it queued.
        queue.put_nowait("b")
        with anyio.CancelScope() as cancelled:
            cancelled.cancel()
            await queue.get()
        assert queue.get_nowait() == "b"

    run(backend, test)


@pytest.mark.parametrize("backend", BACKENDS)
def test_put_waits_for_room_and_each_get_lets_one_producer_in(backend: str) -> None:
    async def test() -> None:
        queue: InputQueue[int] = InputQueue(1)
        queue.put_nowait(0)
        done: list[int] = []

        async def produce(item: int) -> None:
            await queue.put(item)
            done.append(item)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(produce, 1)
            tasks.start_soon(produce, 2)
            await anyio.wait_all_tasks_blocked()
            assert done == []
            assert queue.get_nowait() == 0  # room for one: a waiting producer is woken
            await anyio.wait_all_tasks_blocked()
            assert queue.get_nowait() in (1, 2)
            await anyio.wait_all_tasks_blocked()
            assert queue.get_nowait() in (1, 2)
        assert sorted(done) == [1, 2]

    run(backend, test)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_producer_cancelled_while_waiting_for_room_hands_the_wake_up_on(backend: str) -> None:
    async def test() -> None:
        queue: InputQueue[int] = InputQueue(1)
        queue.put_nowait(0)
        done: list[int] = []

        async def produce(item: int, scope: anyio.CancelScope) -> None:
            with scope:
                await queue.put(item)
                done.append(item)

        first, second = anyio.CancelScope(), anyio.CancelScope()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(produce, 1, first)
            await anyio.wait_all_tasks_blocked()
            tasks.start_soon(produce, 2, second)
            await anyio.wait_all_tasks_blocked()
            # Room for one, and the producer first in line is cancelled as it is woken:
            # either it takes its turn or hands it on; the other one must not wait for
            # ever (the task group would not end within WAIT).
            assert queue.get_nowait() == 0
            first.cancel()
            await anyio.wait_all_tasks_blocked()
            taken = [queue.get_nowait()]
            await anyio.wait_all_tasks_blocked()
            if len(queue):
                taken.append(queue.get_nowait())
        assert taken == done and done in ([2], [1, 2])

    run(backend, test)
