"""Cases, their photos and AI results. Status changes go through :func:`transition` only."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import AIResult, Case, ExplanationImage, Image, Patient, utcnow
from clinic_db.states import CaseStatus, check_transition

HISTORY_FIELDS = (
    "body_site",
    "duration",
    "itch",
    "bleeding",
    "growth",
    "pain",
    "prior_treatment",
    "fitzpatrick",
    "free_text",
)


class StaleCase(RuntimeError):
    """The case changed status under us (another worker or clinician moved it first)."""


def open_case(clinic: Clinic, session: Session, patient: Patient, *, opening_message_id: int | None = None) -> Case:
    """A new case collecting photos; ``opening_message_id`` is the patient's message that opened it."""
    case = Case(patient_id=patient.id, status=CaseStatus.received.value, opening_message_id=opening_message_id)
    case.ensure_id()
    session.add(case)
    clinic.vault.set_json(session, case, "history", {}, owner=patient.id)
    session.flush()
    audit.record(session, Actor("patient", str(patient.id)), "case.open", "Case", case.id)
    return case


def transition(
    session: Session,
    case: Case,
    target: CaseStatus | str,
    actor: Actor,
    *,
    reason: str | None = None,
    expect: CaseStatus | str | None = None,
) -> None:
    """Move ``case`` to ``target`` if the state machine allows it.

    The UPDATE is conditional on the status we read (compare-and-set), so two workers racing on one
    case cannot both move it: the loser gets :class:`StaleCase`.
    """
    current = CaseStatus(expect or case.status)
    target = check_transition(current, target)
    now = utcnow()
    values: dict[str, Any] = {"status": target.value, "status_changed_at": now, "updated_at": now}
    if target is CaseStatus.failed:
        values["failure_reason"] = (reason or "unknown")[:200]
    result = session.execute(
        update(Case).where(Case.id == case.id, Case.status == current.value).values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.refresh(case)
        raise StaleCase(f"case {case.id} is {case.status}, not {current.value}")
    for key, value in values.items():
        setattr(case, key, value)
    audit.record(session, actor, "case.transition", "Case", case.id,
                 from_status=current.value, to_status=target.value, reason=reason)


def history(clinic: Clinic, session: Session, case: Case) -> dict[str, Any]:
    return clinic.vault.get_json(session, case, "history", owner=case.patient_id) or {}


def set_history(clinic: Clinic, session: Session, case: Case, **answers: Any) -> dict[str, Any]:
    unknown = set(answers) - set(HISTORY_FIELDS)
    if unknown:
        raise ValueError(f"unknown history fields: {sorted(unknown)}")
    merged = history(clinic, session, case) | answers
    clinic.vault.set_json(session, case, "history", merged, owner=case.patient_id)
    return merged


@dataclass(frozen=True)
class CleanImage:
    """A photo that passed safe decoding: EXIF removed, orientation applied, re-encoded."""

    data: bytes
    mime: str
    width: int
    height: int
    quality: dict[str, Any] | None = None


def add_image(clinic: Clinic, session: Session, case: Case, image: CleanImage, *, source_ref: str | None = None) -> Image:
    """Store a photo encrypted. ``source_ref`` makes re-delivery of the same upload idempotent."""
    if source_ref is not None:
        existing = session.scalar(select(Image).where(Image.source_ref == source_ref))
        if existing is not None:
            return existing
    row = Image(
        case_id=case.id,
        patient_id=case.patient_id,
        content_mac=clinic.vault.keyring.content_mac(image.data),  # keyed: a photo alone confirms nothing
        mime=image.mime,
        size=len(image.data),
        width=image.width,
        height=image.height,
        quality=image.quality,
        source_ref=source_ref,
    )
    row.ensure_id()
    clinic.vault.encrypt(session, row, "data", image.data)
    session.add(row)
    session.flush()
    audit.record(session, Actor("patient", str(case.patient_id)), "image.store", "Image", row.id, case=str(case.id))
    return row


def image_bytes(clinic: Clinic, session: Session, image: Image, actor: Actor, purpose: str = "treatment") -> bytes:
    data = clinic.vault.decrypt(session, image, "data")
    audit.record(session, actor, "image.read", "Image", image.id, purpose=purpose, case=str(image.case_id))
    assert data is not None
    return data


def add_ai_result(
    clinic: Clinic,
    session: Session,
    case: Case,
    *,
    engine: str,
    model_id: str,
    model_version: str,
    weights_sha256: str,
    differential: list[dict[str, Any]],
    description: str | None = None,
    saliency_png: bytes | None = None,
    flags: list[str] | None = None,
    timings: dict[str, Any] | None = None,
) -> AIResult:
    ranked = sorted(differential, key=lambda d: d["probability"], reverse=True)
    row = AIResult(
        case_id=case.id,
        engine=engine,
        model_id=model_id,
        model_version=model_version,
        weights_sha256=weights_sha256,
        top_condition_code=ranked[0]["code"] if ranked else None,
        top_probability=float(ranked[0]["probability"]) if ranked else None,
        flags=list(flags or []),
        timings=dict(timings or {}),
    )
    row.ensure_id()
    owner = case.patient_id
    clinic.vault.set_json(session, row, "differential", ranked, owner=owner)
    clinic.vault.set_text(session, row, "description", description, owner=owner)
    clinic.vault.encrypt(session, row, "saliency", saliency_png, owner=owner)
    session.add(row)
    session.flush()
    audit.record(session, Actor.system("inference"), "ai_result.create", "AIResult", row.id,
                 case=str(case.id), engine=engine, model=model_id)
    return row


# Which engine's result stands for the case when several ran: the one the patient reads, the
# explanation images illustrate, follow-up answers and the case's condition code follow.
ENGINE_PREFERENCE = ("vlm", "classifier")


def preferred_result(session: Session, case: Case) -> AIResult | None:
    """The AI result that stands for the case: the first usable one (a top condition) by preference."""
    results = {r.engine: r for r in session.scalars(select(AIResult).where(AIResult.case_id == case.id))}
    usable = [results[e] for e in ENGINE_PREFERENCE if e in results and results[e].top_condition_code]
    return usable[0] if usable else None


def add_explanation_image(
    clinic: Clinic, session: Session, case: Case, *, condition_code: str, png: bytes, model_id: str, seed: int
) -> ExplanationImage:
    row = ExplanationImage(
        case_id=case.id,
        patient_id=case.patient_id,
        condition_code=condition_code,
        content_mac=clinic.vault.keyring.content_mac(png),
        model_id=model_id,
        seed=seed,
    )
    row.ensure_id()
    clinic.vault.encrypt(session, row, "data", png)
    session.add(row)
    session.flush()
    return row


def get_case(session: Session, case_id: uuid.UUID | str) -> Case | None:
    return session.get(Case, uuid.UUID(str(case_id)))
