"""Process heartbeat registry: which SkinBridge processes are alive, and which master key each wraps with.

API::

    beat(clinic, "worker", detail={"queues": "gpu,cpu"})  # upsert this process's row, last_seen = now
    alive(clinic, "bot", within_s=60)                     # processes seen in the last 60 s (all if None)
    forget(clinic)                                        # delete this process's row (clean shutdown)
    start(clinic, "api")                                  # a daemon thread that beats every
                                                          # heartbeat_interval_s; .stop() forgets

One row per live process in ``process_heartbeats``, keyed by host:pid:start time (a reused pid is a
new process). A row also records the master key id the process wraps *new* data keys with right
now, so ``skinbridge keys rotate --retire`` can refuse while a live process still uses the old key,
and ``skinbridge up`` / ``skinbridge check --liveness <component>`` can restart or flag a process
whose heartbeat went stale. Each call is one statement and a commit: nothing holds a SQLite write
lock for longer than that, and a beat that meets a locked database is skipped, not retried in a loop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import OperationalError

from clinic_db.db import Clinic
from clinic_db.models import ProcessHeartbeat, utcnow

log = logging.getLogger(__name__)

_started: dict[int, datetime] = {}  # pid -> when this process first beat (a forked child gets its own)


@dataclass(frozen=True)
class Process:
    process_id: str
    component: str
    host: str
    pid: int
    ppid: int
    started_at: datetime
    last_seen: datetime
    master_kid: str | None
    detail: dict[str, Any] | None

    def describe(self, now: datetime | None = None) -> str:
        age = ((now or utcnow()) - self.last_seen).total_seconds()
        return f"{self.component} pid {self.pid} on {self.host} (seen {age:.0f} s ago, wraps with {self.master_kid})"


def _identity() -> tuple[str, str, int, datetime]:
    pid = os.getpid()
    started = _started.setdefault(pid, utcnow())
    host = socket.gethostname()[:100]
    return f"{host}:{pid}:{started.strftime('%Y%m%dT%H%M%S.%f')}", host, pid, started


def current_process_id() -> str:
    return _identity()[0]


def beat(clinic: Clinic, component: str, *, detail: dict[str, Any] | None = None) -> None:
    """Record that this process is alive now, with the master key id it wraps new data keys with."""
    process_id, host, pid, started = _identity()
    values = dict(
        process_id=process_id, component=component, host=host, pid=pid, ppid=os.getppid(),
        started_at=started, last_seen=utcnow(), master_kid=clinic.vault.keyring.current_kid(), detail=detail,
    )
    insert = pg_insert if clinic.engine.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(ProcessHeartbeat).values(**values)
    stmt = stmt.on_conflict_do_update(
        index_elements=[ProcessHeartbeat.process_id],
        set_={k: stmt.excluded[k] for k in ("component", "last_seen", "master_kid", "detail", "ppid")},
    )
    with clinic.engine.begin() as conn:
        conn.execute(stmt)


def alive(clinic: Clinic, component: str | None = None, within_s: float = 60.0) -> list[Process]:
    """Processes (of ``component``, or all) whose last beat is at most ``within_s`` seconds old."""
    since = utcnow() - timedelta(seconds=within_s)
    query = select(ProcessHeartbeat).where(ProcessHeartbeat.last_seen >= since)
    if component is not None:
        query = query.where(ProcessHeartbeat.component == component)
    with clinic.session() as session:
        rows = session.scalars(query.order_by(ProcessHeartbeat.component, ProcessHeartbeat.last_seen)).all()
        return [Process(r.process_id, r.component, r.host, r.pid, r.ppid, r.started_at, r.last_seen,
                        r.master_kid, r.detail) for r in rows]


def forget(clinic: Clinic) -> None:
    """Remove this process's row (clean shutdown), so it is not mistaken for a stuck one."""
    with clinic.engine.begin() as conn:
        conn.execute(delete(ProcessHeartbeat).where(ProcessHeartbeat.process_id == current_process_id()))


def prune(clinic: Clinic, older_than_s: float = 7 * 86400) -> int:
    """Delete rows of processes not seen for a long time (killed without a clean shutdown)."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    with clinic.engine.begin() as conn:
        return conn.execute(delete(ProcessHeartbeat).where(ProcessHeartbeat.last_seen < cutoff)).rowcount


class Beater:
    """A daemon thread that beats every ``interval_s``; a failed beat is logged and the next one tried."""

    def __init__(self, clinic: Clinic, component: str, interval_s: float, detail: dict[str, Any] | None = None):
        self.clinic, self.component, self.interval_s, self.detail = clinic, component, interval_s, detail
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{component}", daemon=True)

    def _run(self) -> None:
        while True:
            try:
                beat(self.clinic, self.component, detail=self.detail)
            except OperationalError as exc:  # e.g. SQLite `database is locked`: the next beat will do
                log.warning("heartbeat of %s skipped: %s", self.component, exc.orig)
            except Exception:  # noqa: BLE001 - the heartbeat thread must never die
                log.exception("heartbeat of %s failed", self.component)
            if self._stop.wait(self.interval_s):
                return

    def start(self) -> "Beater":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            forget(self.clinic)
        except Exception:  # noqa: BLE001 - a stale row just ages out
            log.warning("could not remove the heartbeat row of %s", self.component, exc_info=True)


def start(clinic: Clinic, component: str, *, interval_s: float | None = None,
          detail: dict[str, Any] | None = None) -> Beater:
    """Start beating for this process in a background thread (interval: settings.heartbeat_interval_s)."""
    if interval_s is None:
        from skinbridge.settings import get_settings

        interval_s = get_settings().heartbeat_interval_s
    return Beater(clinic, component, interval_s, detail).start()
