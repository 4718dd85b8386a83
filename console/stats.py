"""Service figures for the admin page: queue load, waiting times, and how often dermatologists agree
with each model. Aggregates only: no patient data leaves this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from clinic_db.models import AIResult, Case, CaseMessage, ReviewTask, utcnow
from clinic_db.review import URGENCY_PRIORITY
from inference.engines.base import MODEL_FAILURE_FLAGS


@dataclass(frozen=True)
class ModelAgreement:
    model_id: str
    accepted: int
    amended: int

    @property
    def total(self) -> int:
        return self.accepted + self.amended

    @property
    def rate(self) -> float:
        return self.accepted / self.total if self.total else 0.0


@dataclass
class ServiceStats:
    waiting_by_urgency: dict[str, int]
    waiting_total: int
    overdue: int
    wait_median_h: float | None  # tasks still waiting: time since they were opened
    wait_p90_h: float | None
    decision_median_h: float | None  # decided in the window: time from opening to decision
    decision_p90_h: float | None
    decided_in_window: int
    window_days: int
    agreement: list[ModelAgreement] = field(default_factory=list)
    # cases that went on without a model that failed (VLM, explainer, follow-up VLM), in the window
    model_failures: dict[str, int] = field(default_factory=dict)


def _hours(values: list[timedelta]) -> np.ndarray:
    return np.array([v.total_seconds() / 3600 for v in values], dtype=float)


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values.size else None


def compute(session: Session, *, now: datetime | None = None, window_days: int = 30) -> ServiceStats:
    now = now or utcnow()
    waiting = list(session.scalars(select(ReviewTask).where(ReviewTask.status.in_(("open", "waiting_patient")))))
    by_urgency = {u: 0 for u in URGENCY_PRIORITY}
    for task in waiting:
        by_urgency[task.urgency] = by_urgency.get(task.urgency, 0) + 1
    waits = _hours([now - t.created_at for t in waiting])

    decided = list(session.scalars(
        select(ReviewTask)
        .where(ReviewTask.status == "decided", ReviewTask.decided_at >= now - timedelta(days=window_days))
        .options(selectinload(ReviewTask.case).selectinload(Case.ai_results))
    ))
    durations = _hours([t.decided_at - t.created_at for t in decided if t.decided_at])

    counts: dict[str, list[int]] = {}
    for task in decided:
        if task.decision not in ("accept", "amend"):
            continue
        # the model whose assessment the dermatologist saw: the newest result before the decision
        seen = [r for r in task.case.ai_results if task.decided_at is None or r.created_at <= task.decided_at]
        if not seen:
            continue
        model = max(seen, key=lambda r: r.created_at).model_id
        pair = counts.setdefault(model, [0, 0])
        pair[0 if task.decision == "accept" else 1] += 1

    return ServiceStats(
        waiting_by_urgency=by_urgency,
        waiting_total=len(waiting),
        overdue=sum(1 for t in waiting if t.due_at < now),
        wait_median_h=_pct(waits, 50),
        wait_p90_h=_pct(waits, 90),
        decision_median_h=_pct(durations, 50),
        decision_p90_h=_pct(durations, 90),
        decided_in_window=len(decided),
        window_days=window_days,
        agreement=sorted((ModelAgreement(m, a, b) for m, (a, b) in counts.items()), key=lambda x: x.model_id),
        model_failures=_model_failures(session, now - timedelta(days=window_days)),
    )


def _model_failures(session: Session, since: datetime) -> dict[str, int]:
    counts = dict.fromkeys(MODEL_FAILURE_FLAGS, 0)
    rows = [*session.scalars(select(AIResult.flags).where(AIResult.created_at >= since)),
            *session.scalars(select(CaseMessage.flags).where(CaseMessage.created_at >= since,
                                                             CaseMessage.role == "assistant"))]
    for flags in rows:
        for flag in set(flags or ()) & counts.keys():
            counts[flag] += 1
    return counts


@dataclass(frozen=True)
class Bar:
    label: str
    y: int
    accepted_w: float
    amended_w: float
    text: str


def agreement_bars(agreement: list[ModelAgreement], width: int = 360) -> list[Bar]:
    """Geometry of the stacked accepted/amended bars drawn as inline SVG by the admin template."""
    bars = []
    for i, item in enumerate(agreement):
        scale = width / item.total if item.total else 0
        bars.append(Bar(
            label=item.model_id if len(item.model_id) <= 40 else "…" + item.model_id[-39:],
            y=30 + i * 44,
            accepted_w=round(item.accepted * scale, 1),
            amended_w=round(item.amended * scale, 1),
            text=f"{item.rate:.0%} agreed ({item.accepted}/{item.total})",
        ))
    return bars
