"""Durable intake: every Telegram update is written to the clinic database before Telegram hears that
it arrived, and handled from there.

Telegram forgets an update once the bot confirms it (the next ``getUpdates`` with a higher offset, or
a 200 answer to a webhook call). python-telegram-bot's own updater confirms on fetch, before handling,
so a bot killed mid-way lost every message in flight. Here:

1. intake (:func:`poll` or the webhook in :mod:`bot.webhook`) seals each update with the system data
   key, inserts it into ``bot_inbox`` keyed by ``update_id`` (a re-delivered id is ignored) and commits;
   only then is the update confirmed (next poll's offset / the webhook's 200);
2. :func:`handle_pending` hands the pending rows, oldest first, to the application and marks each one
   done, dropping its payload. A bot killed before that replays the row on restart; the handlers are
   written so a replay of an interrupted update has the effect of one (they check the case's state).

A user over the per-user rate limit is not dropped: their updates stay pending and are handled when
the window allows, and they are told once that their messages will be answered in a moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from telegram import Bot, Update
from telegram.error import Conflict, NetworkError, RetryAfter, TimedOut

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


async def handle_pending(bot: Bot, inbox: Inbox, handle: Handle, admit: Admit, *,
                         timeout_s: float = 300.0) -> int:
    """Handle every pending update once, oldest first; returns how many were finished.

    ``admit(update)`` says whether the update may be handled now (the per-user rate limit): a user's
    update that is not admitted stays pending, and so do that user's later ones, keeping their order.
    Any error is logged with a reference and counted on the row; the loop goes on with the next one.
    """
    finished = 0
    deferred: set[int] = set()
    for item in await asyncio.to_thread(inbox.pending):
        user = item.user_id
        if user is not None and user in deferred:
            continue
        try:
            update = Update.de_json(item.payload, bot)
            if not await admit(update):
                if user is not None:
                    deferred.add(user)
                continue
            await asyncio.wait_for(handle(update, item.attempts), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - one bad update never stops the others
            ref = secrets.token_hex(4).upper()
            log.error("error %s handling update %s (try %d)", ref, item.update_id, item.attempts + 1, exc_info=exc)
            try:
                parked = await asyncio.to_thread(inbox.failed_attempt, item.update_id, f"{type(exc).__name__} {ref}")
            except Exception:  # noqa: BLE001 - the database itself failed: the row stays pending for a retry
                log.exception("could not record error %s on update %s", ref, item.update_id)
                parked = False
            if not parked and user is not None:
                deferred.add(user)  # keep this user's order: their later updates wait for the retry
            continue
        await asyncio.to_thread(inbox.done, item.update_id)
        finished += 1
    return finished
