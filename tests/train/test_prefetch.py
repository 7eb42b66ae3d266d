"""Batches made ahead in a thread arrive in order; errors arrive where they happened."""

from __future__ import annotations

import threading
import time

import pytest

from voxtune.train.prefetch import prefetch


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_items_arrive_in_order(depth):
    assert list(prefetch(iter(range(20)), depth)) == list(range(20))


def test_an_error_is_raised_at_its_item():
    def items():
        yield 1
        yield 2
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetch(items(), 2):
            got.append(item)
    assert got == [1, 2]


def test_work_runs_ahead_and_closing_stops_the_worker():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    stream = prefetch(items(), 2)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(made) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(made) >= 3  # made ahead while the consumer did nothing
    stream.close()
    assert not any(t.name == "voxtune-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 5  # stopped, not run to the end
