"""The sample pictures dermatologists sign off (console ``/explainer``), drawn by a gpu worker.

The worker that serves patients' pictures loads the explainer anyway, so it draws the samples too,
exactly as patients would get them (inference.engines: serving settings, captions), and keeps them in
the clinic database by the explainer's subject digest (clinic_db.explainer_review). Patients go first:
one task draws one condition and then queues the next, and while a case is in the pipeline the task
steps aside (queues itself a few seconds later), so a case step waits for one condition's pictures at
most, never for all of them.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clinic_db import explainer_review
from clinic_db.db import get_clinic
from clinic_db.models import Case, utcnow
from clinic_db.states import PIPELINE_STATES
from skinbridge.celery_app import app
from skinbridge.settings import get_settings

log = logging.getLogger(__name__)
STEP_ASIDE_S = 3.0  # how long the drawing waits when a patient's case is in the pipeline


def request(digest: str) -> None:
    """Ask a gpu worker to draw the pictures of ``digest`` (raises when the broker cannot be reached)."""
    draw_review_pictures.apply_async(args=[digest], retry=False)


@app.task(name="skinbridge.draw_review_pictures", queue="gpu", acks_late=True, reject_on_worker_lost=True,
          ignore_result=True)
def draw_review_pictures(digest: str) -> str | None:
    """Draw the first condition of ``digest`` that has no pictures yet, then queue the rest; returns the
    condition drawn (None when nothing was left or this worker serves another explainer)."""
    from inference.engines.registry import load_engines

    explainer = load_engines(get_settings()).explainer  # the worker's own, cached: the one patients get
    clinic = get_clinic()
    with clinic.session() as session:
        if explainer is None or explainer_review.subject_digest(explainer.review_subject) != digest:
            serves = ("no explanation generator" if explainer is None
                      else f"{explainer.model_id} with other weights or settings")
            problem = (f"the gpu worker serves {serves}, not the generator of this page: give the web app and the "
                       "workers the same SKINBRIDGE_GENERATOR_PATH / SKINBRIDGE_SD_PATH")
            log.warning("review pictures %s not drawn: %s", digest, problem)
            explainer_review.note_drawing_problem(session, digest, problem)
            session.commit()
            return None
        if _case_in_pipeline(session):  # patients first
            explainer_review.note_drawing_alive(session, digest)
            session.commit()
            draw_review_pictures.apply_async(args=[digest], countdown=STEP_ASIDE_S)
            return None
        drawn = explainer_review.drawn_counts(session, digest)
    todo = [c for c in explainer.review_subject.codes if drawn.get(c, 0) < explainer_review.REVIEW_PICTURES]
    if not todo:
        return None
    code = todo[0]
    pngs = explainer.render(code, explainer_review.REVIEW_PICTURES, explainer_review.REVIEW_SEED, "en")
    with clinic.session() as session:
        explainer_review.store_pictures(session, digest, code, pngs)
        try:
            session.commit()
        except IntegrityError:  # a second request's task drew the same condition at the same time
            session.rollback()
    log.debug("review pictures %s: %s drawn, %d conditions left", digest, code, len(todo) - 1)
    if len(todo) > 1:
        draw_review_pictures.apply_async(args=[digest])
    return code


def _case_in_pipeline(session: Session) -> bool:
    """A case queued or being analysed (not one stuck there: the sweeper deals with those)."""
    recent = utcnow() - timedelta(seconds=get_settings().stuck_after_s)
    return session.scalar(select(Case.id).where(Case.status.in_([s.value for s in PIPELINE_STATES]),
                                                Case.status_changed_at > recent).limit(1)) is not None
