"""Outbox: messages to patients, written in the transaction that causes them.

The bot's sender delivers them at least once; ``dedup_key`` makes writing the same message twice a
no-op, and the sender marks a message sent only after Telegram accepted it.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from clinic_db.db import Clinic
from clinic_db.models import OutboxMessage, utcnow

MAX_ATTEMPTS = 8


def enqueue(
    clinic: Clinic, session: Session, *, patient_id: uuid.UUID, kind: str, dedup_key: str,
    payload: dict[str, Any], case_id: uuid.UUID | None = None,
) -> OutboxMessage:
    existing = session.scalar(select(OutboxMessage).where(OutboxMessage.dedup_key == dedup_key))
    if existing is not None:
        return existing
    msg = OutboxMessage(patient_id=patient_id, case_id=case_id, kind=kind, dedup_key=dedup_key, status="pending")
    msg.ensure_id()
    clinic.vault.set_json(session, msg, "payload", payload, owner=patient_id)
    session.add(msg)
    session.flush()
    return msg


def due(session: Session, limit: int = 50) -> list[OutboxMessage]:
    return list(
        session.scalars(
            select(OutboxMessage)
            .where(OutboxMessage.status == "pending", OutboxMessage.next_attempt_at <= utcnow())
            .order_by(OutboxMessage.created_at)
            .limit(limit)
        )
    )


def payload(clinic: Clinic, session: Session, msg: OutboxMessage) -> dict[str, Any]:
    return clinic.vault.get_json(session, msg, "payload", owner=msg.patient_id)


def mark_sent(session: Session, msg_id: uuid.UUID) -> None:
    session.execute(
        update(OutboxMessage).where(OutboxMessage.id == msg_id)
        .values(status="sent", sent_at=utcnow()).execution_options(synchronize_session=False)
    )


def mark_failed(session: Session, msg: OutboxMessage, error: str) -> None:
    msg.attempts += 1
    msg.last_error = error[:200]
    if msg.attempts >= MAX_ATTEMPTS:
        msg.status = "dead"
    else:
        msg.next_attempt_at = utcnow() + timedelta(seconds=min(600, 2 ** msg.attempts))
