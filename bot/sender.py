"""Deliver the outbox to patients (at least once).

Progress, results, follow-up answers and dermatologist messages are written to the outbox by the
pipeline and the console in the same transaction as the state change; this loop polls
``outbox.due``, renders each message in the patient's language, sends it, and only then marks it
sent. A crash between sending and marking re-sends on restart (at-least-once); the progress
message is edited in place, its Telegram message id kept in the ``kv`` table.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from sqlalchemy.orm import Session
from telegram import Bot, InputMediaPhoto
from telegram.error import BadRequest, Forbidden, TelegramError

from bot.handlers import NS_PROGRESS, result_buttons
from bot.i18n import pick_language, t
from bot.lanes import Lanes
from bot.render import condition_name, final_text, followup_text, result_text, review_requested_text
from clinic_db import audit, cases, outbox, patients, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import Case, CaseMessage, KeyValue, OutboxMessage, Patient, ReviewTask
from clinic_db.states import CaseStatus

log = logging.getLogger(__name__)
# The pipeline's messages are written by worker processes: the sender looks for due ones this often (one
# indexed query); a failed read waits ``interval_s``.
POLL_S = 0.1
# Sends at once. A send keeps its session's read transaction, so a database connection, while Telegram (or
# the rate limiter) makes it wait: with 32 at once the bot's pool (15 on SQLite) ran dry and the event loop
# blocked on it for 30 s at a time. Four keep a slow patient from holding up the others, well inside the pool.
SENDS_AT_ONCE = 4


class OutboxSender:
    """Each patient's messages in the order they were written, several patients' side by side (up to
    SENDS_AT_ONCE sends at once), each started as soon as a read sees it (:class:`bot.lanes.Lanes`)."""

    def __init__(self, bot: Bot, clinic: Clinic, interval_s: float = 1.0):
        self.bot = bot
        self.clinic = clinic
        self.interval_s = interval_s
        self._sending = asyncio.Semaphore(SENDS_AT_ONCE)
        self.lanes: Lanes[uuid.UUID] = Lanes(self._deliver_in_turn, hold_s=interval_s)

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.offer_due()
                    pause = POLL_S
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the loop must survive a DB hiccup
                    log.exception("outbox read failed")
                    pause = self.interval_s
                await asyncio.sleep(pause)
        finally:
            await self.lanes.close()  # messages in hand stay pending: sent on the next start

    async def offer_due(self) -> int:
        """Start the due messages not in hand yet; returns how many were started."""
        self.lanes.reading()
        with self.clinic.session() as session:
            due = [(msg.patient_id, msg.id) for msg in outbox.due(session, limit=self.lanes.in_hand + 50)]
        return sum(self.lanes.offer(patient_id, msg_id, msg_id) for patient_id, msg_id in due)

    async def _deliver_in_turn(self, msg_id: uuid.UUID) -> bool:
        async with self._sending:
            try:
                await self.deliver(msg_id)
            except Exception as exc:  # noqa: BLE001 - one bad message never stops the others
                log.exception("outbox %s: delivery failed", msg_id)
                self._count_failure(msg_id, type(exc).__name__)  # the text may name patient data
        return True

    def _count_failure(self, msg_id: uuid.UUID, error: str) -> None:
        """A message that broke the sender (not Telegram) is tried again later, then given up on
        (clinic_db.outbox.mark_failed), instead of being picked up again at once."""
        try:
            with self.clinic.session() as session:
                msg = session.get(OutboxMessage, msg_id)
                if msg is not None and msg.status == "pending":
                    outbox.mark_failed(session, msg, error)
                    session.commit()
        except Exception:  # noqa: BLE001 - the database itself is down: the next read tries again
            log.warning("outbox %s: failure not recorded", msg_id, exc_info=True)

    async def deliver(self, msg_id: uuid.UUID) -> None:
        with self.clinic.session() as session:
            msg = session.get(OutboxMessage, msg_id)
            if msg is None or msg.status != "pending":
                return
            patient = session.get(Patient, msg.patient_id)
            if patient is None or not patient.has_consent:
                msg.status = "dead"
                msg.last_error = "no consenting patient"
                session.commit()
                return
            chat_id = patients.telegram_id(self.clinic, session, patient)
            lang = pick_language(patient.language)
            session.commit()  # end the read transaction: nothing is held while Telegram answers (or a 429 waits)
            try:
                # writes made while rendering (read audits, the progress message id) stay in the session and
                # reach the database in the one short commit after the send: on SQLite a flushed write would
                # hold the database's write lock through the network wait and block every other process
                with session.no_autoflush:
                    await self._send(session, msg.kind, outbox.payload(self.clinic, session, msg), chat_id, lang,
                                     patient)
            except Forbidden as exc:  # the patient blocked the bot: retrying soon will not help
                outbox.mark_failed(session, msg, f"forbidden: {exc.message}")
                session.commit()
                return
            except TelegramError as exc:
                log.warning("outbox %s (%s) not delivered: %s", msg.id, msg.kind, exc)
                outbox.mark_failed(session, msg, str(exc))
                session.commit()
                return
            outbox.mark_sent(session, msg.id)
            audit.record(session, Actor.system("bot"), "outbox.deliver", "OutboxMessage", msg.id,
                         kind=msg.kind, case=str(msg.case_id) if msg.case_id else None)
            session.commit()

    # --- per kind ---------------------------------------------------------------------------------
    async def _send(self, session: Session, kind: str, payload: dict[str, Any], chat_id: int, lang: str,
                    patient: Patient) -> None:
        case = session.get(Case, uuid.UUID(payload["case_id"])) if payload.get("case_id") else None
        if case is not None and case.patient_id != patient.id:
            raise PermissionError("outbox message names another patient's case")
        if kind == "progress":
            await self._progress(session, chat_id, lang, payload["case_id"], payload["stage"])
        elif kind == "result":
            await self._result(session, chat_id, lang, case)
        elif kind == "pictures":
            await self._pictures(session, chat_id, lang, case)
        elif kind == "followup_answer":
            row = session.get(CaseMessage, uuid.UUID(payload["message_id"]))
            if row is None or row.patient_id != patient.id:
                raise LookupError("follow-up answer is gone")
            text = self.clinic.vault.get_text(session, row, "text", owner=patient.id) or ""
            audit.record(session, Actor("patient", str(patient.id)), "case_message.read", "CaseMessage", row.id)
            # a red-flag answer says itself what to do now (inference.followup); any other answer in an
            # emergency case gets "seek care now" first
            urgency = None if case is None or "red_flag" in (row.flags or []) else review.urgency_now(session, case)
            await self.bot.send_message(chat_id, followup_text(lang, text, urgency),
                                        reply_markup=result_buttons(lang, payload["case_id"]))
        elif kind == "review_requested":
            urgency = None if case is None else review.urgency_now(session, case)
            await self.bot.send_message(chat_id, review_requested_text(lang, urgency))
        elif kind in ("final", "request_info"):
            await self._clinician(session, chat_id, lang, kind, payload, patient)
        elif kind == "failed":  # the reason code is for operators (logs, console), never for the patient
            await self.bot.send_message(chat_id, t(lang, "failed.text"))
        else:
            raise ValueError(f"unknown outbox kind {kind}")

    async def _progress(self, session: Session, chat_id: int, lang: str, case_id: str, stage: str) -> None:
        text = t(lang, f"progress.{stage}")
        row = session.get(KeyValue, (NS_PROGRESS, case_id))
        if row is not None and row.value:
            try:
                await self.bot.edit_message_text(text, chat_id=chat_id, message_id=int(row.value["message_id"]))
                return
            except BadRequest as exc:
                if "not modified" in exc.message.lower():
                    return  # re-delivery after a crash: the text is already there
                log.info("progress message could not be edited (%s); sending a new one", exc.message)
        sent = await self.bot.send_message(chat_id, text)
        if row is None:
            session.add(KeyValue(namespace=NS_PROGRESS, key=case_id, value={"message_id": sent.message_id}))
        else:
            row.value = {"message_id": sent.message_id}
        session.flush()

    async def _result(self, session: Session, chat_id: int, lang: str, case: Case | None) -> None:
        if case is None:
            raise LookupError("result for a case that is gone")
        chosen = cases.preferred_result(session, case)
        differential: list[dict[str, Any]] = []
        if chosen is not None:
            differential = self.clinic.vault.get_json(session, chosen, "differential", owner=case.patient_id) or []
            audit.record(session, Actor("patient", str(case.patient_id)), "ai_result.read", "AIResult", chosen.id,
                         case=str(case.id))
        in_review = case.status == CaseStatus.in_review.value
        await self.bot.send_message(chat_id, result_text(lang, differential, case.urgency or "routine",
                                                         in_review=in_review,
                                                         flags=(chosen.flags or []) if chosen is not None else []),
                                    reply_markup=result_buttons(lang, case.id))

    async def _pictures(self, session: Session, chat_id: int, lang: str, case: Case | None) -> None:
        """The AI-generated example pictures: their own message, after the result (drawn after it)."""
        if case is None:
            raise LookupError("pictures for a case that is gone")
        media = []
        for image in case.explanation_images:
            data = self.clinic.vault.decrypt(session, image, "data", owner=case.patient_id)
            caption = t(lang, "result.example_caption", name=condition_name(lang, image.condition_code))
            media.append(InputMediaPhoto(data, caption=caption))
        if media:
            await self.bot.send_media_group(chat_id, media[:10])

    async def _clinician(self, session: Session, chat_id: int, lang: str, kind: str, payload: dict[str, Any],
                         patient: Patient) -> None:
        task = session.get(ReviewTask, uuid.UUID(payload["task_id"]))
        if task is None or task.case.patient_id != patient.id:
            raise LookupError("review task is gone")
        note = self.clinic.vault.get_text(session, task, "note", owner=patient.id)
        audit.record(session, Actor("patient", str(patient.id)), "review.read", "ReviewTask", task.id)
        if kind == "request_info":
            await self.bot.send_message(chat_id, t(lang, "request_info.text", note=note or ""))
            return
        await self.bot.send_message(chat_id, final_text(
            lang, condition_code=task.decision_condition_code, urgency=task.decision_urgency,
            recommendation=task.recommendation, note=note))
