"""The dermatologist review queue: tasks, claims with expiry, decisions."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.models import Case, ReviewTask, utcnow

URGENCY_PRIORITY = {"emergency": 0, "urgent": 1, "soon": 2, "routine": 3}
URGENCY_SLA = {
    "emergency": timedelta(hours=4),
    "urgent": timedelta(hours=24),
    "soon": timedelta(hours=72),
    "routine": timedelta(days=7),
}
CLAIM_TTL = timedelta(minutes=30)


def open_task(session: Session, case: Case, *, urgency: str, reasons: list[str], now: datetime | None = None) -> ReviewTask:
    """Open (or update) the case's review task. One open task per case."""
    now = now or utcnow()
    task = session.scalar(
        select(ReviewTask).where(ReviewTask.case_id == case.id, ReviewTask.status != "decided")
    )
    if task is None:
        task = ReviewTask(case_id=case.id, status="open", reasons=[], created_at=now)
        task.ensure_id()
        session.add(task)
    # the most urgent of what is asked wins; reasons accumulate
    if task.urgency is None or URGENCY_PRIORITY[urgency] < URGENCY_PRIORITY[task.urgency]:
        task.urgency = urgency
        task.priority = URGENCY_PRIORITY[urgency]
        task.due_at = now + URGENCY_SLA[urgency]
    task.reasons = sorted(set(task.reasons or []) | set(reasons))
    session.flush()
    audit.record(session, Actor.system("triage"), "review.open", "ReviewTask", task.id,
                 case=str(case.id), urgency=task.urgency, reasons=task.reasons, purpose="operations")
    return task


def claim(session: Session, task_id: uuid.UUID, clinician_id: uuid.UUID, *, ttl: timedelta = CLAIM_TTL) -> bool:
    """Atomically claim a task. Exactly one of several concurrent claimers wins.

    A single conditional UPDATE: it succeeds only if the task is unclaimed, its claim expired, or
    the same clinician already holds it (renewal). Committed here so the lock is visible at once.
    """
    now = utcnow()
    result = session.execute(
        update(ReviewTask)
        .where(
            ReviewTask.id == task_id,
            ReviewTask.status == "open",
            or_(
                ReviewTask.claimed_by.is_(None),
                ReviewTask.claim_expires_at < now,
                ReviewTask.claimed_by == clinician_id,
            ),
        )
        .values(claimed_by=clinician_id, claimed_at=now, claim_expires_at=now + ttl)
        .execution_options(synchronize_session=False)
    )
    won = result.rowcount == 1
    audit.record(session, Actor("clinician", str(clinician_id)), "review.claim", "ReviewTask", task_id,
                 outcome="success" if won else "denied", purpose="treatment")
    session.commit()
    return won


def release(session: Session, task_id: uuid.UUID, clinician_id: uuid.UUID) -> None:
    session.execute(
        update(ReviewTask)
        .where(ReviewTask.id == task_id, ReviewTask.claimed_by == clinician_id)
        .values(claimed_by=None, claimed_at=None, claim_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    audit.record(session, Actor("clinician", str(clinician_id)), "review.release", "ReviewTask", task_id)
    session.commit()


def holds_claim(task: ReviewTask, clinician_id: uuid.UUID, now: datetime | None = None) -> bool:
    now = now or utcnow()
    return task.claimed_by == clinician_id and task.claim_expires_at is not None and task.claim_expires_at > now


def queue(session: Session, *, now: datetime | None = None, limit: int = 200) -> list[ReviewTask]:
    """Open tasks, most urgent first, then by SLA due time."""
    return list(
        session.scalars(
            select(ReviewTask)
            .where(ReviewTask.status.in_(("open", "waiting_patient")))
            .order_by(ReviewTask.priority, ReviewTask.due_at, ReviewTask.created_at)
            .limit(limit)
        )
    )


def overdue(task: ReviewTask, now: datetime | None = None) -> bool:
    return task.status != "decided" and task.due_at < (now or utcnow())



