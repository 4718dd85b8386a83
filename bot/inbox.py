"""Durable intake: every Telegram update is written to the clinic database before Telegram hears that
it arrived, and handled from there.

Telegram forgets an update once the bot confirms it (the next ``getUpdates`` with a higher offset, or
a 200 answer to a webhook call). python-telegram-bot's own updater confirms on fetch, before handling,
so a bot killed mid-way lost every message in flight. Here:

1. intake (:func:`poll` or the webhook in :mod:`bot.webhook`) seals each update with the system data
   key, inserts it into ``bot_inbox`` keyed by ``update_id`` (a re-delivered id is ignored) and commits;
   only then is the update confirmed (next poll's offset / the webhook's 200);
2. :class:`Consumer` hands the pending rows to the application as they arrive, each user's oldest
   first and several users side by side, and marks each one done, dropping its payload. A bot killed before
   that replays the row on restart; the handlers are written so a replay of an interrupted update has
   the effect of one (they check the case's state).

A user over the per-user rate limit is not dropped: their updates stay pending and are handled when
the window allows, and they are told once that their messages will be answered in a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from telegram import Bot, Update
from telegram.error import Conflict, NetworkError, RetryAfter, TimedOut

from bot.lanes import Lanes
from clinic_db.db import Clinic
from clinic_db.models import InboxUpdate, utcnow
from clinic_db.vault import SYSTEM_KEY_ID

log = logging.getLogger(__name__)

RETENTION = timedelta(days=7)  # Telegram never re-delivers an update this late
MAX_ATTEMPTS = 5  # an update whose handling keeps failing is parked as "failed" after this many tries
POLL_TIMEOUT_S = 10


@dataclass(frozen=True)
class Pending:
    update_id: int
    payload: dict[str, Any]
    attempts: int

    @property
    def user_id(self) -> int | None:
        for kind in ("message", "edited_message", "callback_query", "my_chat_member", "inline_query"):
            part = self.payload.get(kind)
            if isinstance(part, dict) and isinstance(part.get("from"), dict):
                return part["from"].get("id")
        return None


class Inbox:
    """The ``bot_inbox`` table. Each method is one short transaction (SQLite-friendly)."""

    def __init__(self, clinic: Clinic):
        self.clinic = clinic

    def _seal(self, session: Any, update_id: int, payload: dict[str, Any]) -> bytes:
        data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self.clinic.vault.seal_for(session, SYSTEM_KEY_ID, "bot_inbox", str(update_id), "payload", data)

    def store(self, payloads: Iterable[dict[str, Any]]) -> int:
        """Write updates that are not there yet; returns how many were new. Commits before returning."""
        items = {int(p["update_id"]): p for p in payloads}
        if not items:
            return 0
        with self.clinic.session() as session:
            known = set(session.scalars(select(InboxUpdate.update_id).where(InboxUpdate.update_id.in_(items))))
            new = [uid for uid in sorted(items) if uid not in known]
            for uid in new:
                session.add(InboxUpdate(update_id=uid, status="pending", payload_enc=self._seal(session, uid, items[uid])))
            try:
                session.commit()
            except IntegrityError:  # a second intake (webhook retry) stored one meanwhile: store one by one
                session.rollback()
                return sum(self.store([items[uid]]) for uid in new) if len(new) > 1 else 0
        return len(new)

    def next_offset(self) -> int:
        """The offset that confirms everything stored (0 when the inbox is empty)."""
        with self.clinic.session() as session:
            top = session.scalar(select(func.max(InboxUpdate.update_id)))
        return 0 if top is None else int(top) + 1

    def pending(self, limit: int = 100) -> list[Pending]:
        with self.clinic.session() as session:
            rows = session.scalars(
                select(InboxUpdate).where(InboxUpdate.status == "pending").order_by(InboxUpdate.update_id).limit(limit)
            ).all()
            out = []
            for row in rows:
                raw = self.clinic.vault.open_for(session, SYSTEM_KEY_ID, "bot_inbox", str(row.update_id), "payload",
                                                 row.payload_enc or b"")
                out.append(Pending(row.update_id, json.loads(raw), row.attempts))
            return out

    def done(self, update_id: int) -> None:
        with self.clinic.session() as session:
            row = session.get(InboxUpdate, update_id)
            if row is not None:
                row.status, row.payload_enc, row.handled_at = "done", None, utcnow()
                session.commit()

    def failed_attempt(self, update_id: int, error: str) -> bool:
        """Count a failed try; returns True when the update is parked (too many tries, payload dropped)."""
        with self.clinic.session() as session:
            row = session.get(InboxUpdate, update_id)
            if row is None:
                return True
            row.attempts += 1
            row.last_error = error[:200]
            parked = row.attempts >= MAX_ATTEMPTS
            if parked:
                row.status, row.payload_enc, row.handled_at = "failed", None, utcnow()
            session.commit()
            return parked

    def prune(self) -> int:
        with self.clinic.session() as session:
            result = session.execute(delete(InboxUpdate).where(
                InboxUpdate.status != "pending", InboxUpdate.received_at < utcnow() - RETENTION
            ))
            session.commit()
            return result.rowcount or 0

    def counts(self) -> dict[str, int]:
        with self.clinic.session() as session:
            return dict(session.execute(select(InboxUpdate.status, func.count()).group_by(InboxUpdate.status)).all())


# --- intake by long polling ---------------------------------------------------------------------------
async def poll(bot: Bot, inbox: Inbox, wake: asyncio.Event, stop: asyncio.Event,
               allowed_updates: list[str] | None = None) -> None:
    """Fetch updates and store them; the offset that confirms them is only sent after the commit."""
    offset = await asyncio.to_thread(inbox.next_offset)
    backoff = 1.0
    while not stop.is_set():
        try:
            updates = await bot.get_updates(offset=offset, timeout=POLL_TIMEOUT_S, allowed_updates=allowed_updates)
        except RetryAfter as exc:
            await _sleep(stop, float(exc.retry_after if isinstance(exc.retry_after, (int, float))
                                     else exc.retry_after.total_seconds()))
            continue
        except (TimedOut, NetworkError, Conflict) as exc:
            log.warning("getUpdates failed (%s); retrying in %.0f s", type(exc).__name__, backoff)
            await _sleep(stop, backoff)
            backoff = min(30.0, backoff * 2)
            continue
        backoff = 1.0
        if not updates:
            continue
        payloads = [u.to_dict() for u in updates]
        while not stop.is_set():
            try:
                await asyncio.to_thread(inbox.store, payloads)
                break
            except Exception:  # noqa: BLE001 - the database is down or locked: keep the updates unconfirmed
                ref = secrets.token_hex(4).upper()
                log.exception("error %s storing %d updates; they stay unconfirmed and are fetched again", ref,
                              len(payloads))
                await _sleep(stop, backoff)
                backoff = min(30.0, backoff * 2)
        else:
            return
        offset = max(u.update_id for u in updates) + 1
        wake.set()


async def _sleep(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


# --- handling -----------------------------------------------------------------------------------------
Handle = Callable[[Update, int], Awaitable[None]]  # (update, earlier failed tries)
Admit = Callable[[Update], Awaitable[bool]]
Exclusive = Callable[[Update], Awaitable[bool]]


class Gate:
    """Up to ``limit`` updates in handling at once; an exclusive one waits for the others to finish and
    runs alone (new ones wait behind it).

    Handlers do their database work in short synchronous transactions on the event loop, committed
    before they await Telegram, so two users' handlers interleave safely. The dermatologists'
    handlers keep a session open across their replies: they run alone, so no other handler can block
    the loop on a lock they hold."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self._running = 0
        self._alone = False
        self._waiting_alone = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def enter(self, alone: bool) -> AsyncIterator[None]:
        async with self._changed:
            if alone:
                self._waiting_alone += 1
                try:
                    await self._changed.wait_for(lambda: not self._alone and self._running == 0)
                finally:
                    self._waiting_alone -= 1
                self._alone = True
            else:
                await self._changed.wait_for(
                    lambda: not self._alone and not self._waiting_alone and self._running < self.limit)
            self._running += 1
        try:
            yield
        finally:
            async with self._changed:
                self._running -= 1
                if alone:
                    self._alone = False
                self._changed.notify_all()


async def _never_exclusive(update: Update) -> bool:
    return False


class Consumer:
    """Hands pending updates to the application as they arrive (:class:`bot.lanes.Lanes`).

    Each user's updates are handled one after the other, oldest first; different users' updates side
    by side, up to ``concurrency`` at once (those for which ``exclusive(update)`` is true alone, see
    :class:`Gate`). ``admit(update)`` says whether the update may be handled now (the per-user rate
    limit): a user's update that is not admitted stays pending, and so do that user's later ones,
    keeping their order, until a read ``hold_s`` later offers them again; so does an update whose
    handling failed. Any error is logged with a reference and counted on the row; the other users'
    updates go on.
    """

    def __init__(self, bot: Bot, inbox: Inbox, handle: Handle, admit: Admit, *,
                 exclusive: Exclusive = _never_exclusive, concurrency: int = 1, timeout_s: float = 300.0,
                 hold_s: float = 1.0):
        self.bot, self.inbox, self.handle, self.admit, self.exclusive = bot, inbox, handle, admit, exclusive
        self.gate = Gate(concurrency)
        self.timeout_s = timeout_s
        self.finished = 0  # updates handled since start (not counting parked ones)
        self.lanes: Lanes[Pending] = Lanes(self._one, hold_s=hold_s)

    async def fill(self) -> int:
        """Read the pending updates and start those not in hand yet; returns how many were started."""
        self.lanes.reading()
        # past the ones in hand, so a crowd larger than one page is still read to its end
        rows = await asyncio.to_thread(self.inbox.pending, self.lanes.in_hand + 100)
        return sum(self.lanes.offer(item.user_id if item.user_id is not None else ("update", item.update_id),
                                    item.update_id, item) for item in rows)

    async def _one(self, item: Pending) -> bool:
        outcome = await _handle_one(self.bot, self.inbox, item, self.handle, self.admit, self.exclusive, self.gate,
                                    self.timeout_s)
        self.finished += outcome == "done"
        return outcome != "wait"  # a parked update is finished with: the user's next one goes on


async def handle_pending(bot: Bot, inbox: Inbox, handle: Handle, admit: Admit, *,
                         exclusive: Exclusive = _never_exclusive, concurrency: int = 1,
                         timeout_s: float = 300.0) -> int:
    """Handle every update pending now once (see :class:`Consumer`); returns how many were finished."""
    consumer = Consumer(bot, inbox, handle, admit, exclusive=exclusive, concurrency=concurrency, timeout_s=timeout_s)
    await consumer.fill()
    await consumer.lanes.drain()
    return consumer.finished


async def _handle_one(bot: Bot, inbox: Inbox, item: Pending, handle: Handle, admit: Admit, exclusive: Exclusive,
                      gate: Gate, timeout_s: float) -> str:
    """Handle one update: "done", "parked" (failed too many times) or "wait" (not admitted now, or failed
    and to be tried again)."""
    try:
        update = Update.de_json(item.payload, bot)
        if not await admit(update):
            return "wait"
        async with gate.enter(await exclusive(update)):
            await asyncio.wait_for(handle(update, item.attempts), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - one bad update never stops the others
        ref = secrets.token_hex(4).upper()
        log.error("error %s handling update %s (try %d)", ref, item.update_id, item.attempts + 1, exc_info=exc)
        try:
            parked = await asyncio.to_thread(inbox.failed_attempt, item.update_id, f"{type(exc).__name__} {ref}")
        except Exception:  # noqa: BLE001 - the database itself failed: the row stays pending for a retry
            log.exception("could not record error %s on update %s", ref, item.update_id)
            parked = False
        return "parked" if parked else "wait"
    await asyncio.to_thread(inbox.done, item.update_id)
    return "done"
