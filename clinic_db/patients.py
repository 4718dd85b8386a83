"""Patients: lookup by blind index, consent, and erasure by crypto-shredding."""

from __future__ import annotations

import uuid

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import Case, OutboxMessage, Patient, utcnow
from clinic_db.states import CaseStatus

TELEGRAM_NS = "telegram"


def telegram_index(clinic: Clinic, telegram_user_id: int | str) -> str:
    return clinic.vault.keyring.blind_index(TELEGRAM_NS, str(telegram_user_id))


def find_by_telegram(clinic: Clinic, session: Session, telegram_user_id: int | str) -> Patient | None:
    return session.scalar(select(Patient).where(Patient.telegram_index == telegram_index(clinic, telegram_user_id)))


def register(
    clinic: Clinic,
    session: Session,
    telegram_user_id: int | str,
    *,
    language: str = "en",
    consent_version: str,
    name: str | None = None,
) -> Patient:
    """Create a patient at the moment of consent (nothing is stored before)."""
    patient = find_by_telegram(clinic, session, telegram_user_id)
    if patient is None:
        patient = Patient(telegram_index=telegram_index(clinic, telegram_user_id), language=language)
        patient.ensure_id()
        clinic.vault.create_data_key(session, patient.id)
        clinic.vault.set_text(session, patient, "telegram_id", str(telegram_user_id))
        session.add(patient)
    clinic.vault.set_text(session, patient, "name", name)
    patient.language = language
    patient.consent_version = consent_version
    patient.consent_at = utcnow()
    patient.consent_withdrawn_at = None
    session.flush()
    audit.record(session, Actor("patient", str(patient.id)), "consent.give", "Patient", patient.id,
                 consent_version=consent_version)
    return patient


def telegram_id(clinic: Clinic, session: Session, patient: Patient) -> int:
    return int(clinic.vault.get_text(session, patient, "telegram_id") or 0)


def withdraw_consent(session: Session, patient: Patient) -> None:
    patient.consent_withdrawn_at = utcnow()
    audit.record(session, Actor("patient", str(patient.id)), "consent.withdraw", "Patient", patient.id)


def erase(clinic: Clinic, session: Session, patient_id: uuid.UUID, actor: Actor) -> int:
    """Right to be forgotten: delete every row of the patient and destroy their data key.

    Anything that escaped deletion (a backup, a copied row) can no longer be decrypted. Leaves
    one content-free audit entry. Returns the number of cases removed.
    """
    patient = session.get(Patient, patient_id)
    n_cases = 0
    if patient is not None:
        n_cases = len(patient.cases)
        for case in patient.cases:
            if case.status != CaseStatus.withdrawn.value:
                case.status = CaseStatus.withdrawn.value
        session.execute(delete(OutboxMessage).where(OutboxMessage.patient_id == patient_id))
        session.delete(patient)  # cascades to cases, images, AI results, review tasks
    clinic.vault.destroy_data_key(session, patient_id)
    _retract_published(session, patient_id)
    session.flush()
    remaining = session.scalar(select(Case.id).where(Case.patient_id == patient_id).limit(1))
    if remaining is not None:
        raise RuntimeError("erasure left cases behind")
    audit.record(session, actor, "patient.erase", "Patient", patient_id, cases=n_cases)
    return n_cases


def _retract_published(session: Session, patient_id: uuid.UUID) -> None:
    """Mark the patient's published FHIR resources deleted (their content is already unreadable)."""
    try:
        from fhir.publish import retract_patient
    except ImportError:  # a deployment without the FHIR component
        return
    retract_patient(session, patient_id)
