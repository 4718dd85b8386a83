"""Review on the move: a dermatologist's linked Telegram account, the data side (no Telegram code here).

:func:`digest` is a content-free queue summary (counts, urgencies, waiting times, console link).
The rest serves ``bot/clinician.py``: pushes for urgent tasks, a case view, photos on request and
the second factor before signing. Telegram is a third party, so nothing here ever names the
patient (no name, Telegram id or case id); the clinical content is kept to what a decision needs,
every read is audited with ``channel="telegram"``, and signing goes through
``clinic_db.review.decide`` exactly like the console.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import pyotp
from sqlalchemy import select
from sqlalchemy.orm import Session

from clinic_db import audit, cases, clinicians, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import AIResult, Case, Clinician, KeyValue, ReviewTask, utcnow
from console.labels import HISTORY_LABELS, reason_label
from clinic_db.vault import SYSTEM_KEY_ID

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


# --- review on the move: pushes, case summaries, sign-off (used by bot/clinician.py) -------------
#
# What goes to Telegram, and why: the issue asks that a dermatologist can triage urgent cases from
# the phone. The messages therefore carry the clinical minimum to decide — urgency, reason codes,
# the AI differential, history answers and, only on an explicit tap, the photos — but never who the
# patient is: no name, no Telegram id, no case id (a short task reference stands in). Photos are
# sent with Telegram's ``protect_content`` (no forwarding or saving) and are decrypted in memory.

PUSH_URGENCIES = ("emergency", "urgent")
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"  # the web app's default address (settings.http_port)
NS_PUSHED = "clin_push"  # review task id -> {} once its push went out
NS_CHAT = "clin_chat"  # clinician id -> sealed Telegram chat id (learned when they write to the bot)
TOP_CONDITIONS = 5
RECOMMENDATION_LABELS = {
    "self_care": "Self-care (advice only)",
    "see_gp": "See a general practitioner",
    f"{review.WITHIN_DAYS_PREFIX}1": "Dermatologist within 1 day",
    f"{review.WITHIN_DAYS_PREFIX}3": "Dermatologist within 3 days",
    f"{review.WITHIN_DAYS_PREFIX}7": "Dermatologist within 7 days",
    f"{review.WITHIN_DAYS_PREFIX}14": "Dermatologist within 14 days",
    f"{review.WITHIN_DAYS_PREFIX}30": "Dermatologist within 30 days",
    "urgent_in_person": "Urgent in-person assessment",
}


def ref(task_id: uuid.UUID) -> str:
    """A short, meaningless reference the dermatologist can match with the console (not the case id)."""
    return task_id.hex[:8]


def condition_label(code: str | None) -> str:
    from console.conditions import label

    return label(code, "en")


def console_base(public_base_url: str | None) -> str:
    """The console's address: the web app mounts it at ``/console``."""
    return f"{(public_base_url or DEFAULT_PUBLIC_URL).rstrip('/')}/console"


def console_task_url(task_id: uuid.UUID, public_base_url: str | None) -> str:
    """The console page of a task (route ``/console/tasks/{task_id}``)."""
    return f"{console_base(public_base_url)}/tasks/{task_id}"


# --- where to reach a clinician ------------------------------------------------------------------
def remember_chat(clinic: Clinic, session: Session, clinician: Clinician, telegram_user_id: int) -> None:
    """Keep the chat id of a linked clinician who wrote to the bot (a bot can only message such users).

    The link itself is a one-way blind index, so the id to push to is learned here, sealed with the
    system key (AAD names this row).
    """
    key = str(clinician.id)
    blob = clinic.vault.seal_for(session, SYSTEM_KEY_ID, "kv", f"{NS_CHAT}/{key}", "value",
                                 str(int(telegram_user_id)).encode())
    row = session.get(KeyValue, (NS_CHAT, key))
    if row is None:
        session.add(KeyValue(namespace=NS_CHAT, key=key, value_enc=blob, value=None))
    elif row.value_enc != blob:
        row.value_enc = blob
    session.flush()


def reachable(clinic: Clinic, session: Session) -> list[tuple[Clinician, int]]:
    """Active linked dermatologists with a known chat whose link still points at that chat."""
    out: list[tuple[Clinician, int]] = []
    for row in session.scalars(select(KeyValue).where(KeyValue.namespace == NS_CHAT)):
        clinician = session.get(Clinician, uuid.UUID(row.key))
        if clinician is None or not clinician.active or clinician.role != "dermatologist" or row.value_enc is None:
            continue
        chat_id = int(clinic.vault.open_for(session, SYSTEM_KEY_ID, "kv", f"{NS_CHAT}/{row.key}", "value",
                                            row.value_enc))
        if clinician.telegram_index == telegram_index(clinic, chat_id):  # unlinked or relinked: stale
            out.append((clinician, chat_id))
    return out


# --- pushes ---------------------------------------------------------------------------------------
def pending_pushes(session: Session, *, now: datetime | None = None) -> list[ReviewTask]:
    """Open urgent/emergency tasks nobody is working on and that were not pushed yet."""
    now = now or utcnow()
    pushed = select(KeyValue.key).where(KeyValue.namespace == NS_PUSHED)
    tasks = session.scalars(
        select(ReviewTask)
        .where(ReviewTask.status == "open", ReviewTask.urgency.in_(PUSH_URGENCIES))
        .order_by(ReviewTask.priority, ReviewTask.due_at)
    ).all()
    done = set(session.scalars(pushed))
    return [t for t in tasks if str(t.id) not in done and not _claimed(t, now)]


def _claimed(task: ReviewTask, now: datetime) -> bool:
    return task.claimed_by is not None and task.claim_expires_at is not None and task.claim_expires_at > now


def mark_pushed(session: Session, task: ReviewTask, recipients: int) -> None:
    session.add(KeyValue(namespace=NS_PUSHED, key=str(task.id), value={"recipients": recipients}))
    audit.record(session, Actor.system("bot"), "review.push", "ReviewTask", task.id, purpose="operations",
                 channel="telegram", recipients=recipients)
    session.flush()


@dataclass(frozen=True)
class TaskSummary:
    """What a push or a queue button shows about one task: no patient identity."""

    task_id: uuid.UUID
    ref: str
    urgency: str
    waiting: str
    due: datetime
    overdue: bool
    reasons: list[str]
    differential: list[tuple[str, str, float]]  # (code, name, probability), most likely first

    def text(self) -> str:
        lines = [f"{self.urgency.upper()} review · ref {self.ref}",
                 f"Waiting {self.waiting}; due {_fmt(self.due)}" + (" (OVERDUE)" if self.overdue else ""),
                 "Reasons: " + (", ".join(self.reasons) or "—")]
        if self.differential:
            lines.append("AI (preliminary): " + "; ".join(f"{name} {p:.0%}" for _, name, p in self.differential[:3]))
        else:
            lines.append("AI: no usable assessment")
        return "\n".join(lines)


def _fmt(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def latest_differential(clinic: Clinic, session: Session, case: Case) -> list[tuple[str, str, float]]:
    """The newest AI result's differential as (code, name, probability), most likely first."""
    result = session.scalar(
        select(AIResult).where(AIResult.case_id == case.id).order_by(AIResult.created_at.desc()).limit(1)
    )
    if result is None:
        return []
    raw = clinic.vault.get_json(session, result, "differential", owner=case.patient_id) or []
    ranked = sorted(raw, key=lambda d: float(d["probability"]), reverse=True)
    return [(d["code"], condition_label(d["code"]), float(d["probability"])) for d in ranked]


def summary(clinic: Clinic, session: Session, task: ReviewTask, *, now: datetime | None = None) -> TaskSummary:
    now = now or utcnow()
    return TaskSummary(
        task_id=task.id, ref=ref(task.id), urgency=task.urgency,
        waiting=_hours((now - task.created_at).total_seconds()), due=task.due_at,
        overdue=review.overdue(task, now),
        reasons=[reason_label(code) for code in task.reasons or []],
        differential=latest_differential(clinic, session, task.case),
    )


def urgent_open(session: Session, clinician: Clinician, *, limit: int = 5, now: datetime | None = None) -> list[ReviewTask]:
    """Urgent/emergency tasks this clinician could open now (unclaimed or their own), most urgent first."""
    now = now or utcnow()
    return [t for t in review.queue(session, now=now)
            if t.status == "open" and t.urgency in PUSH_URGENCIES
            and (not _claimed(t, now) or t.claimed_by == clinician.id)][:limit]


# --- viewing and deciding ------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseDetail:
    summary: TaskSummary
    history: list[tuple[str, str]]  # (label, answer)
    description: str | None
    photos: int

    def text(self) -> str:
        lines = [self.summary.text(), "", "History:"]
        lines += [f"• {label}: {answer}" for label, answer in self.history] or ["• (no answers)"]
        if self.summary.differential:
            lines += ["", "AI differential (preliminary, for your review):"]
            lines += [f"{i}. {name} — {p:.0%}" for i, (_, name, p) in enumerate(self.summary.differential, 1)]
        if self.description:
            lines += ["", f"AI description: {self.description}"]
        lines += ["", f"{self.photos} photo(s) on file."]
        return "\n".join(lines)


def view(clinic: Clinic, session: Session, task: ReviewTask, clinician: Clinician) -> CaseDetail:
    """The case as the dermatologist needs it on the phone; audited as ``case.view`` (channel telegram)."""
    case = task.case
    answers = cases.history(clinic, session, case)
    history = [(HISTORY_LABELS.get(k, k.replace("_", " ").capitalize()), str(v)) for k, v in answers.items()
               if v not in (None, "")]
    result = session.scalar(
        select(AIResult).where(AIResult.case_id == case.id).order_by(AIResult.created_at.desc()).limit(1)
    )
    description = clinic.vault.get_text(session, result, "description", owner=case.patient_id) if result else None
    audit.record(session, Actor("clinician", str(clinician.id)), "case.view", "Case", case.id,
                 purpose="treatment", task=str(task.id), channel="telegram")
    return CaseDetail(summary(clinic, session, task), history, description, len(case.images))


def photos(clinic: Clinic, session: Session, task: ReviewTask, clinician: Clinician) -> list[bytes]:
    """The case photos, decrypted in memory (each read audited by ``cases.image_bytes``)."""
    actor = Actor("clinician", str(clinician.id))
    return [cases.image_bytes(clinic, session, image, actor, purpose="treatment") for image in task.case.images]


def holder_name(session: Session, task: ReviewTask) -> str:
    holder = session.get(Clinician, task.claimed_by) if task.claimed_by else None
    return holder.display_name if holder is not None else "a colleague"


def check_code(clinic: Clinic, session: Session, clinician: Clinician, code: str) -> str:
    """Second factor before signing from Telegram: "ok", "not_enrolled", "bad_totp" or "locked".

    Uses the account's sealed TOTP secret (``clinicians.totp_secret``) and the same lockout as the
    console login: five wrong codes lock the account for 15 minutes. The caller commits.
    """
    now = utcnow()
    actor = Actor("clinician", str(clinician.id))
    if clinicians.is_locked(clinician, now):
        audit.record(session, actor, "auth.totp", "Clinician", clinician.id, outcome="denied",
                     purpose="operations", reason="locked", channel="telegram")
        return "locked"
    secret = clinicians.totp_secret(clinic, session, clinician)
    if secret is None:
        return "not_enrolled"
    if pyotp.TOTP(secret).verify(code.strip(), valid_window=1):
        clinician.failed_logins = 0
        audit.record(session, actor, "auth.totp", "Clinician", clinician.id, purpose="operations", channel="telegram")
        return "ok"
    clinician.failed_logins = (clinician.failed_logins or 0) + 1
    reason = "bad_totp"
    if clinician.failed_logins >= clinicians.MAX_FAILURES:
        clinician.locked_until = now + clinicians.LOCKOUT
        clinician.failed_logins = 0
        reason = "locked"
        audit.record(session, actor, "auth.lockout", "Clinician", clinician.id, purpose="operations")
    audit.record(session, actor, "auth.totp", "Clinician", clinician.id, outcome="denied", purpose="operations",
                 reason=reason, channel="telegram")
    return reason
