"""Build and run the patient bot: PTB application, durable intake, reliability guards, outbox sender.

Reliability, in the order an update meets it:
1. intake (:mod:`bot.inbox`: long polling, or the webhook of :mod:`bot.webhook`) writes the update to
   the ``bot_inbox`` table before Telegram hears it arrived; a re-delivered ``update_id`` is ignored;
2. :func:`serve`'s consumer hands pending updates, oldest first, to :class:`SkinBridgeApplication`;
   a user over the per-user rate limit waits in the inbox (told once), nothing is dropped;
3. handlers run (errors -> :func:`on_error`: a reference id for the user, the traceback in the log;
   a transient database error retries the update instead);
4. conversation state is written to the database at once, then the inbox row is marked done.
No error stops the consumer; it beats a heartbeat (``clinic_db.heartbeat``) that supervisors watch.
Outgoing calls go through ``AIORateLimiter``, which waits and retries on Telegram's 429 RetryAfter.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import secrets
import signal
import time
from dataclasses import dataclass

from sqlalchemy.exc import OperationalError
from telegram import BotCommand, Update
from telegram.error import BadRequest, TelegramError
from telegram.ext import AIORateLimiter, Application, ContextTypes, ExtBot

from bot import clinician, handlers
from bot.i18n import LANGUAGES, pick_language, t
from bot.inbox import MAX_ATTEMPTS, Consumer, Inbox, poll
from bot.persistence import SqlPersistence
from bot.request import RetryingRequest
from bot.sender import OutboxSender
from clinic_db.db import Clinic, get_clinic
from skinbridge.settings import Settings

log = logging.getLogger(__name__)

SANDBOX_TOKEN = "123456:SANDBOX"
SANDBOX_URL = "http://127.0.0.1:8081"
COMMANDS = ("new", "history", "language", "delete", "help", "start")


class UserRateLimit:
    """Sliding-window limit per Telegram user (in memory: it only needs to hold for a minute)."""

    def __init__(self, limit: int, window_s: float):
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


class SkinBridgeApplication(Application):
    """PTB's Application, fed from the durable inbox (:mod:`bot.inbox`) instead of its own updater."""

    clinic: Clinic
    inbox: Inbox
    user_limit: UserRateLimit
    sender_task: asyncio.Task | None = None
    concurrency: int = 1  # updates of different users handled at once (settings.bot_concurrency)

    async def process_update(self, update: object) -> None:
        await super().process_update(update)
        if isinstance(update, Update):
            await self.update_persistence()  # flush conversation state now, not on a timer

    async def handle(self, update: Update, attempt: int = 0) -> None:
        """Handle one update from the inbox; raise TransientFailure to have it retried later."""
        state = _Handling(attempt)
        token = _handling.set(state)  # seen by on_error, which PTB awaits inside process_update
        try:
            await self.process_update(update)
        finally:
            _handling.reset(token)
        if state.transient_failure:
            raise TransientFailure("a handler hit a transient database error")

    async def exclusive(self, update: Update) -> bool:
        """A linked dermatologist's update is handled with no other beside it (bot.inbox.Gate)."""
        return update.effective_user is not None and await asyncio.to_thread(clinician.from_linked_clinician, update)

    async def admit(self, update: Update) -> bool:
        """The per-user rate limit: over it, the update waits in the inbox; the user hears so once."""
        user = update.effective_user
        if user is None:
            return True
        allowed, warn = self.user_limit.allow(user.id)
        if warn and update.effective_chat is not None:
            try:
                await self.bot.send_message(update.effective_chat.id,
                                            t(pick_language(user.language_code), "ratelimit.text"))
            except TelegramError:
                log.warning("could not tell a user that their messages wait")
        return allowed


class PatientBot(ExtBot):
    """The Bot API client, tolerant of what a replay from the inbox meets after a restart: a button press
    older than Telegram's window for answering it (the press still counts, only its spinner is gone), and
    an edit that the killed process had already made ("message is not modified")."""

    async def edit_message_text(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        return await _unless_already_made(super().edit_message_text(*args, **kwargs))

    async def edit_message_reply_markup(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        return await _unless_already_made(super().edit_message_reply_markup(*args, **kwargs))

    async def answer_callback_query(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        try:
            return await super().answer_callback_query(*args, **kwargs)
        except BadRequest as exc:
            if "query is too old" not in exc.message.lower():
                raise
            log.info("a replayed button press could no longer be acknowledged; it is handled all the same")
            return False


async def _unless_already_made(edit):  # type: ignore[no-untyped-def]
    """An edit a killed process had already made answers 'message is not modified': that is success."""
    try:
        return await edit
    except BadRequest as exc:
        if "not modified" not in exc.message.lower():
            raise
        log.info("a replayed edit was already made; going on")
        return True


class TransientFailure(RuntimeError):
    """The update's handling failed for a reason that a retry can fix (database locked or down)."""


@dataclass
class _Handling:
    """The update being handled in this task: its earlier tries, and whether a handler hit a transient
    database error (then the update is retried, not answered). Per task, since several run at once."""

    attempt: int
    transient_failure: bool = False


_handling: contextvars.ContextVar[_Handling] = contextvars.ContextVar("skinbridge_handling")


async def on_error(update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
    ref = secrets.token_hex(4).upper()
    app = context.application
    state = _handling.get(None)
    if isinstance(context.error, OperationalError) and state is not None and state.attempt < MAX_ATTEMPTS - 1:
        # database locked or unreachable: the update stays in the inbox and is handled again shortly
        log.warning("error %s: transient database error while handling an update; it will be retried", ref,
                    exc_info=context.error)
        state.transient_failure = True
        return
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


def build_application(settings: Settings, *, sender_interval_s: float = 1.0) -> SkinBridgeApplication:
    clinic = get_clinic()
    token, base_url, base_file_url = connection(settings)
    bot = PatientBot(token=token, base_url=base_url, base_file_url=base_file_url,
                     request=RetryingRequest(connection_pool_size=256),
                     get_updates_request=RetryingRequest(connection_pool_size=1),
                     rate_limiter=AIORateLimiter(overall_max_rate=settings.bot_max_rate, max_retries=5))
    app = (
        Application.builder()
        .application_class(SkinBridgeApplication)
        .bot(bot)
        .updater(None)  # intake is bot.inbox: PTB's updater would confirm updates before they are stored
        .persistence(SqlPersistence(clinic))
        .build()
    )
    assert isinstance(app, SkinBridgeApplication)
    app.clinic = clinic
    app.inbox = Inbox(clinic)
    app.user_limit = UserRateLimit(settings.bot_user_limit, settings.bot_user_window_s)
    app.concurrency = settings.bot_concurrency
    app.sender_interval_s = sender_interval_s  # type: ignore[attr-defined]
    clinician.register(app)  # group -1: linked dermatologists, before the patient handlers
    handlers.register(app)
    app.add_error_handler(on_error)
    return app


# --- running -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Webhook:
    url: str  # the public HTTPS address registered with Telegram
    secret: str  # Telegram's secret_token header
    listen: str
    port: int
    path: str


HEARTBEAT_S = 5.0
IDLE_TICK_S = 1.0  # the consumer also looks at the inbox this often (deferred and retried updates)
PRUNE_EVERY_S = 3600.0


def _beat(app: SkinBridgeApplication, counts: dict[str, int]) -> None:
    from clinic_db import heartbeat

    heartbeat.beat(app.clinic, "bot", detail=counts)


async def _consume(app: SkinBridgeApplication, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Hand the inbox to the application until stopped: a read when intake stores updates (``wake``) and
    every IDLE_TICK_S (updates held for the rate limit or a retry). Nothing that goes wrong ends the loop."""
    consumer = Consumer(app.bot, app.inbox, app.handle, app.admit, exclusive=app.exclusive,
                        concurrency=app.concurrency, hold_s=IDLE_TICK_S)
    last_beat = last_prune = 0.0
    beaten_at = 0  # consumer.finished at the last heartbeat
    try:
        while not stop.is_set():
            wake.clear()
            try:
                await consumer.fill()
            except Exception:  # noqa: BLE001 - e.g. the database is down: log, wait, try again
                log.exception("error %s in the update loop; it goes on", secrets.token_hex(4).upper())
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_S:
                last_beat = now
                try:
                    await asyncio.to_thread(_beat, app, {"handled": consumer.finished - beaten_at,
                                                         "in_hand": consumer.lanes.in_hand})
                    beaten_at = consumer.finished
                except Exception:  # noqa: BLE001 - a missed beat is visible as a stale heartbeat
                    log.warning("heartbeat not written", exc_info=True)
            if now - last_prune >= PRUNE_EVERY_S:
                last_prune = now
                try:
                    await asyncio.to_thread(app.inbox.prune)
                except Exception:  # noqa: BLE001
                    log.warning("inbox prune failed", exc_info=True)
            try:
                await asyncio.wait_for(wake.wait(), timeout=IDLE_TICK_S)
            except asyncio.TimeoutError:
                pass
    finally:
        await consumer.lanes.close()  # updates in hand stay pending: the next start handles them


async def serve(app: SkinBridgeApplication, *, webhook: Webhook | None = None) -> None:
    """Run the bot until SIGINT/SIGTERM: intake (polling or webhook), consumer, outbox sender, pusher."""
    stop, wake = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks: list[asyncio.Task] = []
    server = None
    await app.initialize()
    try:
        await _post_init(app)
        await app.start()
        if webhook is None:
            await app.bot.delete_webhook(drop_pending_updates=False)
            tasks.append(loop.create_task(poll(app.bot, app.inbox, wake, stop, Update.ALL_TYPES), name="intake"))
        else:
            from bot.webhook import start_webhook_server

            server = start_webhook_server(app.inbox, wake, secret=webhook.secret, listen=webhook.listen,
                                          port=webhook.port, path=webhook.path)
            await app.bot.set_webhook(webhook.url, secret_token=webhook.secret, allowed_updates=Update.ALL_TYPES)
        tasks.append(loop.create_task(_consume(app, wake, stop), name="consumer"))
        waiter = loop.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:  # an intake that gave up (e.g. an invalid token) ends the process with its error
            if task is not waiter and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        if server is not None:
            server.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await app.stop()
            await _post_stop(app)
        finally:
            await app.shutdown()
            try:
                from clinic_db import heartbeat

                await asyncio.to_thread(heartbeat.forget, app.clinic)
            except Exception:  # noqa: BLE001 - a stale heartbeat expires by itself
                log.debug("heartbeat not removed", exc_info=True)
