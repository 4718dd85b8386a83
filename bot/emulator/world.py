"""The in-memory world of the emulated Telegram: users, private chats, messages, the update queue.

Everything runs on the server's single event loop, so no locks are needed; long polls wait on futures.

Telegram never hands out an update id twice, nor a message id twice in one chat, and it remembers who
started the bot. A bot relies on that: it confirms updates by offset and recognises a re-delivered
message by its id. So the sandbox keeps, in a small file (``state_file``), its users and a bound above
every id it has handed out (update ids, message ids, and the change counter ``seq`` the page polls
with, so a page left open across a restart keeps up); a restarted sandbox counts on from that bound.
Without it a restarted sandbox started at the same ids again and the bot took the patient's new
messages for ones it had already handled. The bound moves in steps of ``ID_BLOCK``, so the file is
written once per that many ids (and when a user changes), not on every message. Chat history is not
kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.emulator.errors import ApiError, bad_request
from bot.emulator.media import FileStore

UPDATE_KINDS = ("message", "edited_message", "channel_post", "edited_channel_post", "business_connection",
                "business_message", "edited_business_message", "deleted_business_messages", "message_reaction",
                "message_reaction_count", "inline_query", "chosen_inline_result", "callback_query",
                "shipping_query", "pre_checkout_query", "purchased_paid_media", "poll", "poll_answer",
                "my_chat_member", "chat_member", "chat_join_request", "chat_boost", "removed_chat_boost")
CALL_LOG_LIMIT = 10_000
ID_BLOCK = 1_000  # ids handed out between two writes of the state file's bound

log = logging.getLogger(__name__)


@dataclass
class User:
    id: int
    first_name: str = "Patient"
    language_code: str | None = None
    username: str | None = None
    blocked_bot: bool = False

    def as_user(self) -> dict[str, Any]:
        user: dict[str, Any] = {"id": self.id, "is_bot": False, "first_name": self.first_name}
        if self.username:
            user["username"] = self.username
        if self.language_code:
            user["language_code"] = self.language_code
        return user

    def as_chat(self) -> dict[str, Any]:
        chat: dict[str, Any] = {"id": self.id, "type": "private", "first_name": self.first_name}
        if self.username:
            chat["username"] = self.username
        return chat


@dataclass
class StoredMessage:
    chat_id: int
    message: dict[str, Any]  # the Telegram Message object, current version
    from_bot: bool
    seq: int
    parse_mode: str | None = None
    keyboard: dict[str, Any] | None = None  # a reply keyboard/removal sent with it (not part of Message)
    edited: bool = False
    deleted: bool = False

    @property
    def message_id(self) -> int:
        return int(self.message["message_id"])


@dataclass
class _Pending:
    update: dict[str, Any]
    forced: bool  # injected raw with its own update_id: survives one confirm so duplicates can be tested
    delivered: bool = False


@dataclass
class Failure:
    times: int
    code: int
    description: str
    retry_after: int | None


@dataclass
class CallbackRecord:
    chat_id: int
    message_id: int
    data: str
    answered: bool = False
    text: str | None = None
    show_alert: bool = False


@dataclass
class World:
    files: FileStore
    state_file: Path | None = None  # where the id counters and users outlive a restart (the sandbox's)
    users: dict[int, User] = field(default_factory=dict)
    chats: dict[int, dict[int, StoredMessage]] = field(default_factory=dict)
    callbacks: dict[str, CallbackRecord] = field(default_factory=dict)
    photo_sets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # any size's file_id -> all sizes
    commands: dict[tuple[str, str], list[dict[str, str]]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, list[Failure]] = field(default_factory=dict)
    chat_actions: dict[int, tuple[str, float]] = field(default_factory=dict)
    webhook: dict[str, Any] = field(default_factory=dict)
    allowed_updates: list[str] | None = None
    _pending: list[_Pending] = field(default_factory=list)
    _next_update_id: int = 100_000_001
    _next_message_id: dict[int, int] = field(default_factory=dict)
    _message_id_floor: int = 0  # where a chat's message ids start
    _seq: int = 0
    _bound: int = 0  # above every id and seq handed out; with a state_file, what the file says
    _waiters: set[asyncio.Future[None]] = field(default_factory=set)
    _poll_generation: int = 0
    _call_seq: int = 0

    def __post_init__(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        try:
            state = json.loads(self.state_file.read_text(encoding="utf-8"))
            bound = int(state["above"])
            users = {int(u["id"]): User(**u) for u in state["users"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # ids from the clock are above any this sandbox handed out before (one per update or message)
            bound, users = int(time.time()), {}
            log.warning("sandbox state %s unreadable (%s); starting ids at %d, users must press /start again",
                        self.state_file, exc, bound)
        self._next_update_id = max(self._next_update_id, bound)
        self._message_id_floor = self._seq = self._bound = bound
        self.users = users
        for user_id in users:
            self.chats.setdefault(user_id, {})

    # --- lifecycle ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (tests start each case from here); a sandbox with a state file keeps its
        counters, since a bot may already have seen those ids."""
        self._wake()
        self.files.clear()
        for name in ("users", "chats", "callbacks", "photo_sets", "commands", "failures", "chat_actions", "webhook"):
            getattr(self, name).clear()
        self.calls.clear()
        self._pending.clear()
        self.allowed_updates = None
        if self.state_file is None:
            self._next_message_id.clear()
            self._next_update_id = 100_000_001
            self._seq = 0
        self.remember()

    def remember(self) -> None:
        """Write the bound and the users to the state file (atomically: a crash leaves the old one)."""
        if self.state_file is None:
            return
        state = {"above": self._bound, "users": [vars(user) for user in self.users.values()]}
        temporary = self.state_file.with_name(self.state_file.name + ".tmp")
        temporary.write_text(json.dumps(state), encoding="utf-8")
        os.replace(temporary, self.state_file)

    # --- users and chats ---------------------------------------------------------------------
    def user(self, user_id: int, *, first_name: str | None = None, language_code: str | None = None,
             username: str | None = None) -> User:
        user = self.users.get(user_id)
        before = None if user is None else vars(user).copy()
        if user is None:
            user = self.users[user_id] = User(user_id)
            self.chats.setdefault(user_id, {})
        if first_name:
            user.first_name = first_name
        if language_code:
            user.language_code = language_code
        if username:
            user.username = username
        if vars(user) != before:
            self.remember()
        return user

    def chat_for_bot(self, chat_id: int | None) -> User:
        """The private chat a bot wants to write to; Telegram only knows chats whose user started the bot."""
        user = self.users.get(chat_id) if chat_id is not None else None
        if user is None:
            raise bad_request("chat not found")
        if user.blocked_bot:
            raise ApiError(403, "Forbidden: bot was blocked by the user")
        return user

    def next_message_id(self, chat_id: int) -> int:
        value = self._next_message_id.get(chat_id, self._message_id_floor) + 1
        self._next_message_id[chat_id] = value
        return self._counted(value)

    def next_seq(self) -> int:
        self._seq += 1
        return self._counted(self._seq)

    def _counted(self, value: int) -> int:
        """Every id and seq handed out passes here: the state file's bound stays above them all."""
        if value >= self._bound:
            self._bound = value + ID_BLOCK
            self.remember()
        return value

    def store(self, chat_id: int, message: dict[str, Any], *, from_bot: bool, parse_mode: str | None = None) -> StoredMessage:
        stored = StoredMessage(chat_id, message, from_bot, self.next_seq(), parse_mode)
        self.chats.setdefault(chat_id, {})[stored.message_id] = stored
        return stored

    def find(self, chat_id: int, message_id: int | None) -> StoredMessage | None:
        if message_id is None:
            return None
        stored = self.chats.get(chat_id, {}).get(message_id)
        return None if stored is None or stored.deleted else stored

    def touch(self, stored: StoredMessage, *, edited: bool = True) -> None:
        stored.seq = self.next_seq()
        stored.edited = stored.edited or edited

    # --- updates -----------------------------------------------------------------------------
    def push_update(self, update: dict[str, Any], *, forced: bool = False) -> int:
        if "update_id" not in update:
            update = {"update_id": self._next_update_id, **update}
        update_id = int(update["update_id"])
        self._next_update_id = max(self._next_update_id, update_id + 1)
        self._counted(update_id)
        self._pending.append(_Pending(update, forced))
        self._wake()
        return update_id

    def pending_count(self) -> int:
        return len(self._pending)

    def _confirm(self, offset: int) -> None:
        if offset > 0:
            self._pending = [p for p in self._pending if p.update["update_id"] >= offset or (p.forced and not p.delivered)]
        elif offset < 0:
            self._pending = self._pending[offset:]

    def _take(self, limit: int) -> list[dict[str, Any]]:
        if self.allowed_updates:
            allowed = set(self.allowed_updates)
            # Telegram discards updates of kinds the bot did not ask for.
            self._pending = [p for p in self._pending if any(k in allowed for k in p.update if k != "update_id")]
        batch = self._pending[:limit]
        for pending in batch:
            pending.delivered = True
        return [p.update for p in batch]

    def _wake(self) -> None:
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_result(None)

    async def get_updates(self, *, offset: int, limit: int, timeout: float, allowed_updates: list[str] | None,
                          client_gone: asyncio.Future[Any] | None = None) -> list[dict[str, Any]]:
        """Long poll; `client_gone` completes when the HTTP client disconnects (a stopped bot must not
        keep a poll, or the server, waiting)."""
        if self.webhook.get("url"):
            raise ApiError(409, "Conflict: can't use getUpdates method while webhook is active; "
                                "use deleteWebhook to delete the webhook first")
        if allowed_updates is not None:
            self.allowed_updates = list(allowed_updates) or None
        self._confirm(offset)
        self._poll_generation += 1
        generation = self._poll_generation
        self._wake()  # an older long poll still waiting is terminated with 409, as on Telegram
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            batch = self._take(limit)
            remaining = deadline - loop.time()
            if batch or remaining <= 0:
                return batch
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait({waiter} | ({client_gone} if client_gone else set()), timeout=remaining,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._waiters.discard(waiter)
            if client_gone is not None and client_gone.done():
                return []
            if generation != self._poll_generation:
                raise ApiError(409, "Conflict: terminated by other getUpdates request; "
                                    "make sure that only one bot instance is running")

    # --- test controls -----------------------------------------------------------------------
    def add_failure(self, method: str, failure: Failure) -> None:
        self.failures.setdefault(method.lower(), []).append(failure)

    def take_failure(self, method: str) -> ApiError | None:
        queue = self.failures.get(method.lower())
        if not queue:
            return None
        failure = queue[0]
        failure.times -= 1
        if failure.times <= 0:
            queue.pop(0)
        parameters = {"retry_after": failure.retry_after} if failure.retry_after is not None else None
        return ApiError(failure.code, failure.description, parameters)

    def log_call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self._call_seq += 1
        entry = {"seq": self._call_seq, "method": method, "params": params, "at": time.time()}
        self.calls.append(entry)
        if len(self.calls) > CALL_LOG_LIMIT:  # a sandbox left running for days must not grow without bound
            del self.calls[: len(self.calls) - CALL_LOG_LIMIT]
        return entry

    def chat_action(self, chat_id: int) -> str | None:
        """The action a bot announced in the last 5 s (how long Telegram clients show it)."""
        action = self.chat_actions.get(chat_id)
        return action[0] if action and time.monotonic() - action[1] < 5 else None
