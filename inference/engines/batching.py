"""Micro-batching: the model calls of concurrent cases served by one forward pass.

A worker in batching mode (``SKINBRIDGE_BATCH_WINDOW_MS`` > 0) runs several tasks at once in threads
(see skinbridge.cli.worker). Each case's task stays its own: its transaction, retries, lease and audit
are untouched; only the model call is shared. The first caller to arrive opens a window of
``window_s``; every caller arriving within it (or until ``max_items`` photos wait) joins, and the
photos of all of them go through the model in one call. Each caller gets back exactly its own
results, in its own order. Should the shared call fail, each caller's photos are run again on their
own, so one bad case costs no other case its result.

A model serves one call at a time (``lock``): the batch runs under the classifier's, and the other
models of the process (the explainer, the VLM) take their own through :class:`Serialised`, so one
case's analysis never waits for another case's pictures. While one batch runs, the next window fills.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Call(Generic[T, R]):
    items: Sequence[T]
    done: threading.Event = field(default_factory=threading.Event)
    results: list[R] | None = None
    error: BaseException | None = None


class MicroBatcher(Generic[T, R]):
    """``batcher(items) -> results``: like ``run(items)``, but shared with the concurrent callers."""

    def __init__(self, run: Callable[[list[T]], list[R]], window_s: float, max_items: int = 64,
                 lock: threading.RLock | None = None) -> None:
        self.run = run
        self.window_s = window_s
        self.max_items = max_items
        self.lock = lock or threading.RLock()
        self._state = threading.Condition()
        self._waiting: list[_Call[T, R]] = []
        self._count = 0
        self._leader = False  # a caller is collecting the next batch
        self.batches: list[int] = []  # photos per shared call, most recent last (kept short)

    def __call__(self, items: Sequence[T]) -> list[R]:
        call: _Call[T, R] = _Call(list(items))
        with self._state:
            self._waiting.append(call)
            self._count += len(call.items)
            lead = not self._leader
            self._leader = True
            self._state.notify_all()
        if lead:
            with self._state:  # the window: until it closes or enough photos wait
                self._state.wait_for(lambda: self._count >= self.max_items, timeout=self.window_s)
            with self.lock:  # the previous batch may still run; whoever arrives meanwhile joins this one
                with self._state:
                    batch, self._waiting, self._count, self._leader = self._waiting, [], 0, False
                self._serve(batch)
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.results is not None
        return call.results

    def _serve(self, batch: list[_Call[T, R]]) -> None:
        flat = [item for call in batch for item in call.items]
        self.batches = [*self.batches[-99:], len(flat)]
        try:
            results = self.run(flat)
            if len(results) != len(flat):
                raise RuntimeError(f"the model returned {len(results)} results for {len(flat)} inputs")
        except BaseException as exc:  # noqa: BLE001 - handed to the callers below
            if len(batch) == 1:
                batch[0].error = exc
                batch[0].done.set()
                return
            for call in batch:  # one bad case must not cost the others their result
                try:
                    call.results = list(self.run(list(call.items)))
                except BaseException as own:  # noqa: BLE001 - this caller's own failure
                    call.error = own
                call.done.set()
            return
        start = 0
        for call in batch:
            call.results = list(results[start : start + len(call.items)])
            start += len(call.items)
            call.done.set()


class Serialised:
    """An engine whose method calls take the process's model lock (threads must not share a model at
    once: samplers keep state, GPUs run one model call at a time anyway). Attributes pass through."""

    def __init__(self, engine: Any, lock: threading.RLock) -> None:
        self._engine = engine
        self._lock = lock

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._engine, name)
        if not callable(value):
            return value

        def locked(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return value(*args, **kwargs)

        return locked


class BatchedClassifier(Serialised):
    """The classifier of a batching worker: ``predict(photos)`` of concurrent cases shares one forward
    pass (each photo's type read from it, as without batching); every prediction records how many
    photos its pass held (``timings["batch_photos"]``)."""

    def __init__(self, engine: Any, lock: threading.RLock, window_s: float, max_items: int) -> None:
        super().__init__(engine, lock)

        def run(photos: list[Any]) -> list[Any]:
            import dataclasses

            return [dataclasses.replace(p, timings={**p.timings, "batch_photos": len(photos)})
                    for p in engine.predict(photos)]

        self.batcher: MicroBatcher[Any, Any] = MicroBatcher(run, window_s, max_items, lock)

    def predict(self, images: list[Any], image_type: str | None = None, *, saliency: bool = True) -> list[Any]:
        if image_type is not None or not saliency:  # not what the pipeline asks: served alone
            with self._lock:
                return self._engine.predict(images, image_type, saliency=saliency)
        return self.batcher(images)
