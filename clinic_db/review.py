"""The dermatologist review queue: tasks, claims with expiry, decisions."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.models import Case, Clinician, ReviewTask, utcnow

if TYPE_CHECKING:
    from clinic_db.db import Clinic

URGENCY_PRIORITY = {"emergency": 0, "urgent": 1, "soon": 2, "routine": 3}
URGENCY_SLA = {
    "emergency": timedelta(hours=4),
    "urgent": timedelta(hours=24),
    "soon": timedelta(hours=72),
    "routine": timedelta(days=7),
}
CLAIM_TTL = timedelta(minutes=30)


def most_urgent(*urgencies: str | None) -> str | None:
    """The most urgent of the known urgencies given (None and unknown values are left out)."""
    known = [u for u in urgencies if u in URGENCY_PRIORITY]
    return min(known, key=URGENCY_PRIORITY.__getitem__) if known else None


def urgency_now(session: Session, case: Case) -> str | None:
    """What the patient must be told now: the most urgent of the case's urgency and its open review
    task's (a red-flag follow-up raises the task above the case)."""
    task = session.scalar(select(ReviewTask).where(ReviewTask.case_id == case.id, ReviewTask.status != "decided")
                          .order_by(ReviewTask.created_at.desc()).limit(1))
    return most_urgent(case.urgency, task.urgency if task is not None else None)


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



# --- decisions (the dermatologist's sign-off) --------------------------------------------------

DECISIONS = ("accept", "amend", "request_info")
SIMPLE_RECOMMENDATIONS = ("self_care", "see_gp", "urgent_in_person")
WITHIN_DAYS_PREFIX = "dermatologist_within_days:"
MAX_WITHIN_DAYS = 90
# After the patient answers a request for information the task waits this long for the same
# dermatologist before any colleague may claim it.
RETURN_RESERVE = timedelta(hours=24)


class DecisionError(ValueError):
    """The decision cannot be recorded as given; ``code`` says why (for the UI), the message explains."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# The patient reads one action with one timeframe (bot.render.action_text), so a recommendation may
# only go with the urgencies whose timeframe it does not contradict: "see a dermatologist within 7
# days" cannot be urgent (24 hours), self-care cannot be anything but routine.
RECOMMENDATION_URGENCIES = {
    "self_care": ("routine",),
    "see_gp": ("urgent", "soon", "routine"),
    "urgent_in_person": ("emergency", "urgent"),
}
# dermatologist_within_days:N fits the urgency whose timeframe N days lies in (24 h, 3 days, longer)
WITHIN_DAYS_BY_URGENCY = {"urgent": (1, 1), "soon": (2, 3), "routine": (4, MAX_WITHIN_DAYS)}


def within_days(value: str | None) -> int | None:
    """N of "dermatologist_within_days:N" (1..MAX_WITHIN_DAYS), else None."""
    if value and value.startswith(WITHIN_DAYS_PREFIX):
        days = value[len(WITHIN_DAYS_PREFIX):]
        if days.isdigit() and 1 <= int(days) <= MAX_WITHIN_DAYS:
            return int(days)
    return None


def valid_recommendation(value: str | None) -> bool:
    return value in SIMPLE_RECOMMENDATIONS or within_days(value) is not None


def recommendation_fits(urgency: str | None, recommendation: str | None) -> bool:
    """True when the recommendation's timeframe is the urgency's (see RECOMMENDATION_URGENCIES)."""
    if recommendation in RECOMMENDATION_URGENCIES:
        return urgency in RECOMMENDATION_URGENCIES[recommendation]
    days = within_days(recommendation)
    if days is None or urgency not in WITHIN_DAYS_BY_URGENCY:
        return False
    low, high = WITHIN_DAYS_BY_URGENCY[urgency]
    return low <= days <= high


def urgency_for_days(days: int) -> str:
    """The urgency whose timeframe "within N days" belongs to."""
    return next(u for u, (low, high) in WITHIN_DAYS_BY_URGENCY.items() if low <= days <= high)


def _known_condition(code: str) -> bool:
    """True when ``code`` is in the condition vocabulary (``inference.vocabulary``)."""
    try:
        from inference.vocabulary import load_vocabulary
    except ModuleNotFoundError as exc:  # vocabulary not installed: accept well-formed slugs only
        if exc.name not in ("inference.vocabulary", "inference"):
            raise
        return bool(code) and len(code) <= 32 and all(c.islower() or c.isdigit() or c == "_" for c in code)
    return code in load_vocabulary().codes


def _publish(clinic: Clinic, session: Session, case_id: uuid.UUID) -> None:
    """Rebuild the case's FHIR resources when the FHIR publisher is installed."""
    try:
        from fhir.publish import publish_case
    except ModuleNotFoundError as exc:  # publisher not installed in this deployment
        if exc.name not in ("fhir.publish", "fhir"):
            raise
        return
    except ImportError:
        return
    publish_case(clinic, session, case_id)


def decide(
    clinic: Clinic,
    session: Session,
    task: ReviewTask,
    clinician: Clinician,
    decision: str,
    condition_code: str | None = None,
    urgency: str | None = None,
    recommendation: str | None = None,
    note: str | None = None,
) -> ReviewTask:
    """Record a dermatologist's decision on a claimed task, in the caller's transaction.

    accept/amend sign the case (in_review -> final; final -> amended), publish FHIR and write the outbox
    "final" message; request_info parks the task as waiting_patient (still held by this
    dermatologist) and writes a "request_info" message. The caller commits, so state, FHIR and
    the patient's message land together or not at all.
    """
    from clinic_db import outbox
    from clinic_db.cases import transition
    from clinic_db.models import AIResult, CaseMessage
    from clinic_db.states import CaseStatus

    now = utcnow()
    actor = Actor("clinician", str(clinician.id))
    if clinician.role != "dermatologist" or not clinician.active:
        raise DecisionError("forbidden", "only an active dermatologist may decide")
    if decision not in DECISIONS:
        raise DecisionError("bad_decision", f"decision must be one of {', '.join(DECISIONS)}")
    if task.status != "open" or not holds_claim(task, clinician.id, now):
        raise DecisionError("not_claimed", "claim this case before deciding (your claim may have expired)")
    note = (note or "").strip() or None
    if note is not None and len(note) > 4000:
        raise DecisionError("note_too_long", "the note may have at most 4000 characters")
    case = task.case

    if decision == "request_info":
        if note is None:
            raise DecisionError("note_required", "say what the patient should send")
        won = session.execute(
            update(ReviewTask)
            .where(ReviewTask.id == task.id, ReviewTask.status == "open", ReviewTask.claimed_by == clinician.id)
            # no expiry while the patient is away: the task stays with this dermatologist
            .values(status="waiting_patient", decision="request_info", claim_expires_at=None)
            .execution_options(synchronize_session=False)
        ).rowcount
        if won != 1:
            raise DecisionError("not_claimed", "the task changed meanwhile; reload it")
        session.refresh(task)
        clinic.vault.set_text(session, task, "note", note, owner=case.patient_id)
        # the request is part of the case's conversation, before the patient's reply
        asked = CaseMessage(case_id=case.id, patient_id=case.patient_id, role="clinician", flags=["request_info"])
        asked.ensure_id()
        clinic.vault.set_text(session, asked, "text", note, owner=case.patient_id)
        session.add(asked)
        outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="request_info",
                       dedup_key=f"request_info:{task.id}:{uuid.uuid4().hex}",
                       payload={"case_id": str(case.id), "task_id": str(task.id)})
        audit.record(session, actor, "review.request_info", "ReviewTask", task.id, case=str(case.id))
        session.flush()
        return task

    latest_ai = session.scalar(
        select(AIResult).where(AIResult.case_id == case.id).order_by(AIResult.created_at.desc()).limit(1)
    )
    if decision == "accept":
        condition_code = (latest_ai.top_condition_code if latest_ai else None) or case.condition_code
        if not condition_code:
            raise DecisionError("nothing_to_accept", "there is no AI assessment to accept; amend instead")
        urgency = urgency or case.urgency
    else:
        if not condition_code or not _known_condition(condition_code):
            raise DecisionError("bad_condition", "choose a condition from the vocabulary")
    if urgency not in URGENCY_PRIORITY:
        raise DecisionError("bad_urgency", f"urgency must be one of {', '.join(URGENCY_PRIORITY)}")
    if not valid_recommendation(recommendation):
        raise DecisionError("bad_recommendation", "choose a recommendation")
    if not recommendation_fits(urgency, recommendation):
        days = within_days(recommendation)
        hint = (f"a dermatologist within {days} days is {urgency_for_days(days)}" if days is not None
                else f"it fits {' or '.join(RECOMMENDATION_URGENCIES[recommendation or ''])}")
        raise DecisionError("recommendation_conflict",
                            f"the recommendation contradicts urgency {urgency} ({hint}); change one of them")

    won = session.execute(
        update(ReviewTask)
        .where(ReviewTask.id == task.id, ReviewTask.status == "open", ReviewTask.claimed_by == clinician.id,
               ReviewTask.claim_expires_at > now)
        .values(status="decided", decision=decision, decision_condition_code=condition_code,
                decision_urgency=urgency, recommendation=recommendation, decided_by=clinician.id,
                decided_at=now, claim_expires_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount
    if won != 1:
        raise DecisionError("not_claimed", "the task changed meanwhile; reload it")
    session.refresh(task)
    clinic.vault.set_text(session, task, "note", note, owner=case.patient_id)

    if case.status == CaseStatus.preliminary.value:  # review asked for before the pipeline handed over
        transition(session, case, CaseStatus.in_review, actor, reason="review")
    # the first signature makes the report final, whether the AI was accepted or amended; FHIR R4's
    # "amended" only follows a final (a later decision on an already signed case)
    target = CaseStatus.final if case.status == CaseStatus.in_review.value else CaseStatus.amended
    transition(session, case, target, actor, reason=f"review.{decision}")
    case.condition_code = condition_code
    case.urgency = urgency
    session.flush()
    _publish(clinic, session, case.id)
    outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="final",
                   dedup_key=f"final:{task.id}", payload={"case_id": str(case.id), "task_id": str(task.id)})
    audit.record(session, actor, "review.decide", "ReviewTask", task.id, case=str(case.id), decision=decision,
                 condition=condition_code, urgency=urgency, recommendation=recommendation,
                 model=latest_ai.model_id if latest_ai else None)
    session.flush()
    return task


def patient_replied(session: Session, case_id: uuid.UUID, *, now: datetime | None = None) -> ReviewTask | None:
    """The patient answered a request for information: the task returns to the dermatologist who asked.

    Called by the bot when new photos or answers arrive for a case whose task is waiting_patient.
    The asking dermatologist keeps the claim for :data:`RETURN_RESERVE`; after that anyone may claim.
    """
    now = now or utcnow()
    task = session.scalar(
        select(ReviewTask).where(ReviewTask.case_id == case_id, ReviewTask.status == "waiting_patient")
    )
    if task is None:
        return None
    task.status = "open"
    task.claim_expires_at = now + RETURN_RESERVE
    task.due_at = now + URGENCY_SLA[task.urgency]  # the SLA clock restarts with the patient's answer
    audit.record(session, Actor.system("bot"), "review.patient_replied", "ReviewTask", task.id, case=str(case_id))
    session.flush()
    return task
