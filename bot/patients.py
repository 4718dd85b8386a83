"""Small database helpers the bot's handlers share (who is this Telegram user, in which language)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy.orm import Session

from bot.i18n import pick_language
from clinic_db import patients
from clinic_db.db import Clinic
from clinic_db.models import Case, Patient


@dataclass(frozen=True)
class Who:
    patient: Patient | None
    lang: str

    @property
    def consented(self) -> bool:
        return self.patient is not None and self.patient.has_consent


def who(clinic: Clinic, session: Session, user_id: int, client_language: str | None) -> Who:
    """The patient behind a Telegram user (None before consent) and the language to answer in."""
    patient = patients.find_by_telegram(clinic, session, user_id)
    if patient is not None and patient.language:
        return Who(patient, pick_language(patient.language))
    return Who(patient, pick_language(client_language))


def own_case(session: Session, patient: Patient, case_id: str | uuid.UUID | None) -> Case | None:
    """The case if it exists AND belongs to this patient (button data comes from the client)."""
    if not case_id:
        return None
    try:
        case = session.get(Case, uuid.UUID(str(case_id)))
    except ValueError:
        return None
    return case if case is not None and case.patient_id == patient.id else None
