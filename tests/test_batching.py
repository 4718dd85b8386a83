"""Micro-batching (inference.engines.batching): concurrent cases share a model call, each gets its own
results, a bad case costs no other case its result, and model calls never overlap."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from inference.engines.batching import MicroBatcher, Serialised


class Model:
    """Squares numbers; refuses negative ones; records every call and how many ran at once."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.calls: list[list[int]] = []
        self.running = 0
        self.most_at_once = 0
        self.seconds = seconds
        self._lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self._lock:
            self.calls.append(list(items))
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self._lock:
            self.running -= 1
        if any(i < 0 for i in items):
            raise ValueError("negative")
        return [i * i for i in items]


def _together(batcher: MicroBatcher, inputs: list[list[int]]) -> list[object]:
    """Every input from its own thread, all released at once; each thread's result or exception."""
    start = threading.Barrier(len(inputs))

    def one(items: list[int]) -> object:
        start.wait()
        try:
            return batcher(items)
        except Exception as exc:  # noqa: BLE001 - returned for the assertions
            return exc

    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(one, inputs))


def test_callers_within_the_window_share_one_call_and_each_gets_its_own_results() -> None:
    model = Model()
    batcher = MicroBatcher(model, window_s=0.5)
    inputs = [[1, 2], [3], [4, 5, 6], [7]]
    assert _together(batcher, inputs) == [[1, 4], [9], [16, 25, 36], [49]]
    assert len(model.calls) == 1 and sorted(model.calls[0]) == [1, 2, 3, 4, 5, 6, 7]
    assert batcher.batches == [7]


def test_one_bad_case_costs_no_other_case_its_result() -> None:
    model = Model()
    results = _together(MicroBatcher(model, window_s=0.5), [[1], [-1, 2], [3]])
    assert results[0] == [1] and results[2] == [9]
    assert isinstance(results[1], ValueError)
    assert len(model.calls) == 4  # the shared call failed, then each case alone


def test_a_full_batch_goes_without_waiting_for_the_window() -> None:
    model = Model(seconds=0.0)
    batcher = MicroBatcher(model, window_s=30.0, max_items=4)
    started = time.monotonic()
    assert _together(batcher, [[1, 2], [3, 4]]) == [[1, 4], [9, 16]]
    assert time.monotonic() - started < 15  # far below the 30-second window


def test_a_lone_caller_is_served_after_the_window_and_calls_never_overlap() -> None:
    model = Model(seconds=0.02)
    batcher = MicroBatcher(model, window_s=0.01)
    assert batcher([5]) == [25]
    # many callers arriving over time: several batches, one model call at a time
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(batcher, [i]) for i in range(40)]
        assert [f.result() for f in futures] == [[i * i] for i in range(40)]
    assert model.most_at_once == 1
    assert sum(len(c) for c in model.calls) == 41 and len(model.calls) < 41


def test_a_serialised_engine_passes_attributes_and_locks_its_calls() -> None:
    lock = threading.RLock()

    class Engine:
        model_id = "tiny"

        def generate(self) -> bool:
            return lock._is_owned()  # type: ignore[attr-defined]  # held while the call runs

    engine = Serialised(Engine(), lock)
    assert engine.model_id == "tiny" and engine.generate() is True
    with pytest.raises(AttributeError):
        engine.missing  # noqa: B018
