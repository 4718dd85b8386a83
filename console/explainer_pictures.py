"""The explainer as the console shows it to the dermatologist who signs off its pictures.

The web process loads the same explainer the workers serve (inference.engines.registry, same
settings) for what a sign-off is bound to (weights, settings, conditions, measured recognition); it
never draws. A gpu worker draws the sample pictures (inference.explainer_tasks) into the clinic
database (clinic_db.explainer_review), and the page fills them in as they arrive.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clinic_db import explainer_review
from clinic_db.models import utcnow
from skinbridge.settings import get_settings

log = logging.getLogger(__name__)
# no picture after this long: the page says a gpu worker may not be running
NO_WORKER_HINT_AFTER = timedelta(seconds=60)

_lock = threading.Lock()
_explainers: dict[tuple[Any, ...], Any] = {}


def current_explainer() -> Any | None:
    """The explainer this deployment's workers serve, or None when none is configured."""
    from inference.engines.registry import engine_key, load_explainer_for
    from inference.vocabulary import load_vocabulary

    settings = get_settings()
    key = engine_key(settings)
    with _lock:
        if key not in _explainers:
            _explainers[key] = load_explainer_for(settings, settings.device, vocabulary=load_vocabulary())
        return _explainers[key]


def subject_digest(explainer: Any) -> str:
    return explainer_review.subject_digest(explainer.review_subject)


@dataclass
class Drawing:
    """How far the workers are with one digest's pictures, for the page and its progress poll."""

    counts: dict[str, int]  # condition -> pictures drawn
    total: int
    problem: str | None

    @property
    def drawn(self) -> int:
        return sum(min(n, explainer_review.REVIEW_PICTURES) for n in self.counts.values())

    @property
    def done(self) -> bool:
        return self.drawn >= self.total

    def as_json(self) -> dict[str, Any]:
        return {"counts": self.counts, "drawn": self.drawn, "total": self.total, "done": self.done,
                "problem": self.problem}


def drawing(session: Session, explainer: Any) -> Drawing:
    """The pictures drawn so far; asks a gpu worker for the rest when nobody has (or the request was lost).

    Commits the session (the request is noted before the task is sent, so two pages do not both send it).
    """
    digest = subject_digest(explainer)
    codes = explainer.review_subject.codes
    counts = explainer_review.drawn_counts(session, digest)
    state = explainer_review.drawing_state(session, digest)
    result = Drawing(counts, explainer_review.REVIEW_PICTURES * len(codes), state.get("problem"))
    if result.done:
        return result
    settings = get_settings()
    try:  # a lost request (worker killed, broker flushed) is asked again after a task's time limit
        asked = explainer_review.claim_drawing(session, digest, timedelta(seconds=settings.task_time_limit))
        session.commit()
    except IntegrityError:  # another page asked at the same moment
        session.rollback()
        asked = False
    if asked:
        from inference.explainer_tasks import request

        try:
            request(digest)
        except Exception as exc:  # noqa: BLE001 - the page still answers; it says what is wrong
            log.warning("could not ask a worker to draw review pictures %s: %s", digest, exc)
            explainer_review.note_drawing_problem(session, digest, f"the task queue cannot be reached ({exc})")
            session.commit()
            result.problem = explainer_review.drawing_state(session, digest).get("problem")
    elif result.drawn == 0 and result.problem is None:
        requested = state.get("requested_at")
        if requested and utcnow() - datetime.fromisoformat(requested) > NO_WORKER_HINT_AFTER:
            result.problem = ("no picture drawn yet: is a worker serving the gpu queue running "
                              "(skinbridge worker --queues gpu)?")
    return result
