"""A dermatologist's sign-off of the explanation pictures, the gate between a generator and patients.

A generator's recognition bar (the classifier naming its pictures as their class) is necessary but
not enough: a 48 px classifier read noisy skin texture as seborrheic keratosis. So patients get
pictures of a condition only after a dermatologist of this clinic looked at that condition's
pictures, drawn exactly as patients would get them, and approved it in the console
(``/console/explainer``, console/app.py). A review is bound to what was looked at, the explainer's
weights digest and sampling settings: new weights or other settings need a new review. Reviews are
append-only and audited; the newest one for the same weights and settings is in force.

The pictures the dermatologist looks at are drawn by a gpu worker (inference.explainer_tasks), one
condition at a time, and kept here by the subject's digest, so the console page answers at once and
fills in as they arrive. They are AI-made, not patient data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.models import Clinician, ExplainerReview, ExplainerReviewPicture, KeyValue, utcnow

REVIEW_PICTURES = 4  # per condition
REVIEW_SEED = 0  # fixed: every dermatologist of the clinic sees the same sample
_DRAWING = "explainer_drawing"  # KeyValue namespace: when the pictures of a digest were asked for, and problems


class ReviewSubject(Protocol):
    """What a review covers (inference.engines.clinical_review.ReviewSubject)."""

    codes: tuple[str, ...]
    weights_sha256: str
    settings: dict[str, Any]


class ReviewError(ValueError):
    """A sign-off that cannot be recorded as asked; the message says why."""


class BelowBar(ReviewError):
    """Approved conditions whose pictures the classifier recognised below the bar: patients never get
    them, so an approval would read "approved" beside "never sent"."""

    def __init__(self, codes: Sequence[str]) -> None:
        self.codes = list(codes)
        super().__init__(f"recognised below the bar, never sent to patients, so they cannot be approved: "
                         f"{', '.join(self.codes)}")


class MissingReason(ReviewError):
    """Rejected conditions without a reason: the next reviewer (and the audit) must see why."""

    def __init__(self, codes: Sequence[str]) -> None:
        self.codes = list(codes)
        super().__init__(f"say why the pictures are not fit to show: {', '.join(self.codes)}")


def record(session: Session, reviewer: Clinician, subject: ReviewSubject, *, explainer_id: str,
           approve: Sequence[str], reject: Mapping[str, str], below_bar: Collection[str] = ()) -> ExplainerReview:
    """Record a dermatologist's decisions on an explainer's conditions (added to the session, audited).

    Conditions not named are not approved: each review states the whole decision for these weights.
    ``below_bar``: conditions the explainer never sends (recognition under its bar); they cannot be approved.
    """
    if reviewer.role != "dermatologist" or not reviewer.active:
        raise ReviewError("only an active dermatologist account can sign off explanation pictures")
    if not approve and not reject:
        raise ReviewError("approve or reject at least one condition")
    unknown = sorted((set(approve) | set(reject)) - set(subject.codes))
    if unknown:
        raise ReviewError(f"the explainer does not draw {', '.join(unknown)}; it draws {', '.join(subject.codes)}")
    both = sorted(set(approve) & set(reject))
    if both:
        raise ReviewError(f"both approved and rejected: {', '.join(both)}")
    too_weak = sorted(set(approve) & set(below_bar))
    if too_weak:
        raise BelowBar(too_weak)
    unexplained = sorted(c for c, why in reject.items() if not str(why or "").strip())
    if unexplained:
        raise MissingReason(unexplained)
    row = ExplainerReview(
        explainer_id=explainer_id, weights_sha256=subject.weights_sha256, settings=dict(subject.settings),
        approved=sorted(set(approve)), rejected={c: str(reject[c]).strip()[:500] for c in sorted(reject)},
        reviewer_id=reviewer.id,
    )
    row.ensure_id()
    session.add(row)
    audit.record(session, Actor("clinician", str(reviewer.id)), "explainer.review", "ExplainerReview", row.id,
                 purpose="operations", explainer=explainer_id, weights=subject.weights_sha256[:16],
                 approved=list(row.approved), rejected=sorted(row.rejected))
    return row


def in_force(session: Session, subject: ReviewSubject) -> ExplainerReview | None:
    """The newest review of exactly these weights and sampling settings, or None."""
    rows = session.scalars(select(ExplainerReview).where(ExplainerReview.weights_sha256 == subject.weights_sha256)
                           .order_by(ExplainerReview.created_at.desc()))
    return next((r for r in rows if r.settings == dict(subject.settings)), None)


def approved_codes(session: Session, subject: ReviewSubject) -> set[str]:
    """Conditions whose pictures patients may get; none without a review in force."""
    review = in_force(session, subject)
    return set(review.approved) & set(subject.codes) if review is not None else set()


def history(session: Session, limit: int = 20) -> list[ExplainerReview]:
    """The latest reviews of any explainer, newest first (for the console)."""
    return list(session.scalars(select(ExplainerReview).order_by(ExplainerReview.created_at.desc()).limit(limit)))


# --- the pictures the sign-off looks at ------------------------------------------------------------
def subject_digest(subject: ReviewSubject) -> str:
    """A short fingerprint of what a review would be bound to (weights, settings, conditions): the console's
    form carries it, so a sign-off is refused when the explainer changed between looking and signing, and
    the drawn pictures are kept under it."""
    return hashlib.sha256(json.dumps([subject.weights_sha256, subject.settings, list(subject.codes)],
                                     sort_keys=True).encode()).hexdigest()[:32]


def drawn_counts(session: Session, digest: str) -> dict[str, int]:
    """How many pictures of each condition are drawn for this digest."""
    rows = session.execute(select(ExplainerReviewPicture.condition_code, func.count())
                           .where(ExplainerReviewPicture.subject_digest == digest)
                           .group_by(ExplainerReviewPicture.condition_code))
    return {code: int(n) for code, n in rows}


def picture(session: Session, digest: str, code: str, position: int) -> bytes | None:
    row = session.get(ExplainerReviewPicture, (digest, code, position))
    return row.png if row is not None else None


def store_pictures(session: Session, digest: str, code: str, pngs: Sequence[bytes]) -> None:
    """Keep one condition's pictures (added to the session) and note the progress."""
    for position, png in enumerate(pngs):
        session.merge(ExplainerReviewPicture(subject_digest=digest, condition_code=code, position=position, png=png))
    _note(session, digest, progress_at=utcnow().isoformat(), problem=None)  # drawn: an earlier problem is over


def drawing_state(session: Session, digest: str) -> dict[str, Any]:
    """What is known about the drawing of this digest's pictures: ``requested_at``, ``progress_at`` (ISO
    times) and ``problem`` (why a worker could not draw them), each absent when not known."""
    row = session.get(KeyValue, (_DRAWING, digest))
    return dict(row.value or {}) if row is not None else {}


def claim_drawing(session: Session, digest: str, stale_after: timedelta, now: datetime | None = None) -> bool:
    """Whether the caller should ask a worker to draw now: nobody asked yet, or the last request or
    progress is older than ``stale_after`` (a lost task). Notes the request (added to the session)."""
    now = now or utcnow()
    state = drawing_state(session, digest)
    last = max((datetime.fromisoformat(state[k]) for k in ("requested_at", "progress_at") if state.get(k)),
               default=None)
    if last is not None and now - last < stale_after:
        return False
    _note(session, digest, requested_at=now.isoformat(), problem=None)
    return True


def note_drawing_alive(session: Session, digest: str) -> None:
    """A worker is on it (stepping aside for patients): the request is not lost."""
    _note(session, digest, progress_at=utcnow().isoformat())


def note_drawing_problem(session: Session, digest: str, problem: str) -> None:
    _note(session, digest, problem=problem)


def _note(session: Session, digest: str, **values: Any) -> None:
    row = session.get(KeyValue, (_DRAWING, digest))
    if row is None:
        row = KeyValue(namespace=_DRAWING, key=digest, value={})
        session.add(row)
    row.value = {k: v for k, v in {**(row.value or {}), **values}.items() if v is not None}
