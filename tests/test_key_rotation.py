"""Key rotation cannot lose data (issue 24, problems 5 and 6).

- a rotation killed after any step is finished by running it again, and no data key is lost;
- a long-lived process that loaded the key ring before a rotation wraps new data keys with the new
  master key, so `keys rotate --retire` in another process cannot destroy a new patient's data;
- `--retire` refuses while a data key or a live process still uses the old key, and says which;
- a SQLite write lock held longer than the busy timeout delays the re-wrap, it does not fail it halfway.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading

import pytest
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import sessionmaker

from clinic_db import heartbeat, patients
from clinic_db.db import Clinic
from clinic_db.keys import KeyRing
from clinic_db.models import Patient, PatientKey
from clinic_db.rotation import FAULT_EXIT_CODE, JOURNAL, rotate
from clinic_db.vault import Vault
from tests.conftest import REPO_ROOT

STEPS = ["journal", "key", "activate", "rewrap-batch", "rewrap", "audit", "retire-one", "retire"]
# the rotation as `skinbridge keys rotate --retire --batch-size 1` runs it, without the CLI's start-up
# cost of importing every component (one test below goes through the real command)
DRIVER = "from clinic_db.db import get_clinic; from clinic_db.rotation import rotate; rotate(get_clinic(), retire_old=True, batch=1)"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), **extra}


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(**env), capture_output=True, text=True, timeout=120,
                          cwd=REPO_ROOT)


def _patients(clinic: Clinic, n: int, start: int = 5000) -> dict:
    ids = {}
    with clinic.session() as s:
        for i in range(n):
            p = patients.register(clinic, s, start + i, consent_version="2026-11", name=f"Patient {start + i}")
            ids[p.id] = f"Patient {start + i}"
        s.commit()
    return ids


def _fresh(clinic: Clinic) -> Clinic:
    """What a process started now sees: only the key directory and the database."""
    url = clinic.engine.url.render_as_string(hide_password=False)
    return Clinic.open(url, KeyRing.from_directory(clinic.vault.keyring.key_dir, create=False))


def _assert_all_readable(clinic: Clinic, ids: dict) -> None:
    fresh = _fresh(clinic)
    try:
        ring = fresh.vault.keyring
        with fresh.session() as s:
            kids = set(s.scalars(select(PatientKey.master_kid)))
            assert kids <= set(ring.masters), f"data keys under missing master keys: {kids - set(ring.masters)}"
            for pid, name in ids.items():
                assert fresh.vault.get_text(s, s.get(Patient, pid), "name") == name
    finally:
        fresh.dispose()


@pytest.mark.parametrize("step", STEPS)
def test_rotation_killed_after_any_step_is_finished_by_a_rerun(clinic, step):
    ids = _patients(clinic, 3)
    ring = clinic.vault.keyring
    old_kid = ring.active_kid

    crashed = _run("-c", DRIVER, SKINBRIDGE_FAULT_ROTATE_EXIT_AT=step)
    assert crashed.returncode == FAULT_EXIT_CODE, crashed.stderr
    assert (ring.key_dir / JOURNAL).exists()  # the crash left an unfinished rotation behind
    _assert_all_readable(clinic, ids)  # ...in a consistent state: every data key still opens

    rerun = _run("-c", DRIVER)
    assert rerun.returncode == 0, rerun.stderr
    assert not (ring.key_dir / JOURNAL).exists()
    ring.reload()
    # one rotation, finished: the rerun carried on with the key the crashed run had chosen
    assert list(ring.masters) == [ring.active_kid] and ring.active_kid != old_kid
    assert sorted(p.name for p in ring.key_dir.glob("*.key")) == ["blind-index.key", f"{ring.active_kid}.key"]
    with clinic.session() as s:
        assert set(s.scalars(select(PatientKey.master_kid))) == {ring.active_kid}
    _assert_all_readable(clinic, ids)


def test_killed_cli_rotation_on_postgresql_is_repaired(pg_clinic):
    ids = _patients(pg_clinic, 3)
    crashed = _run("-m", "skinbridge", "keys", "rotate", "--retire", "--batch-size", "1",
                   SKINBRIDGE_FAULT_ROTATE_EXIT_AT="rewrap-batch")
    assert crashed.returncode == FAULT_EXIT_CODE, crashed.stderr
    with pg_clinic.session() as s:  # half the data keys under each master key: both key files still there
        assert len(set(s.scalars(select(PatientKey.master_kid)))) == 2
    _assert_all_readable(pg_clinic, ids)
    rerun = _run("-m", "skinbridge", "keys", "rotate", "--retire")
    assert rerun.returncode == 0, rerun.stderr
    assert "finished interrupted rotation" in rerun.stdout
    _assert_all_readable(pg_clinic, ids)


def test_fault_injection_is_refused_in_production(clinic):
    done = _run("-m", "skinbridge", "keys", "rotate", SKINBRIDGE_PROFILE="production",
                SKINBRIDGE_FAULT_ROTATE_EXIT_AT="key")
    assert done.returncode == 2 and "SKINBRIDGE_FAULT_ROTATE_EXIT_AT" in done.stderr
    assert not (clinic.vault.keyring.key_dir / JOURNAL).exists()


def test_long_lived_process_wraps_with_the_new_key_after_retire_elsewhere(any_clinic):
    """Problem 6: the bot kept wrapping with the master key it had in memory after `--retire` deleted it."""
    _patients(any_clinic, 1)  # this process has loaded the ring and used it
    old_kid = any_clinic.vault.keyring.active_kid

    done = _run("-m", "skinbridge", "keys", "rotate", "--retire", "--wait", "0")
    assert done.returncode == 0, done.stderr
    assert f"retired: {old_kid}" in done.stdout

    new_patient = _patients(any_clinic, 1, start=6000)  # the next new patient, in the long-lived process
    _assert_all_readable(any_clinic, new_patient)  # readable by every other process, for good


def test_retire_refuses_while_a_live_process_uses_the_old_key(any_clinic):
    ids = _patients(any_clinic, 2)
    ring = any_clinic.vault.keyring
    old_kid = ring.active_kid
    heartbeat.beat(any_clinic, "bot")  # a live process that last said it wraps with the old key

    refused = _run("-m", "skinbridge", "keys", "rotate", "--retire", "--wait", "0")
    assert refused.returncode == 1
    assert old_kid in refused.stderr and f"live process bot pid {os.getpid()}" in refused.stderr
    assert (ring.key_dir / f"{old_kid}.key").exists()  # nothing deleted
    _assert_all_readable(any_clinic, ids)

    heartbeat.beat(any_clinic, "bot")  # its next beat: it has picked up the new key
    assert heartbeat.alive(any_clinic, "bot")[0].master_kid != old_kid
    done = _run("-m", "skinbridge", "keys", "rotate", "--retire", "--wait", "0")
    assert done.returncode == 0, done.stderr
    assert "finished interrupted rotation" in done.stdout and old_kid in done.stdout  # resumed, not rotated again
    assert not (ring.key_dir / f"{old_kid}.key").exists()
    _assert_all_readable(any_clinic, ids)


def test_retire_refuses_while_a_data_key_still_uses_the_old_key(clinic):
    ids = _patients(clinic, 2)
    old_kid = clinic.vault.keyring.active_kid
    broken = next(iter(ids))
    with clinic.session() as s:  # a data key the re-wrap cannot open (e.g. restored from a bad backup)
        s.execute(update(PatientKey).where(PatientKey.patient_id == broken).values(wrapped_key=b"\x01" + b"0" * 60))
        s.commit()
    refused = _run("-m", "skinbridge", "keys", "rotate", "--retire", "--wait", "0")
    assert refused.returncode == 1
    assert f"{old_kid}: 1 data key(s): {broken}" in refused.stderr
    assert (clinic.vault.keyring.key_dir / f"{old_kid}.key").exists()
    _assert_all_readable(clinic, {k: v for k, v in ids.items() if k != broken})


def test_sqlite_lock_longer_than_the_busy_timeout_delays_the_rewrap_but_it_completes(clinic_on, sqlite_url, caplog):
    """Problem 5: a writer held the lock past the busy timeout and the rotation stopped halfway (SQLite only,
    whichever backend the pass runs on)."""
    clinic = clinic_on(sqlite_url)
    ids = _patients(clinic, 3)
    path = clinic.engine.url.database
    impatient = Clinic(engine=create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.2}),
                       sessions=None, vault=Vault(clinic.vault.keyring))  # type: ignore[arg-type]
    impatient.sessions = sessionmaker(impatient.engine, expire_on_commit=False)
    saw_lock = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "locked" in record.getMessage():
                saw_lock.set()

    watch = Watch()
    logging.getLogger("clinic_db.rotation").addHandler(watch)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction

    def release() -> None:
        saw_lock.wait(30)  # until the rotation has met the lock at least once
        holder.execute("COMMIT")

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        report = rotate(impatient, batch=1)
    finally:
        releaser.join()
        holder.close()
        logging.getLogger("clinic_db.rotation").removeHandler(watch)
        impatient.dispose()
    assert saw_lock.is_set()
    assert report.rewrapped == 3
    with clinic.session() as s:
        assert s.scalar(select(func.count()).select_from(PatientKey).where(
            PatientKey.master_kid != report.new_kid)) == 0
    _assert_all_readable(clinic, ids)
