"""A dermatologist's sign-off of the explanation pictures, the gate between a generator and patients.

A generator's recognition bar (the classifier naming its pictures as their class) is necessary but
not enough: a 48 px classifier read noisy skin texture as seborrheic keratosis. So patients get
pictures of a condition only after a dermatologist of this clinic looked at that condition's
pictures, drawn exactly as patients would get them, and approved it in the console
(``/console/explainer``, console/app.py). A review is bound to what was looked at, the explainer's
weights digest and sampling settings: new weights or other settings need a new review. Reviews are
append-only and audited; the newest one for the same weights and settings is in force.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.models import Clinician, ExplainerReview


class ReviewSubject(Protocol):
    """What a review covers (inference.engines.clinical_review.ReviewSubject)."""

    codes: tuple[str, ...]
    weights_sha256: str
    settings: dict[str, Any]


class ReviewError(ValueError):
    """A sign-off that cannot be recorded as asked; the message says why."""


class MissingReason(ReviewError):
    """Rejected conditions without a reason: the next reviewer (and the audit) must see why."""

    def __init__(self, codes: Sequence[str]) -> None:
        self.codes = list(codes)
        super().__init__(f"say why the pictures are not fit to show: {', '.join(self.codes)}")


def record(session: Session, reviewer: Clinician, subject: ReviewSubject, *, explainer_id: str,
           approve: Sequence[str], reject: Mapping[str, str]) -> ExplainerReview:
    """Record a dermatologist's decisions on an explainer's conditions (added to the session, audited).

    Conditions not named are not approved: each review states the whole decision for these weights.
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
