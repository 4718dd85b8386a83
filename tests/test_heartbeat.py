"""Process heartbeat registry: one row per live process, with the master key it wraps new data keys
with; stale processes drop out of `alive`; `skinbridge check --liveness` tells a supervisor."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import func, select, update

from clinic_db import heartbeat
from clinic_db.models import ProcessHeartbeat, utcnow
from clinic_db.rotation import rotate
from tests.conftest import REPO_ROOT


def test_beat_upserts_one_row_per_process_with_the_key_in_use(any_clinic):
    heartbeat.beat(any_clinic, "worker", detail={"queues": "cpu"})
    heartbeat.beat(any_clinic, "worker", detail={"queues": "gpu,cpu"})
    with any_clinic.session() as s:
        assert s.scalar(select(func.count()).select_from(ProcessHeartbeat)) == 1
    [me] = heartbeat.alive(any_clinic, "worker")
    assert me.pid == os.getpid() and me.detail == {"queues": "gpu,cpu"}
    assert me.master_kid == any_clinic.vault.keyring.active_kid
    assert heartbeat.alive(any_clinic, "bot") == []

    # another process rotates the key: the next beat reports the new key id, without a restart
    new_kid = rotate(any_clinic).new_kid
    heartbeat.beat(any_clinic, "worker")
    assert [p.master_kid for p in heartbeat.alive(any_clinic)] == [new_kid]

    heartbeat.forget(any_clinic)
    assert heartbeat.alive(any_clinic) == []


def test_stale_process_is_not_alive(any_clinic):
    heartbeat.beat(any_clinic, "bot")
    with any_clinic.session() as s:
        s.execute(update(ProcessHeartbeat).values(last_seen=utcnow() - timedelta(seconds=120)))
        s.commit()
    assert heartbeat.alive(any_clinic, "bot", within_s=60) == []
    assert len(heartbeat.alive(any_clinic, "bot", within_s=300)) == 1


def test_beater_thread_beats_and_forgets_on_stop(any_clinic):
    beater = heartbeat.start(any_clinic, "api", interval_s=0.05)
    try:
        for _ in range(200):
            if heartbeat.alive(any_clinic, "api"):
                break
            beater._stop.wait(0.05)
        assert len(heartbeat.alive(any_clinic, "api")) == 1
    finally:
        beater.stop()
    assert heartbeat.alive(any_clinic, "api") == []


def _check_liveness(clinic, component: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "skinbridge", "check", "--liveness", component],
                          env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


def test_check_liveness_exits_nonzero_when_the_heartbeat_is_stale(clinic):
    done = _check_liveness(clinic, "bot")  # never beat
    assert done.returncode == 1 and "no bot process beat" in done.stderr, done.stderr
    heartbeat.beat(clinic, "bot")
    done = _check_liveness(clinic, "bot")
    assert done.returncode == 0, done.stderr
    with clinic.session() as s:
        s.execute(update(ProcessHeartbeat).values(last_seen=utcnow() - timedelta(seconds=600)))
        s.commit()
    done = _check_liveness(clinic, "bot")
    assert done.returncode == 1 and "no bot process beat" in done.stderr, done.stderr


def test_supervisor_stops_a_child_whose_heartbeat_went_stale(clinic):
    from skinbridge.settings import get_settings
    from skinbridge.supervisor import Child, stop_stale

    settings = get_settings()
    children = []
    for name in ("bot", "worker", "api"):
        child = Child(name, [name], component=name)
        child.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        children.append(child)
    bot, worker, api = children
    try:
        def row(component: str, pid: int, ppid: int, age_s: float) -> ProcessHeartbeat:
            seen = utcnow() - timedelta(seconds=age_s)
            return ProcessHeartbeat(process_id=f"{socket.gethostname()[:100]}:{pid}:x", component=component,
                                    host=socket.gethostname()[:100], pid=pid, ppid=ppid, started_at=seen,
                                    last_seen=seen, master_kid=None, detail=None)

        with clinic.session() as s:
            s.add(row("bot", bot.proc.pid, os.getpid(), settings.heartbeat_stale_s + 30))  # stuck
            s.add(row("worker", 999_999, worker.proc.pid, 1))  # its pool process beats: alive
            s.commit()  # the api has not beaten yet: starting up, left alone
        assert stop_stale(children, clinic, settings) == ["bot"]
        assert bot.proc.poll() is not None  # stopped; run_all's loop restarts it
        assert worker.proc.poll() is None and api.proc.poll() is None
    finally:
        for child in children:
            child.proc.kill()
            child.proc.wait()
