"""The patient conversation: consent, photos, history questions, result buttons, /history, /delete.

Conversation state lives in ``context.user_data`` (persisted sealed in the database by
:class:`bot.persistence.SqlPersistence`) and is only created after consent:

    step "photos"   -> collecting photos for user_data["case_id"]
    step "history"  -> answering question user_data["q"] (index into QUESTIONS)
    step "submitted"-> case handed to the AI pipeline; results arrive through the outbox
    step "followup" -> the next text is a question about user_data["followup_case"]
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from sqlalchemy import delete, select
from telegram import InlineKeyboardButton, InlineKeyboardMarkup, Message, Update
from telegram.constants import ChatAction
from telegram.ext import (
    Application,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)

from bot.i18n import LANGUAGES, t
from bot.patients import Who, own_case, who
from bot.persistence import purge_user
from bot.photos import Intake, photo_count, take_photo
from clinic_db import audit, cases, patients, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic, get_clinic
from clinic_db.models import Case, CaseMessage, KeyValue, ReviewTask
from clinic_db.states import CaseStatus
from inference.triage import PATIENT_REQUESTED

log = logging.getLogger(__name__)

CONSENT_VERSION = "2026-11-v1"
NS_PROGRESS = "bot_progress"  # case id -> Telegram message id of its progress message (bot.sender)

# (history field, answer codes, optional?) asked in this order; answers are stored as the codes
QUESTIONS: list[tuple[str, list[str], bool]] = [
    ("body_site", ["face", "scalp", "neck", "chest", "back", "abdomen", "arm", "hand", "leg", "foot", "genital", "other"], False),
    ("duration", ["days", "weeks", "months", "years"], False),
    ("itch", ["yes", "no"], False),
    ("bleeding", ["yes", "no"], False),
    ("growth", ["yes", "no", "unsure"], False),
    ("pain", ["yes", "no"], False),
    ("prior_treatment", ["none", "cream", "medicine", "procedure"], False),
    ("fitzpatrick", ["I", "II", "III", "IV", "V", "VI"], True),
]
ALBUM_SETTLE_S = 1.5  # wait this long after an album's last photo before one acknowledgement


def clinic() -> Clinic:
    return get_clinic()


def _who(update: Update) -> Who:
    user = update.effective_user
    assert user is not None
    with clinic().session() as session:
        return who(clinic(), session, user.id, user.language_code)


def _rows(buttons: list[InlineKeyboardButton], per_row: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([buttons[i : i + per_row] for i in range(0, len(buttons), per_row)])


def result_buttons(lang: str, case_id: uuid.UUID | str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([
        [InlineKeyboardButton(t(lang, "button.ask"), callback_data=f"c:ask:{case_id}")],
        [InlineKeyboardButton(t(lang, "button.doctor"), callback_data=f"c:doc:{case_id}")],
        [InlineKeyboardButton(t(lang, "button.new"), callback_data="c:new")],
    ])


# --- consent and language -------------------------------------------------------------------------
def consent_keyboard(lang: str) -> InlineKeyboardMarkup:
    # the language travels in the button: nothing about the person is stored before they accept
    return InlineKeyboardMarkup([[
        InlineKeyboardButton(t(lang, "start.accept"), callback_data=f"consent:yes:{lang}"),
        InlineKeyboardButton(t(lang, "start.decline"), callback_data=f"consent:no:{lang}"),
    ]])


async def cmd_start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = _who(update)
    assert update.effective_message is not None
    if me.consented:
        await update.effective_message.reply_text(t(me.lang, "start.already"))
        return
    await update.effective_message.reply_text(
        t(me.lang, "start.intro", version=CONSENT_VERSION), reply_markup=consent_keyboard(me.lang)
    )


async def on_consent(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    assert query is not None and query.data is not None and update.effective_user is not None
    _, answer, lang = query.data.split(":", 2)
    lang = lang if lang in LANGUAGES else "en"
    await query.answer()
    if answer != "yes":
        await query.edit_message_reply_markup(None)
        await query.message.reply_text(t(lang, "start.declined"))  # type: ignore[union-attr]
        return
    c = clinic()
    with c.session() as session:
        patients.register(c, session, update.effective_user.id, language=lang, consent_version=CONSENT_VERSION)
        session.commit()
    await query.edit_message_reply_markup(None)
    await query.message.reply_text(t(lang, "start.accepted"))  # type: ignore[union-attr]


async def cmd_language(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = _who(update)
    keyboard = InlineKeyboardMarkup([[
        InlineKeyboardButton("English", callback_data="lang:en"),
        InlineKeyboardButton("Deutsch", callback_data="lang:de"),
    ]])
    await update.effective_message.reply_text(t(me.lang, "language.choose"), reply_markup=keyboard)  # type: ignore[union-attr]


async def on_language(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    assert query is not None and query.data is not None and update.effective_user is not None
    lang = query.data.split(":", 1)[1]
    if lang not in LANGUAGES:
        await query.answer()
        return
    await query.answer()
    c = clinic()
    with c.session() as session:
        patient = patients.find_by_telegram(c, session, update.effective_user.id)
        if patient is not None:
            patient.language = lang
            session.commit()
    await query.edit_message_reply_markup(None)
    await query.message.reply_text(t(lang, "language.set"))  # type: ignore[union-attr]
    if patient is None or not patient.has_consent:  # not registered: show the consent text again, in that language
        await query.message.reply_text(  # type: ignore[union-attr]
            t(lang, "start.intro", version=CONSENT_VERSION), reply_markup=consent_keyboard(lang)
        )


async def cmd_help(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = _who(update)
    await update.effective_message.reply_text(t(me.lang, "help.text"))  # type: ignore[union-attr]


async def _need_consent(update: Update, me: Who, key: str = "consent.needed") -> bool:
    """Without consent nothing is kept; ``key`` says so in words that fit what the person sent."""
    if me.consented:
        return False
    await update.effective_message.reply_text(t(me.lang, key))  # type: ignore[union-attr]
    return True


# --- cases and photos -----------------------------------------------------------------------------
def _start_case(user_data: dict) -> None:
    """Collect photos for a new case. The case row is opened with its first stored photo
    (bot.photos.take_photo), so a refused upload never leaves an empty case."""
    user_data.clear()
    user_data.update({"step": "photos"})


async def cmd_new(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = _who(update)
    if await _need_consent(update, me):
        return
    _start_case(context.user_data)  # type: ignore[arg-type]
    await update.effective_message.reply_text(t(me.lang, "case.opened"))  # type: ignore[union-attr]


def _current_case_for_photos(me: Who, user_data: dict) -> uuid.UUID | None:
    """The case new photos belong to: the open one still collecting (status received), else None."""
    case_id = user_data.get("case_id")
    if not case_id or user_data.get("step") not in ("photos", "history"):
        return None
    with clinic().session() as session:
        case = own_case(session, me.patient, case_id)  # type: ignore[arg-type]
        if case is None or case.status != CaseStatus.received.value:
            return None
        return case.id


def _continue_keyboard(lang: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[InlineKeyboardButton(t(lang, "photo.continue"), callback_data="photos:done")]])


async def on_photo(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    message = update.effective_message
    assert message is not None
    me = _who(update)
    if await _need_consent(update, me):
        return
    # one photo of a user at a time: the first stored photo opens the case, the next must find it
    async with _photo_locks.setdefault(me.patient.id, asyncio.Lock()):  # type: ignore[union-attr]
        await _take(update, context, me, message)


_photo_locks: dict[uuid.UUID, asyncio.Lock] = {}  # per patient, in memory (a few hundred bytes each)


async def _take(update: Update, context: ContextTypes.DEFAULT_TYPE, me: Who, message: Message) -> None:
    user_data: dict = context.user_data  # type: ignore[assignment]
    info_case = None
    case_id = _current_case_for_photos(me, user_data)
    if case_id is None and user_data.get("step") != "photos":  # /new was not sent: maybe an answer
        info_case = _info_case(me, message.message_id)  # a dermatologist asked for more: the photo belongs there
        case_id = info_case
    await context.bot.send_chat_action(message.chat_id, ChatAction.TYPING)
    intake = await take_photo(context, clinic(), message, case_id, me.patient.id)  # type: ignore[union-attr]
    if not intake.stored:
        await message.reply_text(_rejection_text(me.lang, intake))
        return
    if info_case is not None:
        await _answer_info_request(update, me, text=message.caption or "[photo]")
        return
    case_id = intake.case_id or case_id
    if user_data.get("case_id") != str(case_id):  # this photo opened the case
        user_data.clear()
        user_data.update({"step": "photos", "case_id": str(case_id)})
    if message.caption:  # words sent with a photo belong to the case too
        _add_note(me, case_id, message.caption, message_id=message.message_id)  # type: ignore[arg-type]
    if message.media_group_id:
        _album_ack(context, message, me.lang, case_id)  # type: ignore[arg-type]
        return
    count = photo_count(clinic(), case_id)  # type: ignore[arg-type]
    lines = [t(me.lang, "photo.saved", count=count)]
    if intake.advisories:  # stored all the same: a small photo is advice to retake, not a refusal
        lines.insert(0, t(me.lang, "photo.small_tip"))
    await message.reply_text("\n".join(lines), reply_markup=_continue_keyboard(me.lang))


def _rejection_text(lang: str, intake: Intake) -> str:
    """Why the file was not saved, in the photo gate's own words (inference.quality.tip)."""
    from inference import quality

    if intake.rejected_code:
        return quality.tip(intake.rejected_code, lang)
    return "\n".join([t(lang, "photo.not_saved"), *(quality.tip(code, lang) for code in intake.problems)])


# One acknowledgement per album: each photo is stored as it arrives; the answer waits for the last.
_albums: dict[str, tuple[int, asyncio.Task]] = {}


def _album_ack(context: ContextTypes.DEFAULT_TYPE, message: Message, lang: str, case_id: uuid.UUID) -> None:
    group = str(message.media_group_id)
    seen, pending = _albums.get(group, (0, None))  # type: ignore[assignment]
    if pending is not None:
        pending.cancel()

    async def settle() -> None:
        await asyncio.sleep(ALBUM_SETTLE_S)
        n, _ = _albums.pop(group, (seen + 1, None))
        count = photo_count(clinic(), case_id)
        await context.bot.send_message(
            message.chat_id, t(lang, "photo.album_saved", n=n, count=count), reply_markup=_continue_keyboard(lang)
        )

    _albums[group] = (seen + 1, asyncio.get_running_loop().create_task(settle()))


async def on_photos_done(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    assert query is not None
    me = _who(update)
    user_data: dict = context.user_data  # type: ignore[assignment]
    if not me.consented or user_data.get("step") != "photos":
        await query.answer(t(me.lang, "history.stale"))
        return
    case_id = uuid.UUID(user_data["case_id"])
    if photo_count(clinic(), case_id) == 0:
        await query.answer(t(me.lang, "photo.need_one"))
        return
    await query.answer()
    await query.edit_message_reply_markup(None)
    user_data.update({"step": "history", "q": 0})
    await query.message.reply_text(t(me.lang, "history.intro"))  # type: ignore[union-attr]
    await _ask(query.message, me.lang, 0)  # type: ignore[arg-type]


# --- history questions -----------------------------------------------------------------------------
async def _ask(message: Message, lang: str, index: int) -> None:
    field, answers, optional = QUESTIONS[index]
    buttons = [InlineKeyboardButton(t(lang, f"history.a.{a}"), callback_data=f"h:{field}:{a}") for a in answers]
    if optional:
        buttons.append(InlineKeyboardButton(t(lang, "history.a.skip"), callback_data=f"h:{field}:skip"))
    per_row = 1 if field == "fitzpatrick" else 3 if len(answers) > 4 else len(answers)
    await message.chat.send_message(t(lang, f"history.q.{field}"), reply_markup=_rows(buttons, per_row))


async def on_history_answer(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    assert query is not None and query.data is not None
    me = _who(update)
    user_data: dict = context.user_data  # type: ignore[assignment]
    _, field, answer = query.data.split(":", 2)
    index = user_data.get("q", -1)
    if not me.consented or user_data.get("step") != "history" or not (0 <= index < len(QUESTIONS)) \
            or QUESTIONS[index][0] != field or (answer not in QUESTIONS[index][1] and answer != "skip"):
        await query.answer(t(me.lang, "history.stale"))
        return
    c = clinic()
    with c.session() as session:  # closed before any await: many handlers run at once, each needs a connection
        case = own_case(session, me.patient, user_data.get("case_id"))  # type: ignore[arg-type]
        if case is not None:
            if answer != "skip":
                cases.set_history(c, session, case, **{field: answer})
                audit.record(session, Actor("patient", str(case.patient_id)), "case.history", "Case", case.id,
                             field=field)
            if index + 1 == len(QUESTIONS):
                from inference import pipeline

                # with the last answer: a bot that dies before submitting leaves the sweeper a case to submit
                pipeline.mark_history_complete(session, case)
            session.commit()
    if case is None:
        await query.answer(t(me.lang, "history.stale"))
        return
    await query.answer()
    answered = t(me.lang, "history.answered", question=t(me.lang, f"history.q.{field}"),
                 answer=t(me.lang, f"history.a.{answer}"))
    if index + 1 < len(QUESTIONS):
        await query.edit_message_text(answered)
        user_data["q"] = index + 1
        await _ask(query.message, me.lang, index + 1)  # type: ignore[arg-type]
        return
    # the last answer: the case goes to the pipeline before anything is sent (the wait for the result starts
    # here, and Telegram's rate limit can hold a message back), then one edit both records the answer and
    # says so; the pipeline's progress message comes below it, whichever arrives first
    await submit(user_data["case_id"])
    user_data.update({"step": "submitted", "q": len(QUESTIONS)})
    await query.edit_message_text(f"{answered}\n\n{t(me.lang, 'history.done')}")


async def submit(case_id: str) -> None:
    """Hand the case to the pipeline. The pipeline writes the progress message to the outbox."""
    from inference import pipeline

    try:
        await asyncio.to_thread(pipeline.submit_case, case_id)
    except Exception:
        # If the case moved to queued, the commit happened and only the broker hand-off failed:
        # the sweeper re-enqueues stuck cases. Otherwise the patient must hear that it failed.
        with clinic().session() as session:
            case = cases.get_case(session, case_id)
            if case is None or case.status == CaseStatus.received.value:
                raise
        log.exception("case %s queued but its chain was not enqueued; the sweeper will retry", case_id)


# --- result buttons and follow-up questions ------------------------------------------------------
async def on_case_button(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    assert query is not None and query.data is not None
    me = _who(update)
    user_data: dict = context.user_data  # type: ignore[assignment]
    parts = query.data.split(":", 2)
    if not me.consented:
        await query.answer()
        await _need_consent(update, me)
        return
    if parts[1] == "new":
        await query.answer()
        _start_case(user_data)
        await query.message.reply_text(t(me.lang, "case.opened"))  # type: ignore[union-attr]
        return
    with clinic().session() as session:
        case = own_case(session, me.patient, parts[2] if len(parts) > 2 else None)  # type: ignore[arg-type]
        case_id = None if case is None else str(case.id)
    if case_id is None:
        await query.answer(t(me.lang, "history.stale"))
        return
    if parts[1] == "ask":
        user_data.update({"step": "followup", "followup_case": case_id})
        await query.answer()
        await query.message.reply_text(t(me.lang, "followup.prompt"))  # type: ignore[union-attr]
    elif parts[1] == "doc":
        from inference import pipeline

        await asyncio.to_thread(pipeline.request_review, case_id, PATIENT_REQUESTED)
        await query.answer(t(me.lang, "doctor.requested"), show_alert=False)
    else:
        await query.answer()


MAX_PATIENT_TEXT = 4096  # Telegram's own limit for one message: anything the Bot API delivers is kept whole


def _made_by(session, me: Who, message_id: int) -> CaseMessage | None:  # type: ignore[no-untyped-def]
    """The case message this Telegram message already made: the update is being replayed after a bot
    was killed between its commit and marking the update handled."""
    return session.scalar(select(CaseMessage).where(
        CaseMessage.patient_id == me.patient.id, CaseMessage.role == "patient",  # type: ignore[union-attr]
        CaseMessage.telegram_message_id == message_id))


def _add_note(me: Who, case_id: uuid.UUID | str, text: str, *, message_id: int, question: bool = False) -> uuid.UUID:
    """Keep the patient's words on the case (encrypted, audited): the dermatologist reads them in
    the case's conversation. A ``question`` is one for the follow-up path (no "note" flag). A replayed
    message (``message_id``) gets back the row it made the first time."""
    c = clinic()
    assert me.patient is not None
    with c.session() as session:
        made = _made_by(session, me, message_id)
        if made is not None:
            return made.id
        row = CaseMessage(case_id=uuid.UUID(str(case_id)), patient_id=me.patient.id, role="patient",
                          flags=[] if question else ["note"], telegram_message_id=message_id)
        row.ensure_id()
        c.vault.set_text(session, row, "text", text, owner=me.patient.id)
        session.add(row)
        audit.record(session, Actor("patient", str(me.patient.id)), "case_message.create", "CaseMessage", row.id,
                     case=str(case_id), reason="followup" if question else "note")
        session.commit()
        return row.id


async def _ask_followup(message: Message, me: Who, user_data: dict, case_id: str, text: str) -> None:
    """A question about a case that has a result: the follow-up path answers it."""
    message_id = _add_note(me, case_id, text, message_id=message.message_id, question=True)
    user_data.update({"step": "submitted", "case_id": case_id})
    await message.reply_text(t(me.lang, "followup.received"))
    from inference import pipeline

    await asyncio.to_thread(pipeline.submit_followup, case_id, str(message_id))


def _case_for_text(me: Who, user_data: dict) -> Case | None:
    """The case free text belongs to: the one this chat is about, else the patient's newest."""
    with clinic().session() as session:
        for key in ("followup_case", "case_id"):
            case = own_case(session, me.patient, user_data.get(key))  # type: ignore[arg-type]
            if case is not None:
                return case
        return session.scalar(select(Case).where(Case.patient_id == me.patient.id)  # type: ignore[union-attr]
                              .order_by(Case.created_at.desc()).limit(1))


async def on_text(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    """Free text is part of the case: a note while collecting photos and answers, a message to the
    dermatologist while the case waits for review, a question once it has a result. Only without
    any case does the bot suggest /new."""
    message = update.effective_message
    assert message is not None and message.text is not None
    me = _who(update)
    if await _need_consent(update, me, "consent.needed_text"):
        return
    user_data: dict = context.user_data  # type: ignore[assignment]
    text = message.text
    if len(text) > MAX_PATIENT_TEXT:
        await message.reply_text(t(me.lang, "note.too_long", limit=MAX_PATIENT_TEXT))
        return
    if await _answer_info_request(update, me, text=text):
        return
    step = user_data.get("step")
    if step == "photos" and not user_data.get("case_id"):  # /new, no photo yet: nothing to attach to
        await message.reply_text(t(me.lang, "photo.need_one"))
        return
    case = _case_for_text(me, user_data)
    status = None if case is None else case.status
    if case is None or status in (CaseStatus.failed.value, CaseStatus.withdrawn.value):
        await message.reply_text(t(me.lang, "fallback.text"))
        return
    case_id = str(case.id)
    if (step == "followup" and user_data.get("followup_case") == case_id) or status in SIGNED_OR_PRELIMINARY:
        await _ask_followup(message, me, user_data, case_id, text)
        return
    _add_note(me, case_id, text, message_id=message.message_id)
    if status == CaseStatus.received.value:
        key = "note.saved_history" if step == "history" else "note.saved_photos"
        markup = _continue_keyboard(me.lang) if key == "note.saved_photos" and photo_count(clinic(), case.id) else None
        await message.reply_text(t(me.lang, key), reply_markup=markup)
        index = user_data.get("q", -1)
        if step == "history" and 0 <= index < len(QUESTIONS):
            # the open question again, with its buttons: whatever happened to the last copy (scrolled away, or
            # never sent because a handler failed after saving the previous answer), the patient can go on
            await _ask(message, me.lang, index)
    elif status == CaseStatus.in_review.value:
        await message.reply_text(t(me.lang, "note.to_dermatologist"))
    else:  # queued / analysing: the result follows; the note is there for a dermatologist
        await message.reply_text(t(me.lang, "note.saved_waiting"))


SIGNED_OR_PRELIMINARY = (CaseStatus.preliminary.value, CaseStatus.final.value, CaseStatus.amended.value)


# --- answers to a dermatologist's "request_info" -----------------------------------------------------
def _waiting_task(session, patient_id: uuid.UUID) -> ReviewTask | None:  # type: ignore[no-untyped-def]
    return session.scalar(
        select(ReviewTask).join(Case).where(Case.patient_id == patient_id, ReviewTask.status == "waiting_patient")
        .order_by(ReviewTask.created_at.desc()).limit(1)
    )


def _info_case(me: Who, message_id: int) -> uuid.UUID | None:
    """The case a dermatologist asked this patient about, if one is waiting for an answer, or the one
    this message already answered (a replay)."""
    with clinic().session() as session:
        made = _made_by(session, me, message_id)
        if made is not None and "info_reply" in made.flags:
            return made.case_id
        task = _waiting_task(session, me.patient.id)  # type: ignore[union-attr]
        return None if task is None else task.case_id


async def _answer_info_request(update: Update, me: Who, *, text: str) -> bool:
    """Store the patient's reply on the case and put the task back in the dermatologist's queue."""
    c = clinic()
    message = update.effective_message
    assert message is not None
    with c.session() as session:
        made = _made_by(session, me, message.message_id)
        if made is not None:  # a replay: the reply is stored and the task back in the queue already
            replied = "info_reply" in made.flags
        else:
            replied = _store_info_reply(c, session, me, text, message.message_id)
    if replied:
        await message.reply_text(t(me.lang, "request_info.received"))
    return replied


def _store_info_reply(c: Clinic, session, me: Who, text: str, message_id: int) -> bool:  # type: ignore[no-untyped-def]
    """Keep the reply to a dermatologist's question, if one waits for this patient, and put the task
    back in the queue (committed). False when no question waits."""
    task = _waiting_task(session, me.patient.id)  # type: ignore[union-attr]
    if task is None:
        return False
    row = CaseMessage(case_id=task.case_id, patient_id=me.patient.id, role="patient", flags=["info_reply"],  # type: ignore[union-attr]
                      telegram_message_id=message_id)
    row.ensure_id()
    c.vault.set_text(session, row, "text", text, owner=me.patient.id)  # type: ignore[union-attr]
    session.add(row)
    review.patient_replied(session, task.case_id)  # back to the dermatologist who asked
    audit.record(session, Actor("patient", str(me.patient.id)), "case_message.create", "CaseMessage", row.id,  # type: ignore[union-attr]
                 case=str(task.case_id), reason="request_info")
    session.commit()
    return True


# --- /history and /delete -------------------------------------------------------------------------
async def cmd_history(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = _who(update)
    if await _need_consent(update, me, "history.no_consent"):
        return
    with clinic().session() as session:
        patient = session.merge(me.patient)
        rows = sorted(patient.cases, key=lambda case: case.created_at, reverse=True)
        lines = [
            t(me.lang, "history.list_item", date=case.created_at.strftime("%Y-%m-%d"), status=t(me.lang, f"status.{case.status}"))
            for case in rows
        ]
    text = t(me.lang, "history.list_title") + "\n" + "\n".join(lines) if lines else t(me.lang, "history.empty")
    await update.effective_message.reply_text(text)  # type: ignore[union-attr]


async def cmd_delete(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    me = _who(update)
    if me.patient is None:
        await update.effective_message.reply_text(t(me.lang, "delete.nothing"))  # type: ignore[union-attr]
        return
    keyboard = InlineKeyboardMarkup([[
        InlineKeyboardButton(t(me.lang, "delete.yes"), callback_data="del:yes"),
        InlineKeyboardButton(t(me.lang, "delete.no"), callback_data="del:no"),
    ]])
    await update.effective_message.reply_text(t(me.lang, "delete.confirm"), reply_markup=keyboard)  # type: ignore[union-attr]


async def on_delete(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
    query = update.callback_query
    assert query is not None and query.data is not None and update.effective_user is not None
    me = _who(update)
    await query.answer()
    await query.edit_message_reply_markup(None)
    if query.data != "del:yes":
        await query.message.reply_text(t(me.lang, "delete.cancelled"))  # type: ignore[union-attr]
        return
    if me.patient is None:
        await query.message.reply_text(t(me.lang, "delete.nothing"))  # type: ignore[union-attr]
        return
    c = clinic()
    with c.session() as session:
        case_ids = [str(case.id) for case in session.merge(me.patient).cases]
        patients.erase(c, session, me.patient.id, Actor("patient", str(me.patient.id)))
        session.execute(delete(KeyValue).where(KeyValue.namespace == NS_PROGRESS, KeyValue.key.in_(case_ids)))
        session.commit()
    context.application.drop_user_data(update.effective_user.id)
    purge_user(c, update.effective_user.id)
    await query.message.reply_text(t(me.lang, "delete.done"))  # type: ignore[union-attr]


def register(app: Application) -> None:
    app.add_handler(CommandHandler("start", cmd_start))
    app.add_handler(CommandHandler("help", cmd_help))
    app.add_handler(CommandHandler("language", cmd_language))
    app.add_handler(CommandHandler("new", cmd_new))
    app.add_handler(CommandHandler("history", cmd_history))
    app.add_handler(CommandHandler("delete", cmd_delete))
    app.add_handler(CallbackQueryHandler(on_consent, pattern=r"^consent:"))
    app.add_handler(CallbackQueryHandler(on_language, pattern=r"^lang:"))
    app.add_handler(CallbackQueryHandler(on_photos_done, pattern=r"^photos:done$"))
    app.add_handler(CallbackQueryHandler(on_history_answer, pattern=r"^h:"))
    app.add_handler(CallbackQueryHandler(on_case_button, pattern=r"^c:"))
    app.add_handler(CallbackQueryHandler(on_delete, pattern=r"^del:"))
    app.add_handler(MessageHandler(filters.PHOTO | filters.Document.ALL, on_photo))
    app.add_handler(MessageHandler(filters.TEXT & ~filters.COMMAND, on_text))
