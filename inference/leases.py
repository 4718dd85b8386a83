"""Leases on pipeline work: which live process holds which case right now.

A worker takes a lease when a step starts (``inference.tasks.case_step``) and renews it from a
background thread every ``ttl / 4`` while the step runs; it releases the lease once the task is over
and the chain's next message is in the broker (Celery's ``task_postrun``). ``submit_case`` and the
sweeper hold a *hand-off* lease from the commit that queues a case until its chain is published.

For the sweeper (``inference.tasks.sweep``) this separates three things wall-clock age cannot:

* **held**: an unreleased, unexpired lease: a worker is on it, however long it takes;
* **lost**: an unreleased lease past its expiry: its holder died (SIGKILL, OOM, hard time limit, a
  crash before the hand-off to the broker) and the work must be redone;
* **waiting**: no unreleased lease: the next step is in the queue. A backlog is waiting, never lost.

Every write is one short statement in its own transaction, so a lease never holds a SQLite write lock
and a renewal that meets a locked database is skipped (the next one comes long before expiry).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from clinic_db.db import Clinic
from clinic_db.models import TaskLease, utcnow

log = logging.getLogger(__name__)


def holder() -> str:
    return f"{socket.gethostname()[:100]}:{os.getpid()}"


def renew_every(ttl_s: float) -> float:
    return max(0.05, min(30.0, ttl_s / 4))


def take(session: Session, case_id: uuid.UUID, task_id: str, step: str, ttl_s: float) -> None:
    """Hold ``case_id`` under ``task_id`` (upsert: a redelivered task takes over its dead row). Caller commits."""
    now = utcnow()
    values = dict(task_id=task_id, case_id=case_id, step=step[:64], holder=holder(), acquired_at=now,
                  renewed_at=now, expires_at=now + timedelta(seconds=ttl_s), released_at=None)
    insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    stmt = insert(TaskLease).values(**values)
    session.execute(stmt.on_conflict_do_update(index_elements=[TaskLease.task_id],
                                               set_={k: v for k, v in values.items() if k != "task_id"}))


def release(clinic: Clinic, task_id: str) -> None:
    now = utcnow()
    try:
        with clinic.engine.begin() as conn:
            conn.execute(update(TaskLease).where(TaskLease.task_id == task_id, TaskLease.released_at.is_(None))
                         .values(released_at=now, renewed_at=now))
    except SQLAlchemyError:
        # unreleased, the lease expires and the sweeper re-runs the (idempotent) chain: late, never lost
        log.warning("could not release lease %s", task_id, exc_info=True)


def renew(clinic: Clinic, task_id: str, ttl_s: float) -> bool:
    now = utcnow()
    try:
        with clinic.engine.begin() as conn:
            result = conn.execute(
                update(TaskLease).where(TaskLease.task_id == task_id, TaskLease.released_at.is_(None))
                .values(renewed_at=now, expires_at=now + timedelta(seconds=ttl_s))
            )
        return bool(result.rowcount)
    except SQLAlchemyError as exc:
        log.warning("lease %s not renewed this time (%s)", task_id, type(exc).__name__)
        return False


class Held:
    """A lease taken in its own transaction and renewed by a daemon thread until :meth:`release`."""

    def __init__(self, clinic: Clinic, case_id: uuid.UUID, task_id: str, step: str, ttl_s: float):
        self.clinic, self.task_id, self.ttl_s = clinic, task_id, ttl_s
        self._stop = threading.Event()
        with clinic.session() as session:
            take(session, case_id, task_id, step, ttl_s)
            session.commit()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{task_id}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(renew_every(self.ttl_s)):
            renew(self.clinic, self.task_id, self.ttl_s)

    def release(self, keep_s: float | None = None) -> None:
        """Stop renewing and release; with ``keep_s``, leave the lease held that much longer instead
        (a step waiting for its retry: should this process die meanwhile, the lease expires)."""
        self._stop.set()
        self._thread.join(timeout=5)
        if keep_s is None:
            release(self.clinic, self.task_id)
        else:
            renew(self.clinic, self.task_id, keep_s)


@dataclass
class Survey:
    """What the sweeper sees at ``now``."""

    now: datetime
    held: set[uuid.UUID] = field(default_factory=set)  # cases some live process is working on
    lost: dict[uuid.UUID, list[str]] = field(default_factory=dict)  # case -> task ids of dead holders
    last_activity: datetime | None = None  # the latest take, renewal or release of any lease

    def idle_since(self, cutoff: datetime) -> bool:
        """No lease held, and none taken, renewed or released after ``cutoff``: no worker made progress."""
        return not self.held and (self.last_activity is None or self.last_activity < cutoff)


def survey(session: Session, now: datetime | None = None) -> Survey:
    now = now or utcnow()
    view = Survey(now=now)
    rows = session.execute(
        select(TaskLease.task_id, TaskLease.case_id, TaskLease.expires_at).where(TaskLease.released_at.is_(None))
    ).all()
    for task_id, case_id, expires_at in rows:
        if expires_at > now:
            view.held.add(case_id)
        else:
            view.lost.setdefault(case_id, []).append(task_id)
    view.last_activity = session.scalar(select(func.max(TaskLease.renewed_at)))
    return view


def settle(session: Session, task_ids: list[str], now: datetime) -> None:
    """Mark dead holders' leases released (their work is being redone). Caller commits."""
    session.execute(update(TaskLease).where(TaskLease.task_id.in_(task_ids), TaskLease.released_at.is_(None))
                    .values(released_at=now).execution_options(synchronize_session=False))


def prune(session: Session, before: datetime) -> None:
    """Drop released leases older than ``before`` (kept until then as the record of recent activity)."""
    session.execute(delete(TaskLease).where(TaskLease.released_at < before)
                    .execution_options(synchronize_session=False))
