"""Master-key rotation that cannot lose data: resumable, idempotent steps, and a retire that refuses
while anything still uses the old key.

Steps (each safe to repeat; a crash at any point is repaired by running ``skinbridge keys rotate``
again, which finds the journal and carries on with the same new key):

1. ``journal``  - ``ROTATION`` in the key directory names the new key id;
2. ``key``      - the new master key file is written (atomically), not active yet;
3. ``activate`` - ``ACTIVE`` switches to it (atomic rename); every process re-checks ``ACTIVE``
                  before it wraps a new data key (KeyRing.current_kid), so none keeps using the old one;
4. ``rewrap``   - data keys are re-wrapped in short batches, one transaction each, retried when
                  SQLite says ``database is locked``; a key that cannot be unwrapped is left as is;
5. ``audit``    - one ``keys.rotate`` audit event;
6. ``retire``   - (``--retire``) an old key file is deleted only when no data key and no live process
                  (clinic_db.heartbeat, seen within ``heartbeat_stale_s``) uses it; otherwise it
                  waits up to ``wait_s`` for processes to pick up the new key, then refuses and says
                  which data keys and processes hold it;
7. the journal is removed. A refused retire keeps it, so ``keys rotate --retire`` later resumes this
   rotation instead of starting another; a plain ``keys rotate`` finishes it without retiring.

SKINBRIDGE_FAULT_ROTATE_EXIT_AT=<step> makes the process exit right after that step (crash tests;
refused in production by Settings.check_safe).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from clinic_db import audit, heartbeat
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.keys import DecryptionError, KeyRing, KeyUnavailable, new_kid
from clinic_db.models import PatientKey, utcnow

log = logging.getLogger(__name__)

JOURNAL = "ROTATION"
FAULT_EXIT_CODE = 86
T = TypeVar("T")


class RotationBusy(RuntimeError):
    """Another rotation holds the key directory's lock."""


class RetireRefused(RuntimeError):
    """An old master key is still in use; the message says by which data keys and processes."""

    def __init__(self, in_use: dict[str, list[str]]):
        self.in_use = in_use
        lines = [f"{kid}: " + "; ".join(users) for kid, users in sorted(in_use.items())]
        super().__init__("refusing to retire master keys still in use:\n  " + "\n  ".join(lines))


@dataclass
class RotationReport:
    new_kid: str
    rewrapped: int
    retired: list[str] = field(default_factory=list)
    resumed: bool = False
    unreadable: list[str] = field(default_factory=list)  # data keys the rewrap could not open


def _fault(step: str) -> None:
    from skinbridge.settings import get_settings

    if get_settings().fault_rotate_exit_at == step:
        log.warning("fault injection: exiting after rotation step %s", step)
        os._exit(FAULT_EXIT_CODE)


def _retrying(what: str, fn: Callable[[], T], attempts: int = 8) -> T:
    """Run one short transaction, again after a pause when the database is locked (SQLite under load)."""
    for attempt in range(attempts):
        try:
            return fn()
        except OperationalError as exc:
            if "locked" not in str(exc.orig).lower() and "deadlock" not in str(exc.orig).lower():
                raise
            if attempt == attempts - 1:
                raise
            log.warning("%s: %s; retrying", what, exc.orig)
            time.sleep(min(2.0, 0.1 * 2**attempt))
    raise AssertionError("unreachable")


@contextmanager
def _exclusive(key_dir: Path) -> Iterator[None]:
    """One rotation at a time on this key directory."""
    with open(key_dir / f"{JOURNAL}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RotationBusy("another `skinbridge keys rotate` is running on this key directory") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pending(ring: KeyRing) -> dict | None:
    """The journal of an unfinished rotation, or None."""
    if ring.key_dir is None or not (ring.key_dir / JOURNAL).exists():
        return None
    return json.loads((ring.key_dir / JOURNAL).read_text())


def _write_journal(key_dir: Path, journal: dict) -> None:
    tmp = key_dir / f".{JOURNAL}.tmp"
    tmp.write_text(json.dumps(journal))
    tmp.replace(key_dir / JOURNAL)


def rewrap(clinic: Clinic, *, batch: int = 100) -> tuple[int, list[str]]:
    """Re-wrap every data key not under the active master key, ``batch`` rows per transaction.

    Returns (how many changed, ids of data keys that could not be unwrapped). Idempotent; runs while
    the system serves (only the 60-byte wrapped keys change, never fields or images)."""
    ring = clinic.vault.keyring
    changed, unreadable_ids = 0, []

    def one_batch() -> int:
        active = ring.current_kid()
        with clinic.session() as s:
            rows = s.execute(
                select(PatientKey.patient_id, PatientKey.wrapped_key, PatientKey.master_kid)
                .where(PatientKey.master_kid != active, PatientKey.patient_id.notin_(unreadable_ids))
                .order_by(PatientKey.patient_id).limit(batch)
            ).all()
            for owner, wrapped, kid in rows:
                try:
                    key = ring.unwrap(wrapped, kid, str(owner))
                except (KeyUnavailable, DecryptionError) as exc:
                    log.error("data key %s cannot be re-wrapped: %s", owner, exc)
                    unreadable_ids.append(owner)
                    continue
                new_wrapped, new_kid_ = ring.wrap(key, str(owner))
                # conditional: a data key erased or re-wrapped meanwhile is left alone
                s.execute(update(PatientKey).where(PatientKey.patient_id == owner, PatientKey.master_kid == kid)
                          .values(wrapped_key=new_wrapped, master_kid=new_kid_, rotated_at=utcnow()))
            s.commit()
            return len(rows)

    while True:
        before = len(unreadable_ids)
        seen = _retrying("re-wrapping data keys", one_batch)
        if seen == 0:
            break
        changed += seen - (len(unreadable_ids) - before)
        _fault("rewrap-batch")
    return changed, [str(i) for i in unreadable_ids]


def keys_in_use(clinic: Clinic, kids: set[str]) -> dict[str, list[str]]:
    """Which of ``kids`` still wrap a data key or are used by a live process, and by whom."""
    from skinbridge.settings import get_settings

    in_use: dict[str, list[str]] = {}
    with clinic.session() as s:
        for kid, count in s.execute(select(PatientKey.master_kid, func.count())
                                    .where(PatientKey.master_kid.in_(kids)).group_by(PatientKey.master_kid)):
            owners = s.scalars(select(PatientKey.patient_id).where(PatientKey.master_kid == kid).limit(5)).all()
            more = f" and {count - len(owners)} more" if count > len(owners) else ""
            in_use.setdefault(kid, []).append(
                f"{count} data key(s): {', '.join(map(str, owners))}{more}")
    now = utcnow()
    for proc in heartbeat.alive(clinic, within_s=get_settings().heartbeat_stale_s):
        if proc.master_kid in kids and proc.process_id != heartbeat.current_process_id():
            in_use.setdefault(proc.master_kid, []).append("live process " + proc.describe(now))
    return in_use


def retire_unused(clinic: Clinic, *, wait_s: float = 0.0, poll_s: float = 1.0) -> list[str]:
    """Delete every master key file except the active one, once nothing uses it.

    Waits up to ``wait_s`` for stragglers (data keys wrapped just before the switch are re-wrapped,
    live processes pick up the new key at their next beat); then raises :class:`RetireRefused`."""
    ring = clinic.vault.keyring
    deadline = time.monotonic() + wait_s
    while True:
        ring.reload()
        old = set(ring.masters) - {ring.current_kid()}
        if not old:
            return []
        rewrap(clinic)  # data keys a process wrapped with the old key just before the switch
        in_use = keys_in_use(clinic, old)
        if not in_use:
            break
        if time.monotonic() >= deadline:
            raise RetireRefused(in_use)
        time.sleep(poll_s)
    retired = []
    for kid in sorted(old):
        ring.retire(kid)
        retired.append(kid)

        def record(kid: str = kid) -> None:
            with clinic.session() as s:
                audit.record(s, Actor.system("keys"), "keys.retire", "MasterKey", kid, purpose="operations")
                s.commit()

        _retrying("recording the retirement", record)
        _fault("retire-one")
    return retired


def rotate(clinic: Clinic, *, retire_old: bool = False, wait_s: float = 0.0, batch: int = 100) -> RotationReport:
    """Rotate to a new master key, or finish an interrupted rotation (see the module docstring)."""
    ring = clinic.vault.keyring
    if ring.key_dir is None:
        raise KeyUnavailable("inline keys are rotated by the secret store, not by SkinBridge")
    key_dir = ring.key_dir
    with _exclusive(key_dir):
        journal = pending(ring)
        resumed = journal is not None
        if journal is None:
            journal = {"new_kid": new_kid(), "started_at": utcnow().isoformat()}
            _write_journal(key_dir, journal)
            _fault("journal")
        kid = journal["new_kid"]
        ring.create_master(kid)
        _fault("key")
        ring.activate(kid)
        _fault("activate")
        rewrapped, unreadable = rewrap(clinic, batch=batch)
        _fault("rewrap")

        def record() -> None:
            with clinic.session() as s:
                audit.record(s, Actor.system("keys"), "keys.rotate", "MasterKey", kid,
                             purpose="operations", rewrapped=rewrapped, resumed=resumed, unreadable=len(unreadable))
                s.commit()

        _retrying("recording the rotation", record)
        _fault("audit")
        # a refusal raises and keeps the journal: `keys rotate --retire` later resumes this rotation
        retired = retire_unused(clinic, wait_s=wait_s) if retire_old else []
        _fault("retire")
        (key_dir / JOURNAL).unlink()
    return RotationReport(new_kid=kid, rewrapped=rewrapped, retired=retired, resumed=resumed, unreadable=unreadable)
