"""Photo intake: download from Telegram, safe decode + quality check, store encrypted.

A photo is stored (and committed) before the patient is told it was received, so a crash after
the acknowledgement can never lose it. ``source_ref`` (Telegram file_unique_id + case) makes a
re-delivered update store nothing twice. A photo that starts a case opens it in the same
transaction that stores it: a refused upload leaves no empty case behind. The case keeps that
message's id, so a bot killed after the commit but before it saved the conversation state replays
the message into the same case, not a second one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session
from telegram import Message
from telegram.error import BadRequest
from telegram.ext import ContextTypes

from clinic_db import cases
from clinic_db.db import Clinic
from clinic_db.models import Case, Image, Patient

log = logging.getLogger(__name__)

# Telegram's Bot API does not serve files above 20 MB; checking first avoids a pointless download.
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


@dataclass
class Intake:
    """What happened to one uploaded file."""

    stored: bool
    rejected_code: str | None = None  # PhotoRejected.code when the file is not a usable image
    problems: list[str] = field(default_factory=list)  # quality problem codes (blurry, too_dark, ...)
    image_id: uuid.UUID | None = None
    case_id: uuid.UUID | None = None  # the case the photo is stored in (new when it opened one)
    advisories: list[str] = field(default_factory=list)  # stored, with advice to retake (too_small)


def upload_of(message: Message) -> tuple[str, str, int | None, str | None] | None:
    """(file_id, file_unique_id, size, filename) of a photo or document message."""
    if message.photo:
        biggest = message.photo[-1]
        return biggest.file_id, biggest.file_unique_id, biggest.file_size, None
    if message.document:
        doc = message.document
        return doc.file_id, doc.file_unique_id, doc.file_size, doc.file_name
    return None


async def download(context: ContextTypes.DEFAULT_TYPE, file_id: str) -> bytes:
    tg_file = await context.bot.get_file(file_id)
    if tg_file.file_size is not None and tg_file.file_size > MAX_UPLOAD_BYTES:
        raise _TooLarge()
    return bytes(await tg_file.download_as_bytearray())


class _TooLarge(Exception):
    pass


def _store(clinic: Clinic, case_id: uuid.UUID | None, patient_id: uuid.UUID | None, raw: bytes,
           filename: str | None, unique_id: str, message_id: int) -> Intake:
    """Runs in a worker thread: decoding and re-encoding a photo is CPU work. ``case_id`` None opens
    a new case of ``patient_id`` together with the photo (message ``message_id``)."""
    from inference import quality

    try:
        clean = quality.sanitize(raw, filename)
    except quality.PhotoRejected as exc:
        return Intake(stored=False, rejected_code=exc.code)
    report = quality.assess(clean)
    if not report.ok:
        return Intake(stored=False, problems=list(report.problems))
    if clean.quality is None:
        clean = cases.CleanImage(clean.data, clean.mime, clean.width, clean.height, dict(report.metrics))
    with clinic.session() as session:
        if case_id is None:
            patient = session.get(Patient, patient_id)
            if patient is None:
                raise LookupError("patient vanished while a photo was being stored")
            case = cases.open_case(clinic, session, patient, opening_message_id=message_id)
        else:
            case = session.get(Case, case_id)
            if case is None:
                raise LookupError("case vanished while a photo was being stored")
        image = cases.add_image(clinic, session, case, clean, source_ref=f"{unique_id}:{case.id}")
        session.commit()
        return Intake(stored=True, image_id=image.id, case_id=case.id, advisories=report.advisories)


def _opened_by(session: Session, patient_id: uuid.UUID | None, message_id: int) -> Case | None:
    """The case this message's photo already opened (the message is being replayed), if any."""
    return session.scalar(select(Case).where(Case.patient_id == patient_id, Case.opening_message_id == message_id))


async def take_photo(
    context: ContextTypes.DEFAULT_TYPE, clinic: Clinic, message: Message, case_id: uuid.UUID | None,
    patient_id: uuid.UUID | None = None,
) -> Intake:
    """Store the message's photo in ``case_id``, or in a new case of ``patient_id`` when None."""
    upload = upload_of(message)
    if upload is None:
        return Intake(stored=False, rejected_code="not_an_image")
    file_id, unique_id, size, filename = upload
    with clinic.session() as session:  # a re-delivered update: already stored, just acknowledge again
        if case_id is None:  # the photo may have opened a case before the bot was killed
            opened = _opened_by(session, patient_id, message.message_id)
            case_id = None if opened is None else opened.id
        if case_id is not None and session.scalar(
                select(Image.id).where(Image.source_ref == f"{unique_id}:{case_id}")) is not None:
            return Intake(stored=True, case_id=case_id)
    if size is not None and size > MAX_UPLOAD_BYTES:
        return Intake(stored=False, rejected_code="too_large")
    try:
        raw = await download(context, file_id)
    except _TooLarge:
        return Intake(stored=False, rejected_code="too_large")
    except BadRequest as exc:  # e.g. Telegram's "file is too big"
        log.info("download refused: %s", exc.message)
        code = "too_large" if "too big" in exc.message.lower() else "corrupt"
        return Intake(stored=False, rejected_code=code)
    return await asyncio.to_thread(_store, clinic, case_id, patient_id, raw, filename, unique_id, message.message_id)


def photo_count(clinic: Clinic, case_id: uuid.UUID) -> int:
    with clinic.session() as session:
        return session.query(Image.id).filter(Image.case_id == case_id).count()
