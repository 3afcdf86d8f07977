"""TimerQueue: deadlines by (owner, RFC letter), lazy-deletion heap."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sansio_sip._timers import _COMPACT_SLACK, TimerName, TimerQueue


def test_arm_replaces_and_cancel_forgets() -> None:
    queue: TimerQueue[str] = TimerQueue()
    queue.arm("t1", TimerName.A, 5.0)
    queue.arm("t1", TimerName.A, 2.0)  # re-arming replaces, even to an earlier deadline
    queue.arm("t1", TimerName.B, 32.0)
    queue.arm("t2", TimerName.E, 3.0)
    assert queue.deadlines("t1") == {TimerName.A: 2.0, TimerName.B: 32.0}
    assert queue.deadline("t2", TimerName.E) == 3.0 and queue.deadline("t2", TimerName.F) is None
    assert len(queue) == 3 and queue.next_deadline() == 2.0
    queue.cancel("t1", TimerName.A)
    assert queue.next_deadline() == 3.0
    queue.cancel_all("t2")
    assert queue.next_deadline() == 32.0 and len(queue) == 1
    assert queue.pop_due(31.9) is None
    assert queue.pop_due(32.0) == ("t1", TimerName.B, 32.0)
    assert queue.next_deadline() is None and queue.pop_due(1e9) is None


def test_equal_deadlines_fire_in_arming_order() -> None:
    queue: TimerQueue[str] = TimerQueue()
    for owner in ("c", "a", "b"):
        queue.arm(owner, TimerName.K, 1.0)
    assert [queue.pop_due(1.0) for _ in range(3)] == [
        ("c", TimerName.K, 1.0),
        ("a", TimerName.K, 1.0),
        ("b", TimerName.K, 1.0),
    ]


def test_stale_entries_stay_bounded() -> None:
    # An attacker-driven churn of re-arms must not grow the heap without bound.
    queue: TimerQueue[int] = TimerQueue()
    for n in range(10_000):
        queue.arm(n % 10, TimerName.G, float(n))
    assert len(queue) == 10
    assert len(queue._heap) <= 2 * len(queue) + _COMPACT_SLACK + 1
    assert queue.next_deadline() == 9990.0


_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("arm"),
            st.integers(0, 4),
            st.sampled_from(list(TimerName)),
            st.floats(0, 100, allow_nan=False),
        ),
        st.tuples(st.just("cancel"), st.integers(0, 4), st.sampled_from(list(TimerName))),
        st.tuples(st.just("cancel_all"), st.integers(0, 4)),
        st.tuples(st.just("pop"), st.floats(0, 100, allow_nan=False)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(_ops)
def test_queue_agrees_with_a_dict_model(ops: list[tuple[object, ...]]) -> None:
    queue: TimerQueue[int] = TimerQueue()
    model: dict[tuple[int, TimerName], float] = {}
    for op in ops:
        if op[0] == "arm":
            _, owner, name, deadline = op
            queue.arm(owner, name, deadline)  # type: ignore[arg-type]
            model[(owner, name)] = deadline  # type: ignore[index]
        elif op[0] == "cancel":
            _, owner, name = op
            queue.cancel(owner, name)  # type: ignore[arg-type]
            model.pop((owner, name), None)  # type: ignore[arg-type]
        elif op[0] == "cancel_all":
            for key in [k for k in model if k[0] == op[1]]:
                del model[key]
            queue.cancel_all(op[1])  # type: ignore[arg-type]
        else:
            now = op[1]
            popped = queue.pop_due(now)  # type: ignore[arg-type]
            due = [d for d in model.values() if d <= now]  # type: ignore[operator]
            if not due:
                assert popped is None
            else:
                assert popped is not None
                owner, name, deadline = popped
                assert deadline == min(due) == model.pop((owner, name))
        # next_deadline is the minimum over live deadlines, always.
        assert queue.next_deadline() == (min(model.values()) if model else None)
        assert len(queue) == len(model)
