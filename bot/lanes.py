"""Ordered lanes: work items that belong to someone (a Telegram user, a patient) handled as they come in,
each owner's one after the other and different owners' side by side.

The intake's consumer (:mod:`bot.inbox`) and the outbox sender (:mod:`bot.sender`) both read their work
from a table, over and over, while earlier items are still in hand. A round that waited for all of its
items before reading again made every new item wait for the slowest one in hand (measured: a patient's
answer waited 1.9 s for the bot with 30 patients writing at once). Here an item is started as soon as
a read sees it; what the lanes already hold, or finished since the read began, is not started twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
# work(item) -> True to go on with the owner's next item; False to stop the lane: the item and the
# owner's later ones stay in the table and are offered again after ``hold_s``
Work = Callable[[T], Awaitable[bool]]


class Lanes(Generic[T]):
    def __init__(self, work: Work[T], *, hold_s: float = 1.0):
        self.work = work
        self.hold_s = hold_s
        self._lanes: dict[Hashable, deque[tuple[Hashable, T]]] = {}
        self._known: set[Hashable] = set()  # item ids in a lane (waiting or at work)
        self._finished_since_read: set[Hashable] = set()
        self._held: dict[Hashable, float] = {}  # owner -> monotonic time their lane may start again
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_hand(self) -> int:
        return len(self._known)

    def reading(self) -> None:
        """Call just before reading the table: an item finished while the read runs may still be in what
        it returns, and :meth:`offer` must not start it again."""
        self._finished_since_read.clear()
        now = time.monotonic()
        self._held = {owner: until for owner, until in self._held.items() if until > now}

    def offer(self, owner: Hashable, ident: Hashable, item: T) -> bool:
        """Queue ``item`` behind ``owner``'s items in hand (starting their lane if none runs); False when
        it is already in hand, just finished, or its owner is held."""
        if ident in self._known or ident in self._finished_since_read:
            return False
        if self._held.get(owner, 0.0) > time.monotonic():
            return False
        self._held.pop(owner, None)
        self._known.add(ident)
        lane = self._lanes.get(owner)
        if lane is None:
            lane = self._lanes[owner] = deque()
            task = asyncio.get_running_loop().create_task(self._run(owner, lane))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        lane.append((ident, item))
        return True

    async def _run(self, owner: Hashable, lane: deque[tuple[Hashable, T]]) -> None:
        try:
            while lane:
                ident, item = lane[0]
                try:
                    go_on = await self.work(item)
                except Exception:  # noqa: BLE001 - work reports its own errors; this one stops the lane only
                    log.exception("unexpected error in a lane; its later items wait for a later read")
                    go_on = False
                lane.popleft()
                self._forget(ident)
                if not go_on:
                    self._held[owner] = time.monotonic() + self.hold_s
                    break
        finally:  # stopped, held or cancelled: what is left stays in the table for a later read
            while lane:
                self._forget(lane.popleft()[0])
            del self._lanes[owner]

    def _forget(self, ident: Hashable) -> None:
        self._known.discard(ident)
        self._finished_since_read.add(ident)

    async def drain(self) -> None:
        """Wait until every lane has stopped (nothing in hand)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        """Cancel the work in hand; those items stay in the table (a restart takes them up)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
