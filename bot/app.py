"""Build the patient bot: PTB application, persistence, reliability guards and the outbox sender.

Reliability, in the order an update meets it (``SkinBridgeApplication.process_update``):
1. a duplicate ``update_id`` (already processed, remembered in the ``kv`` table) is dropped;
2. a user over the per-user rate limit gets one polite message and is ignored for the window;
3. handlers run (errors -> :func:`on_error`: a reference id for the user, the traceback in the log);
4. conversation state is written to the database at once, then the update id is recorded.
Outgoing calls go through ``AIORateLimiter``, which waits and retries on Telegram's 429 RetryAfter.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time

from sqlalchemy.exc import IntegrityError
from telegram import BotCommand, Update
from telegram.ext import AIORateLimiter, Application, ContextTypes

from bot import clinician, handlers
from bot.i18n import LANGUAGES, pick_language, t
from bot.persistence import SqlPersistence
from bot.sender import NS_UPDATES, OutboxSender
from clinic_db.db import Clinic, get_clinic
from clinic_db.models import KeyValue
from skinbridge.settings import Settings

log = logging.getLogger(__name__)

SANDBOX_TOKEN = "123456:SANDBOX"
SANDBOX_URL = "http://127.0.0.1:8081"
USER_LIMIT = 20  # messages ...
USER_WINDOW_S = 60.0  # ... per minute and user
COMMANDS = ("new", "history", "language", "delete", "help", "start")


class UserRateLimit:
    """Sliding-window limit per Telegram user (in memory: it only needs to hold for a minute)."""

    def __init__(self, limit: int = USER_LIMIT, window_s: float = USER_WINDOW_S):
        self.limit, self.window_s = limit, window_s
        self._hits: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._warned: dict[int, float] = {}

    def allow(self, user_id: int, now: float | None = None) -> tuple[bool, bool]:
        """(allowed, warn): warn is True once per window for a user who is over the limit."""
        now = time.monotonic() if now is None else now
        hits = self._hits[user_id]
        while hits and now - hits[0] > self.window_s:
            hits.popleft()
        if len(hits) < self.limit:
            hits.append(now)
            return True, False
        warned_at = self._warned.get(user_id)
        warn = warned_at is None or now - warned_at > self.window_s
        if warn:
            self._warned[user_id] = now
        return False, warn


class ProcessedUpdates:
    """Durable record of handled update ids, so a re-delivered update does nothing twice."""

    def __init__(self, clinic: Clinic):
        self.clinic = clinic

    def seen(self, update_id: int) -> bool:
        with self.clinic.session() as session:
            return session.get(KeyValue, (NS_UPDATES, str(update_id))) is not None

    def mark(self, update_id: int) -> None:
        with self.clinic.session() as session:
            if session.get(KeyValue, (NS_UPDATES, str(update_id))) is None:
                session.add(KeyValue(namespace=NS_UPDATES, key=str(update_id), value={}))
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()


class SkinBridgeApplication(Application):
    clinic: Clinic
    processed: ProcessedUpdates
    user_limit: UserRateLimit
    sender_task: asyncio.Task | None = None

    async def process_update(self, update: object) -> None:
        if not isinstance(update, Update):
            await super().process_update(update)
            return
        if self.processed.seen(update.update_id):
            log.info("duplicate update %s ignored", update.update_id)
            return
        user = update.effective_user
        allowed, warn = (True, False) if user is None else self.user_limit.allow(user.id)
        if allowed:
            await super().process_update(update)
            await self.update_persistence()  # flush conversation state now, not on a timer
        elif warn and update.effective_chat is not None:
            await self.bot.send_message(update.effective_chat.id, t(pick_language(user.language_code), "ratelimit.text"))
        self.processed.mark(update.update_id)


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    ref = secrets.token_hex(4).upper()
    log.error("error %s while handling an update", ref, exc_info=context.error)
    if isinstance(update, Update) and update.effective_chat is not None:
        lang = pick_language(update.effective_user.language_code if update.effective_user else None)
        try:
            await context.bot.send_message(update.effective_chat.id, t(lang, "error.text", ref=ref))
        except Exception:  # noqa: BLE001 - nothing more we can do for this user
            log.exception("could not tell the user about error %s", ref)


async def _post_init(app: Application) -> None:
    for lang in LANGUAGES:
        commands = [BotCommand(name, t(lang, f"cmd.{name}")) for name in COMMANDS]
        # English is also the default for every client language we do not speak
        await app.bot.set_my_commands(commands, language_code=None if lang == "en" else lang)
    sender = OutboxSender(app.bot, app.clinic, interval_s=app.sender_interval_s)  # type: ignore[attr-defined]
    app.sender_task = asyncio.get_running_loop().create_task(sender.run(), name="outbox-sender")  # type: ignore[attr-defined]
    app.pusher_task = clinician.start_pusher(app, app.sender_interval_s)  # type: ignore[attr-defined]


async def _post_stop(app: Application) -> None:
    for name in ("sender_task", "pusher_task"):
        task = getattr(app, name, None)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass


def connection(settings: Settings) -> tuple[str, str, str]:
    """(token, base_url, base_file_url). Without a token: the sandbox emulator on loopback."""
    if settings.telegram_token is None:
        token, default_root = SANDBOX_TOKEN, SANDBOX_URL
    else:
        token, default_root = settings.telegram_token.get_secret_value(), "https://api.telegram.org"
    base_url = settings.telegram_base_url or f"{default_root}/bot"
    base_file_url = settings.telegram_base_file_url or f"{base_url.rsplit('/bot', 1)[0]}/file/bot"
    return token, base_url, base_file_url


def build_application(settings: Settings, *, sender_interval_s: float = 1.0) -> Application:
    clinic = get_clinic()
    token, base_url, base_file_url = connection(settings)
    app = (
        Application.builder()
        .application_class(SkinBridgeApplication)
        .token(token)
        .base_url(base_url)
        .base_file_url(base_file_url)
        .persistence(SqlPersistence(clinic))
        .rate_limiter(AIORateLimiter(max_retries=5))
        .post_init(_post_init)
        .post_stop(_post_stop)
        .build()
    )
    app.clinic = clinic  # type: ignore[attr-defined]
    app.processed = ProcessedUpdates(clinic)  # type: ignore[attr-defined]
    app.user_limit = UserRateLimit()  # type: ignore[attr-defined]
    app.sender_interval_s = sender_interval_s  # type: ignore[attr-defined]
    clinician.register(app)  # group -1: linked dermatologists, before the patient handlers
    handlers.register(app)
    app.add_error_handler(on_error)
    return app
