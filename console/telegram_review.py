"""Review on the move, the safe part: a dermatologist's Telegram account gets a content-free queue digest.

Only counts, urgencies, waiting times and a console link go to Telegram — never a photo, a
condition, a history answer or a case id — because Telegram is a third party that must not
receive PHI. Claiming and signing stay in the console (2FA, CSRF, audited photo access).
The bot answers ``/queue`` from a linked clinician with :func:`digest`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from clinic_db import audit, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import Clinician, utcnow

TELEGRAM_NS = "clinician_telegram"  # a blind-index namespace apart from patients'


def telegram_index(clinic: Clinic, telegram_user_id: int | str) -> str:
    return clinic.vault.keyring.blind_index(TELEGRAM_NS, str(telegram_user_id))


def link(clinic: Clinic, session: Session, clinician: Clinician, telegram_user_id: int | str) -> None:
    """Link a clinician to a Telegram account (stored as a keyed blind index only)."""
    clinician.telegram_index = telegram_index(clinic, telegram_user_id)
    audit.record(session, Actor.system("cli"), "clinician.link_telegram", "Clinician", clinician.id,
                 purpose="operations")


def find(clinic: Clinic, session: Session, telegram_user_id: int | str) -> Clinician | None:
    """The active dermatologist linked to this Telegram account, if any."""
    clinician = session.scalar(
        select(Clinician).where(Clinician.telegram_index == telegram_index(clinic, telegram_user_id))
    )
    if clinician is None or not clinician.active or clinician.role != "dermatologist":
        return None
    return clinician


def _hours(delta_s: float) -> str:
    hours = delta_s / 3600
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} days"


def digest(session: Session, clinician: Clinician, console_url: str, *, now: datetime | None = None) -> str:
    """A PHI-free summary of the review queue for ``clinician``, with a link to the console."""
    now = now or utcnow()
    tasks = review.queue(session, now=now)
    open_tasks = [t for t in tasks if t.status == "open"]
    mine = [t for t in open_tasks if review.holds_claim(t, clinician.id, now)]
    returned = [t for t in tasks if t.status == "open" and t.claimed_by == clinician.id and t.decision == "request_info"]
    lines = [f"Review queue: {len(open_tasks)} open, {sum(1 for t in tasks if t.status == 'waiting_patient')} "
             "waiting for patients."]
    for urgency in review.URGENCY_PRIORITY:
        group = [t for t in open_tasks if t.urgency == urgency]
        if group:
            overdue = sum(1 for t in group if review.overdue(t, now))
            oldest = max((now - t.created_at).total_seconds() for t in group)
            lines.append(f"- {urgency}: {len(group)}" + (f" ({overdue} overdue)" if overdue else "")
                         + f", oldest waiting {_hours(oldest)}")
    if mine:
        lines.append(f"You hold {len(mine)} case(s)" + (f", {len(returned)} with the patient's answer." if returned
                                                        else "."))
    lines.append(f"Open the console to review: {console_url.rstrip('/')}/queue")
    audit.record(session, Actor("clinician", str(clinician.id)), "review.digest", "ReviewTask", None,
                 purpose="operations", channel="telegram")
    return "\n".join(lines)
