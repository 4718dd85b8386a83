"""Review on the move: linked dermatologists triage urgent cases in the bot with inline buttons.

Flow: an urgent/emergency review task opens -> :class:`ReviewPusher` sends every reachable linked
dermatologist a push (no patient identity) -> **View** claims the task (``review.claim``) and shows
history and the AI differential; **Photos** sends the photos decrypted in memory -> **Accept AI** or
**Amend** (condition from the top 5 or typed and matched in the vocabulary, urgency,
recommendation) -> confirmation -> the current TOTP code when the account has one ->
``clinic_db.review.decide`` (case final/amended, FHIR, outbox "final" to the patient).

Every handler here is registered in group -1, before the patient handlers: button presses
(``cr:...``) and replies the dermatologist was asked for end there (``ApplicationHandlerStop``);
anything else falls through to the patient conversation. Button data comes from the client, so each
press re-checks the link, the claim and the draft it belongs to; a press from a Telegram account
that is not a linked, active dermatologist is dropped without an answer. Texts are English, like
the console.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
from typing import Any
from urllib.parse import urlparse

from sqlalchemy.orm import Session
from telegram import Bot, CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Update
from telegram.error import BadRequest, TelegramError
from telegram.ext import (
    Application,
    ApplicationHandlerStop,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from clinic_db import audit, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic, get_clinic
from clinic_db.models import Clinician, ReviewTask
from console import telegram_review as tr
from console.labels import status_label
from skinbridge.settings import get_settings

log = logging.getLogger(__name__)

GROUP = -1  # before the patient handlers (group 0)
DRAFT = "review_draft"  # user_data key: the decision being assembled (sealed by SqlPersistence)
URGENCIES = tuple(review.URGENCY_PRIORITY)
# short button codes -> clinic_db.review recommendation values (callback data is limited to 64 bytes)
RECOMMENDATIONS = {
    "sc": "self_care",
    "gp": "see_gp",
    "d1": f"{review.WITHIN_DAYS_PREFIX}1",  # urgent
    "d3": f"{review.WITHIN_DAYS_PREFIX}3",  # soon
    "d7": f"{review.WITHIN_DAYS_PREFIX}7",
    "d14": f"{review.WITHIN_DAYS_PREFIX}14",
    "d30": f"{review.WITHIN_DAYS_PREFIX}30",
    "uip": "urgent_in_person",
}
MAX_SEARCH_RESULTS = 6


# --- who is pressing ----------------------------------------------------------------------------
def _clinic() -> Clinic:
    return get_clinic()


def _linked(session: Session, update: Update) -> Clinician | None:
    user = update.effective_user
    return None if user is None else tr.find(_clinic(), session, user.id)


def from_linked_clinician(update: Update) -> bool:
    """Whether the update comes from a Telegram account linked to an active dermatologist."""
    with _clinic().session() as session:
        return _linked(session, update) is not None


class LinkedClinician(filters.UpdateFilter):
    """Updates from a Telegram account linked to an active dermatologist."""

    def filter(self, update: Update) -> bool:
        return from_linked_clinician(update)


LINKED = LinkedClinician(name="LinkedClinician")


# --- buttons ------------------------------------------------------------------------------------
def console_url(task_id: uuid.UUID) -> str:
    return tr.console_task_url(task_id, get_settings().public_base_url)


def _url_button_allowed(url: str) -> bool:
    """Real Telegram refuses buttons pointing at loopback; the local emulator takes them."""
    if get_settings().telegram_token is None:
        return True
    host = urlparse(url).hostname or ""
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def _console_row(task_id: uuid.UUID) -> list[list[InlineKeyboardButton]]:
    url = console_url(task_id)
    return [[InlineKeyboardButton("Open in console", url=url)]] if _url_button_allowed(url) else []


def task_keyboard(task_id: uuid.UUID) -> InlineKeyboardMarkup:
    t = task_id.hex
    return InlineKeyboardMarkup([
        [InlineKeyboardButton("View", callback_data=f"cr:view:{t}"),
         InlineKeyboardButton("Accept AI", callback_data=f"cr:accept:{t}"),
         InlineKeyboardButton("Amend", callback_data=f"cr:amend:{t}")],
        *_console_row(task_id),
    ])


def _claimed_keyboard(task_id: uuid.UUID) -> InlineKeyboardMarkup:
    t = task_id.hex
    return InlineKeyboardMarkup([
        [InlineKeyboardButton("Photos", callback_data=f"cr:photos:{t}")],
        [InlineKeyboardButton("Accept AI", callback_data=f"cr:accept:{t}"),
         InlineKeyboardButton("Amend", callback_data=f"cr:amend:{t}")],
        [InlineKeyboardButton("Release", callback_data=f"cr:release:{t}")],
        *_console_row(task_id),
    ])


def _choice_keyboard(task_id: uuid.UUID, choices: list[tuple[str, str]], *, other: bool) -> InlineKeyboardMarkup:
    t = task_id.hex
    rows = [[InlineKeyboardButton(label, callback_data=f"cr:cond:{t}:{i}")] for i, (_, label) in enumerate(choices)]
    if other:
        rows.append([InlineKeyboardButton("Other…", callback_data=f"cr:other:{t}")])
    rows.append([InlineKeyboardButton("Cancel", callback_data=f"cr:cancel:{t}")])
    return InlineKeyboardMarkup(rows)


def _urgency_keyboard(task_id: uuid.UUID) -> InlineKeyboardMarkup:
    t = task_id.hex
    return InlineKeyboardMarkup([[InlineKeyboardButton(u, callback_data=f"cr:urg:{t}:{u}") for u in URGENCIES],
                                 [InlineKeyboardButton("Cancel", callback_data=f"cr:cancel:{t}")]])


def _recommendation_keyboard(task_id: uuid.UUID, urgency: str) -> InlineKeyboardMarkup:
    t = task_id.hex
    # only what fits the urgency: the patient reads one action with one timeframe (review.recommendation_fits)
    rows = [[InlineKeyboardButton(tr.RECOMMENDATION_LABELS[value], callback_data=f"cr:rec:{t}:{short}")]
            for short, value in RECOMMENDATIONS.items() if review.recommendation_fits(urgency, value)]
    rows.append([InlineKeyboardButton("Cancel", callback_data=f"cr:cancel:{t}")])
    return InlineKeyboardMarkup(rows)


def _confirm_keyboard(task_id: uuid.UUID) -> InlineKeyboardMarkup:
    t = task_id.hex
    return InlineKeyboardMarkup([[InlineKeyboardButton("Sign", callback_data=f"cr:sign:{t}"),
                                  InlineKeyboardButton("Cancel", callback_data=f"cr:cancel:{t}")]])


# --- pushes -------------------------------------------------------------------------------------
class ReviewPusher:
    """Polls for open urgent tasks not yet pushed and messages each reachable linked dermatologist.

    A task is remembered in ``kv`` namespace ``clin_push`` only after at least one message went out
    (at-least-once); with nobody reachable it is tried again on the next round.
    """

    def __init__(self, bot: Bot, clinic: Clinic, interval_s: float = 1.0):
        self.bot, self.clinic, self.interval_s = bot, clinic, interval_s

    async def run(self) -> None:
        while True:
            try:
                await self.push_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must survive a DB hiccup or a Telegram error
                log.exception("review push round failed")
            await asyncio.sleep(self.interval_s)

    async def push_due(self) -> int:
        pushed = 0
        with self.clinic.session() as session:
            tasks = tr.pending_pushes(session)
            if not tasks:
                return 0
            recipients = tr.reachable(self.clinic, session)
            if not recipients:
                return 0
            for task in tasks:
                text = "New case for review\n" + tr.summary(self.clinic, session, task).text()
                sent = 0
                for _, chat_id in recipients:
                    try:
                        await self.bot.send_message(chat_id, text, reply_markup=task_keyboard(task.id))
                        sent += 1
                    except TelegramError as exc:
                        log.warning("review push for %s not delivered: %s", tr.ref(task.id), exc)
                if sent:
                    tr.mark_pushed(session, task, sent)
                    session.commit()
                    pushed += 1
        return pushed


# --- commands -----------------------------------------------------------------------------------
async def cmd_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    c = _clinic()
    with c.session() as session:
        clinician = _linked(session, update)
        if clinician is None:
            return  # not linked (any more): the patient /start handles it
        tr.remember_chat(c, session, clinician, update.effective_user.id)  # type: ignore[union-attr]
        session.commit()
        name = clinician.display_name
    await update.effective_message.reply_text(  # type: ignore[union-attr]
        f"Hello {name}. Urgent review cases will be pushed here. /queue shows the review queue.\n"
        "AI assessments are preliminary until you sign them."
    )
    raise ApplicationHandlerStop


async def cmd_queue(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    c = _clinic()
    with c.session() as session:
        clinician = _linked(session, update)
        if clinician is None:
            return
        tr.remember_chat(c, session, clinician, update.effective_user.id)  # type: ignore[union-attr]
        text = tr.digest(session, clinician, tr.console_base(get_settings().public_base_url))
        top = [(t.id, tr.summary(c, session, t)) for t in tr.urgent_open(session, clinician)]
        session.commit()
    message = update.effective_message
    assert message is not None
    await message.reply_text(text)
    for task_id, summary in top:
        await message.reply_text(summary.text(), reply_markup=task_keyboard(task_id))
    raise ApplicationHandlerStop


# --- buttons ------------------------------------------------------------------------------------
async def on_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    assert query is not None and query.data is not None
    c = _clinic()
    with c.session() as session:
        clinician = _linked(session, update)
        if clinician is None:
            # forged or stale: no answer, no message, nothing about the task
            audit.record(session, Actor.system("bot"), "review.telegram", "ReviewTask", None, outcome="denied",
                         purpose="operations", reason="not_linked")
            session.commit()
            raise ApplicationHandlerStop
        parts = query.data.split(":")
        action, task_hex, arg = parts[1], parts[2] if len(parts) > 2 else "", parts[3] if len(parts) > 3 else ""
        try:
            task_id = uuid.UUID(hex=task_hex)
        except ValueError:
            await _answer(query)
            raise ApplicationHandlerStop from None
        task = session.get(ReviewTask, task_id)
        if task is None:
            await _answer(query, "This case is no longer in the queue.")
            raise ApplicationHandlerStop
        await _dispatch(c, session, clinician, task, action, arg, update, context)
    raise ApplicationHandlerStop


async def _answer(query: CallbackQuery, text: str | None = None, show_alert: bool = False) -> None:
    """Stop the client's spinner. A query answered too late (slow round, restart) must not undo the action."""
    try:
        await query.answer(text, show_alert=show_alert)
    except BadRequest as exc:
        log.info("callback query not answered: %s", exc.message)


async def _reply(update: Update, text: str, markup: InlineKeyboardMarkup | None = None) -> None:
    chat = update.effective_chat
    assert chat is not None
    await update.get_bot().send_message(chat.id, text, reply_markup=markup)


async def _dispatch(c: Clinic, session: Session, clinician: Clinician, task: ReviewTask, action: str, arg: str,
                    update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    assert query is not None
    user_data: dict[str, Any] = context.user_data  # type: ignore[assignment]
    if task.status != "open":
        await _answer(query)
        await _reply(update, f"Ref {tr.ref(task.id)} is no longer open for review ({status_label(task.status)}).")
        return
    if action == "view" or (action in ("accept", "amend") and not review.holds_claim(task, clinician.id)):
        # Accept/Amend straight from a push claim first (showing the case), then go on
        if not await _view(c, session, clinician, task, update) or action == "view":
            return
        task = session.get(ReviewTask, task.id)  # type: ignore[assignment]
        await _start_decision(c, session, task, action, update, user_data)
        return
    if not review.holds_claim(task, clinician.id):
        await _answer(query, "Press View first: the case must be claimed by you.", show_alert=True)
        return
    await _answer(query)
    draft = user_data.get(DRAFT) or {}
    if action in ("accept", "amend"):
        await _start_decision(c, session, task, action, update, user_data)
    elif action == "photos":
        await _send_photos(c, session, clinician, task, update)
    elif action == "release":
        review.release(session, task.id, clinician.id)
        user_data.pop(DRAFT, None)
        await _reply(update, f"Released ref {tr.ref(task.id)}; colleagues can claim it now.")
    elif action == "cancel":
        user_data.pop(DRAFT, None)
        await _reply(update, "Cancelled; nothing was signed. You still hold the case.", _claimed_keyboard(task.id))
    elif draft.get("task") != task.id.hex:
        await _reply(update, "That button belongs to an older step. Start again with Accept AI or Amend.",
                     _claimed_keyboard(task.id))
    elif action == "cond" and arg.isdigit() and int(arg) < len(draft.get("choices", [])):
        draft.update(condition=draft["choices"][int(arg)], awaiting=None)
        user_data[DRAFT] = draft
        await _reply(update, f"Condition: {tr.condition_label(draft['condition'])}. Urgency?",
                     _urgency_keyboard(task.id))
    elif action == "other":
        draft["awaiting"] = "condition"
        user_data[DRAFT] = draft
        await _reply(update, "Type the condition's name (e.g. psoriasis).")
    elif action == "urg" and arg in URGENCIES and draft.get("condition"):
        draft["urgency"] = arg
        user_data[DRAFT] = draft
        await _reply(update, "Recommendation for the patient?", _recommendation_keyboard(task.id, arg))
    elif action == "rec" and arg in RECOMMENDATIONS and draft.get("condition") and draft.get("urgency"):
        draft["recommendation"] = RECOMMENDATIONS[arg]
        user_data[DRAFT] = draft
        await _reply(update, _confirmation(draft), _confirm_keyboard(task.id))
    elif action == "sign" and draft.get("recommendation"):
        if clinician.totp_secret:
            draft["awaiting"] = "totp"
            user_data[DRAFT] = draft
            await _reply(update, "Send the current 6-digit code from your authenticator app to sign.")
        else:
            await _sign(c, session, clinician, task, draft, update, user_data)
    else:
        await _reply(update, "That step is not available now.", _claimed_keyboard(task.id))


async def _view(c: Clinic, session: Session, clinician: Clinician, task: ReviewTask, update: Update) -> bool:
    """Claim the task and show it; if a colleague holds it, say who. True when the claim was won."""
    query = update.callback_query
    assert query is not None
    task_id = task.id
    if not review.claim(session, task_id, clinician.id):  # commits
        session.expire_all()
        task = session.get(ReviewTask, task_id)  # type: ignore[assignment]
        until = task.claim_expires_at.strftime("%H:%M UTC") if task.claim_expires_at else "—"
        await _answer(query)
        await _reply(update, f"Ref {tr.ref(task_id)} is being reviewed by {tr.holder_name(session, task)} "
                             f"(claimed until {until}).")
        return False
    session.expire_all()
    task = session.get(ReviewTask, task_id)  # type: ignore[assignment]
    detail = tr.view(c, session, task, clinician)
    session.commit()
    await _answer(query, "Claimed for you for 30 minutes.")
    await _reply(update, "You hold this case now.\n" + detail.text(), _claimed_keyboard(task_id))
    return True


async def _send_photos(c: Clinic, session: Session, clinician: Clinician, task: ReviewTask, update: Update) -> None:
    data = tr.photos(c, session, task, clinician)  # audited per image
    session.commit()
    chat = update.effective_chat
    assert chat is not None
    for i, photo in enumerate(data, 1):
        # protect_content: the client offers no forwarding or saving of patient photos
        await update.get_bot().send_photo(chat.id, photo, caption=f"Ref {tr.ref(task.id)} · photo {i}/{len(data)}",
                                          protect_content=True)
    if not data:
        await _reply(update, "This case has no photos.")


def _start_draft(c: Clinic, session: Session, task: ReviewTask, decision: str) -> dict[str, Any]:
    differential = tr.latest_differential(c, session, task.case)
    draft: dict[str, Any] = {"task": task.id.hex, "decision": decision, "awaiting": None}
    if decision == "accept":
        draft.update(condition=differential[0][0] if differential else task.case.condition_code,
                     urgency=task.case.urgency)
    else:
        draft["choices"] = [code for code, _, _ in differential[: tr.TOP_CONDITIONS]]
    return draft


def _confirmation(draft: dict[str, Any]) -> str:
    what = "Accept the AI assessment" if draft["decision"] == "accept" else "Amend the assessment"
    return (f"{what}:\n• Condition: {tr.condition_label(draft['condition'])}\n• Urgency: {draft['urgency']}\n"
            f"• Recommendation: {tr.RECOMMENDATION_LABELS.get(draft['recommendation'], draft['recommendation'])}\n"
            "Signing makes this the final result the patient receives.")


async def _sign(c: Clinic, session: Session, clinician: Clinician, task: ReviewTask, draft: dict[str, Any],
                update: Update, user_data: dict[str, Any]) -> None:
    try:
        review.decide(c, session, task, clinician, draft["decision"], condition_code=draft["condition"],
                      urgency=draft["urgency"], recommendation=draft["recommendation"])
    except review.DecisionError as exc:
        session.rollback()
        await _reply(update, f"Not signed: {exc}")
        return
    session.commit()
    user_data.pop(DRAFT, None)
    await _reply(update, f"Signed ref {tr.ref(task.id)}: {tr.condition_label(draft['condition'])}, "
                         f"{draft['urgency']}. The patient will receive your decision.")


async def _start_decision(c: Clinic, session: Session, task: ReviewTask, decision: str, update: Update,
                          user_data: dict[str, Any]) -> None:
    """Accept AI / Amend on a claimed task: a fresh draft, then the next question."""
    draft = _start_draft(c, session, task, decision)
    if decision == "accept" and not draft["condition"]:
        await _reply(update, "There is no AI assessment to accept; use Amend.", _claimed_keyboard(task.id))
        return
    user_data[DRAFT] = draft
    if decision == "accept":
        await _reply(update, f"Accept: {tr.condition_label(draft['condition'])}, urgency {draft['urgency']}. "
                             "Recommendation for the patient?", _recommendation_keyboard(task.id, draft["urgency"]))
        return
    labels = [(code, f"{tr.condition_label(code)} ({p:.0%})")
              for code, _, p in tr.latest_differential(c, session, task.case)[: tr.TOP_CONDITIONS]]
    await _reply(update, "Amend: choose the condition.", _choice_keyboard(task.id, labels, other=True))


# --- typed replies: a condition name or the TOTP code -----------------------------------------------
async def on_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    message = update.effective_message
    assert message is not None and message.text is not None
    user_data: dict[str, Any] = context.user_data  # type: ignore[assignment]
    draft = user_data.get(DRAFT) or {}
    if draft.get("awaiting") not in ("condition", "totp"):
        return  # not asked for anything: the patient conversation may handle it
    c = _clinic()
    with c.session() as session:
        clinician = _linked(session, update)
        task = session.get(ReviewTask, uuid.UUID(hex=draft["task"]))
        if clinician is None or task is None:
            user_data.pop(DRAFT, None)
            return
        if task.status != "open" or not review.holds_claim(task, clinician.id):
            user_data.pop(DRAFT, None)
            await message.reply_text("Your claim on this case ended; nothing was signed. Press View to claim it again.")
            raise ApplicationHandlerStop
        if draft["awaiting"] == "condition":
            await _search(draft, message.text, task, update, user_data)
        else:
            outcome = tr.check_code(c, session, clinician, message.text)
            session.commit()
            if outcome == "ok":
                draft["awaiting"] = None
                await _sign(c, session, clinician, task, draft, update, user_data)
            elif outcome == "locked":
                user_data.pop(DRAFT, None)
                await message.reply_text("Too many wrong codes: the account is locked for 15 minutes. Not signed.")
            else:
                await message.reply_text("Wrong or expired code; not signed. Send the current code to try again.")
    raise ApplicationHandlerStop


async def _search(draft: dict[str, Any], text: str, task: ReviewTask, update: Update, user_data: dict[str, Any]) -> None:
    from inference.vocabulary import load_vocabulary

    found = load_vocabulary().search(text.strip()[:100], "en")[:MAX_SEARCH_RESULTS]
    if not found:
        await update.effective_message.reply_text(  # type: ignore[union-attr]
            "No condition in the vocabulary matches that; type another name.")
        return
    draft.update(choices=[condition.code for condition in found], awaiting=None)
    user_data[DRAFT] = draft
    await _reply(update, "Choose the condition:",
                 _choice_keyboard(task.id, [(cond.code, cond.name("en")) for cond in found], other=True))


def register(app: Application) -> None:
    """Clinician handlers, in a group that runs before the patient handlers."""
    app.add_handler(CommandHandler("start", cmd_start, filters=LINKED), group=GROUP)
    app.add_handler(CommandHandler("queue", cmd_queue, filters=LINKED), group=GROUP)
    app.add_handler(CallbackQueryHandler(on_button, pattern=r"^cr:"), group=GROUP)
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND & LINKED, on_text), group=GROUP)


def start_pusher(app: Application, interval_s: float) -> asyncio.Task:
    pusher = ReviewPusher(app.bot, app.clinic, interval_s=interval_s)  # type: ignore[attr-defined]
    return asyncio.get_running_loop().create_task(pusher.run(), name="review-pusher")
