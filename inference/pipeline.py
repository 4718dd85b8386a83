"""The case pipeline as the rest of the system sees it: submit a case, a follow-up, a review request.

The chain (see inference/tasks.py), one broker hop from the bot to the result message:

    analyse (gpu: quality gate -> models -> report + result message) -> explain (gpu: example pictures)

Every step re-reads the case row (the source of truth) and does nothing if its work is already
done, so a redelivered task, a re-enqueued chain or a second worker never doubles a result.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from celery import chain
from sqlalchemy import select
from sqlalchemy.orm import Session

from clinic_db import audit, cases, outbox, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic, get_clinic
from clinic_db.models import Case, utcnow
from clinic_db.states import CaseStatus
from inference import leases
from inference.triage import PATIENT_REQUESTED
from skinbridge.settings import get_settings


def case_chain(case_id: uuid.UUID | str):  # type: ignore[no-untyped-def]
    from inference import tasks

    cid = str(case_id)
    return chain(tasks.analyse.si(cid), tasks.explain.si(cid))


def publish_chain(clinic: Clinic, session: Session, case_id: uuid.UUID) -> None:
    """Commit ``session`` together with a hand-off lease on the case, publish its chain, release the lease.

    Should the publish fail (broker down) or this process die before it, the lease expires unreleased
    and the sweeper re-sends the chain (inference.leases): the commit and the message cannot part ways.
    """
    task_id = f"handoff-{uuid.uuid4()}"
    leases.take(session, case_id, task_id, "handoff", get_settings().stuck_after_s)
    session.commit()
    case_chain(case_id).apply_async()
    leases.release(clinic, task_id)


def submit_case(case_id: uuid.UUID | str, actor: Actor | None = None) -> None:
    """Queue a received case for analysis. Safe to call twice, and from the bot and the sweeper at
    once: only the first call moves it."""
    clinic = get_clinic()
    with clinic.session() as session:
        case = session.get(Case, uuid.UUID(str(case_id)))
        if case is None:
            raise LookupError(f"no case {case_id}")
        if case.status != CaseStatus.received.value:
            return  # already submitted; the sweeper looks after lost work
        if not case.images:
            raise ValueError("a case needs at least one photo before it is submitted")
        try:
            cases.transition(session, case, CaseStatus.queued, actor or Actor("patient", str(case.patient_id)),
                             expect=CaseStatus.received)
        except cases.StaleCase:
            return  # another submitter moved it first
        outbox.enqueue(
            clinic, session, patient_id=case.patient_id, case_id=case.id, kind="progress",
            dedup_key=f"progress:{case.id}:received", payload={"case_id": str(case.id), "stage": "received"},
        )
        publish_chain(clinic, session, case.id)


def mark_history_complete(session: Session, case: Case) -> None:
    """Record that the patient answered the last history question (the bot calls this in the transaction
    that saves that answer, then submits). A case marked so that is still ``received`` after
    ``stuck_after_s`` (the bot died in between) is submitted by the sweeper."""
    if case.history_completed_at is None:
        case.history_completed_at = utcnow()


def submit_completed(clinic: Clinic, *, before: datetime) -> int:
    """Submit cases with photos whose history was completed before ``before`` but that stayed ``received``."""
    with clinic.session() as session:
        ids = session.scalars(select(Case.id).where(
            Case.status == CaseStatus.received.value, Case.history_completed_at.is_not(None),
            Case.history_completed_at < before, Case.images.any(),
        )).all()
    for case_id in ids:
        submit_case(case_id, Actor.system("sweeper"))
    return len(ids)


def submit_followup(case_id: uuid.UUID | str, message_id: uuid.UUID | str) -> None:
    """Answer a patient's follow-up question (a CaseMessage) asynchronously; the answer goes to the outbox.

    With a VLM configured the question goes to the gpu queue, whose workers hold the model; without one
    to the cpu queue (answered from the vocabulary). A CPU worker never loads a VLM."""
    from inference import tasks
    from skinbridge.settings import get_settings

    queue = "gpu" if get_settings().vlm_path else "cpu"
    tasks.answer_followup.apply_async(args=[str(case_id), str(message_id)], queue=queue)


def request_review(case_id: uuid.UUID | str, reason: str = PATIENT_REQUESTED, *, urgency: str | None = None) -> None:
    """Send a case to the dermatologist queue (patient asked for a doctor, or a red flag in follow-up)."""
    clinic = get_clinic()
    with clinic.session() as session:
        case = session.get(Case, uuid.UUID(str(case_id)))
        if case is None:
            raise LookupError(f"no case {case_id}")
        actor = Actor("patient", str(case.patient_id)) if reason == PATIENT_REQUESTED else Actor.system("triage")
        if case.status == CaseStatus.preliminary.value:
            cases.transition(session, case, CaseStatus.in_review, actor, reason=reason)
        elif case.status in (CaseStatus.final.value, CaseStatus.amended.value):
            pass  # already signed: a new task in the queue; the dermatologist's decision amends the report
        elif case.status not in (CaseStatus.in_review.value,):
            # not analysed yet: remember the wish; assemble_report routes it when the AI result is in
            audit.record(session, actor, "review.requested_early", "Case", case.id, reason=reason)
            _remember_review_wish(session, case, reason)
            session.commit()
            return
        # a red flag raises the review above the case's urgency, never below it (an emergency stays one)
        chosen = review.most_urgent(urgency, case.urgency) or "routine"
        review.open_task(session, case, urgency=chosen, reasons=[reason])
        outbox.enqueue(
            clinic, session, patient_id=case.patient_id, case_id=case.id, kind="review_requested",
            dedup_key=f"review_requested:{case.id}:{reason}", payload={"case_id": str(case.id)},
        )
        session.commit()


def _remember_review_wish(session, case: Case, reason: str) -> None:  # type: ignore[no-untyped-def]
    from clinic_db.models import KeyValue

    row = session.get(KeyValue, ("review_wish", str(case.id)))
    if row is None:
        session.add(KeyValue(namespace="review_wish", key=str(case.id), value={"reasons": [reason]}))
    else:
        row.value = {"reasons": sorted(set(row.value.get("reasons", [])) | {reason})}


def pending_review_wishes(session, case_id: uuid.UUID) -> list[str]:  # type: ignore[no-untyped-def]
    from clinic_db.models import KeyValue

    row = session.get(KeyValue, ("review_wish", str(case_id)))
    return list(row.value.get("reasons", [])) if row is not None and row.value else []
