"""The sweeper tells work from loss (inference.leases, inference.tasks.sweep).

In-process tests call the sweep task directly against a real database and the embedded broker folder
(chains it publishes are counted as message files); lease expiry is set in the database rather than
waited for. The process tests run a real worker: a backlog longer than 3 x stuck_after_s completes
with no failure, a worker SIGKILLed mid-step is still recovered.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select, update

from clinic_db import cases, patients
from clinic_db.audit import Actor
from clinic_db.models import AuditEvent, Case, OutboxMessage, TaskLease, utcnow
from clinic_db.states import CaseStatus
from inference import leases
from inference.pipeline import case_chain, mark_history_complete, submit_case
from inference.quality import sanitize
from inference.tasks import sweep
from skinbridge.celery_app import app, configure
from skinbridge.settings import get_settings, reset_settings_cache
from tests.e2e_support import Worker, tiny_model_env
from tests.support import wait_for

REPO = Path(__file__).resolve().parent.parent
DONE = {CaseStatus.preliminary.value, CaseStatus.in_review.value}
STUCK_S = 60.0  # in-process tests move times in the database instead of waiting


@pytest.fixture
def swept(clinic, monkeypatch):
    """This process configured like a worker with the sweeper, on the test's database and broker folder."""
    monkeypatch.setenv("SKINBRIDGE_STUCK_AFTER_S", str(STUCK_S))
    reset_settings_cache()
    configure(app, get_settings())
    yield clinic
    reset_settings_cache()
    configure(app, get_settings())


def _photo() -> cases.CleanImage:
    buf = io.BytesIO()
    PILImage.new("RGB", (320, 240), (180, 120, 100)).save(buf, format="JPEG")
    return sanitize(buf.getvalue())


def _case(clinic, status: CaseStatus = CaseStatus.received, *, age_s: float = 0.0, photo: bool = True,
          complete_age_s: float | None = None) -> uuid.UUID:
    with clinic.session() as s:
        p = patients.register(clinic, s, uuid.uuid4().int % 10**9, consent_version="2026-11")
        case = cases.open_case(clinic, s, p)
        if photo:
            cases.add_image(clinic, s, case, _photo(), source_ref=f"{case.id}:0")
        path = {CaseStatus.queued: [CaseStatus.queued],
                CaseStatus.analysing: [CaseStatus.queued, CaseStatus.analysing]}.get(status, [])
        for target in path:
            cases.transition(s, case, target, Actor.system("test"))
        if complete_age_s is not None:
            mark_history_complete(s, case)
            case.history_completed_at = utcnow() - timedelta(seconds=complete_age_s)
        s.commit()
        s.execute(update(Case).where(Case.id == case.id)
                  .values(status_changed_at=utcnow() - timedelta(seconds=age_s)))
        s.commit()
        return case.id


def _lease(clinic, case_id: uuid.UUID, *, expires_in_s: float, released_ago_s: float | None = None) -> str:
    task_id = f"t-{uuid.uuid4()}"
    with clinic.session() as s:
        leases.take(s, case_id, task_id, "skinbridge.diagnose", STUCK_S)
        now = utcnow()
        values = {"expires_at": now + timedelta(seconds=expires_in_s)}
        if released_ago_s is not None:
            values |= {"released_at": now - timedelta(seconds=released_ago_s),
                       "renewed_at": now - timedelta(seconds=released_ago_s)}
        s.execute(update(TaskLease).where(TaskLease.task_id == task_id).values(**values))
        s.commit()
    return task_id


def _published() -> int:
    """Chains in the embedded broker (each starts with analyse on the gpu queue)."""
    return len([n for n in os.listdir(get_settings().broker_folder / "out") if n.endswith(".gpu.msg")])


def _get(clinic, case_id: uuid.UUID) -> Case:
    with clinic.session() as s:
        case = s.get(Case, case_id)
        s.expunge(case)
        return case


# --- in-process ---------------------------------------------------------------------------------
def test_a_case_held_by_a_live_lease_is_left_alone_however_long_it_runs(swept):
    case_id = _case(swept, CaseStatus.analysing, age_s=86400)
    _lease(swept, case_id, expires_in_s=30)
    assert sweep() == {"requeued": 0, "resent": 0, "submitted": 0, "notified": 0}
    case = _get(swept, case_id)
    assert (case.status, case.pipeline_attempts, _published()) == ("analysing", 0, 0)


def test_a_waiting_case_is_never_failed_and_is_resent_only_when_no_worker_progresses(swept):
    waiting = _case(swept, CaseStatus.analysing, age_s=10 * STUCK_S)  # its next step sits in a long queue
    busy = _case(swept, CaseStatus.analysing)
    lease = _lease(swept, busy, expires_in_s=30)  # the worker is busy with another case
    for _ in range(3):
        assert sweep()["resent"] == 0
    leases.release(swept, lease)  # just finished a step: still progress
    assert sweep()["resent"] == 0
    assert _get(swept, waiting).status == "analysing" and _published() == 0
    with swept.session() as s:  # no worker has done anything for longer than stuck_after_s
        s.execute(update(TaskLease).values(renewed_at=utcnow() - timedelta(seconds=2 * STUCK_S)))
        s.commit()
    case_chain(busy).apply_async()  # ... but the broker still holds work: a backlog, maybe its message
    assert sweep()["resent"] == 0
    for name in os.listdir(get_settings().broker_folder / "out"):  # the broker lost everything
        if name.endswith(".msg"):
            os.remove(get_settings().broker_folder / "out" / name)
    assert sweep()["resent"] == 1  # its message must have been lost in the broker (the other case is recent)
    assert sweep()["resent"] == 0  # once per stuck_after_s, not every sweep
    case = _get(swept, waiting)
    assert (case.status, case.pipeline_attempts, _published()) == ("analysing", 0, 1)  # no attempt counted


def test_a_step_whose_lease_expired_is_requeued_once_and_counts_an_attempt(swept):
    case_id = _case(swept, CaseStatus.analysing)
    with swept.session() as s:
        s.execute(update(Case).where(Case.id == case_id).values(pipeline_attempts=1))
        s.commit()
    dead = _lease(swept, case_id, expires_in_s=-1)  # the holder stopped renewing: it died
    assert sweep()["requeued"] == 1
    assert sweep()["requeued"] == 0  # settled: one recovery per death
    case = _get(swept, case_id)
    assert (case.status, _published()) == ("queued", 1)
    with swept.session() as s:
        assert s.get(TaskLease, dead).released_at is not None
        reasons = s.scalars(select(AuditEvent.detail).where(AuditEvent.entity_id == str(case_id),
                                                            AuditEvent.action == "case.transition")).all()
        assert reasons[-1]["to_status"] == "queued" and reasons[-1]["reason"] == "worker_lost"


def test_a_dead_lease_beside_a_live_one_is_settled_without_a_rerun(swept):
    case_id = _case(swept, CaseStatus.analysing)
    dead = _lease(swept, case_id, expires_in_s=-1)
    _lease(swept, case_id, expires_in_s=30)  # the redelivered task already runs elsewhere
    assert sweep()["requeued"] == 0
    with swept.session() as s:
        assert s.get(TaskLease, dead).released_at is not None
    assert (_get(swept, case_id).status, _published()) == ("analysing", 0)


def test_a_failed_hand_off_to_the_broker_is_recovered(swept, monkeypatch):
    case_id = _case(swept)
    monkeypatch.setenv("SKINBRIDGE_BROKER_URL", "filesystem://")
    monkeypatch.setenv("SKINBRIDGE_VAR_DIR", str(Path(os.environ["SKINBRIDGE_VAR_DIR"]) / "gone"))
    reset_settings_cache()
    configure(app, get_settings())
    out = get_settings().broker_folder / "out"
    out.rmdir()
    out.write_text("")  # a file where the broker folder should be: the broker cannot take the message
    with pytest.raises(Exception):
        submit_case(case_id)
    monkeypatch.setenv("SKINBRIDGE_VAR_DIR", str(Path(os.environ["SKINBRIDGE_VAR_DIR"]).parent))
    reset_settings_cache()
    configure(app, get_settings())
    assert _get(swept, case_id).status == "queued"  # committed, but no message anywhere
    assert sweep()["requeued"] == 0  # the hand-off lease has not expired yet: maybe still publishing
    with swept.session() as s:
        s.execute(update(TaskLease).values(expires_at=utcnow() - timedelta(seconds=1)))
        s.commit()
    assert sweep()["requeued"] == 1 and _published() == 1
    assert _get(swept, case_id).status == "queued"


def test_a_complete_case_the_bot_never_submitted_is_submitted(swept):
    abandoned = _case(swept, complete_age_s=2 * STUCK_S)  # the bot died after the last answer
    answering = _case(swept, complete_age_s=1)  # the bot is submitting it right now
    unfinished = _case(swept, age_s=10 * STUCK_S)  # still answering questions: not ours to submit
    no_photo = _case(swept, photo=False, complete_age_s=2 * STUCK_S)
    assert sweep()["submitted"] == 1
    assert [_get(swept, c).status for c in (abandoned, answering, unfinished, no_photo)] == \
        ["queued", "received", "received", "received"]
    assert _published() == 1
    with swept.session() as s:
        assert s.scalar(select(func.count()).select_from(OutboxMessage)
                        .where(OutboxMessage.dedup_key == f"progress:{abandoned}:received")) == 1
    submit_case(abandoned)  # the bot's own late submit changes nothing
    assert _published() == 1


# --- real worker processes ------------------------------------------------------------------------
@pytest.fixture
def worker_env(clinic, tmp_path, tmp_path_factory, monkeypatch):
    """Configure this process and a worker environment on the same database, keys and broker."""
    models = tiny_model_env(tmp_path_factory.mktemp("models"))  # no generator sign-off: no example pictures

    def make(**overrides: str) -> Worker:
        env_over = {**models, "SKINBRIDGE_SWEEPER_INTERVAL_S": "0.5", **overrides}
        for key, value in env_over.items():
            monkeypatch.setenv(key, value)
        reset_settings_cache()
        configure(app, get_settings())
        return Worker({**os.environ, "PYTHONPATH": str(REPO)}, tmp_path)

    workers: list[Worker] = []

    def factory(**overrides: str) -> Worker:
        workers.append(make(**overrides))
        return workers[-1]

    yield factory
    for w in workers:
        w.stop()
    reset_settings_cache()
    configure(app, get_settings())


def _results(clinic, ids) -> int:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        return s.scalar(select(func.count()).select_from(OutboxMessage)
                        .where(OutboxMessage.dedup_key.in_([f"result:{c}" for c in ids])))


def _statuses(clinic, ids) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        rows = s.execute(select(Case.status, func.count()).where(Case.id.in_(ids)).group_by(Case.status)).all()
    return dict(rows)


@pytest.mark.slow
def test_a_backlog_longer_than_three_stuck_windows_completes_without_a_failure(clinic, worker_env):
    """The issue's case: one worker, a queue much longer than 3 x stuck_after_s. Before the leases, the
    sweeper re-queued waiting cases and most ended `failed: too_many_attempts`."""
    delay_s, stuck_s, n = 0.25, 1.0, 30
    worker = worker_env(SKINBRIDGE_FAULT_DELAY_S=str(delay_s), SKINBRIDGE_STUCK_AFTER_S=str(stuck_s)).start()
    ids = [_case(clinic) for _ in range(n)]
    never_submitted = [_case(clinic, complete_age_s=0) for _ in range(3)]  # the bot died after the last answer
    started = time.monotonic()
    for case_id in ids:
        submit_case(case_id)
    everything = ids + never_submitted
    wait_for(lambda: _results(clinic, everything) == len(everything) or "failed" in _statuses(clinic, everything),
             300, interval=1, message="the backlog to drain")
    elapsed = time.monotonic() - started
    # diagnose sleeps delay_s per case, one at a time: the backlog lasted at least n x delay_s
    assert n * delay_s > 3 * stuck_s
    assert _statuses(clinic, everything).get("failed", 0) == 0, _statuses(clinic, everything)
    with clinic.session() as s:
        attempts = s.scalars(select(Case.pipeline_attempts).where(Case.id.in_(everything))).all()
    assert sorted(set(attempts)) == [1] and _results(clinic, everything) == len(everything)
    assert worker.proc.poll() is None
    with clinic.session() as s:  # never-submitted cases: from the last answer to the sweeper's submit
        waits = [(s.scalar(select(AuditEvent.at).where(AuditEvent.entity_id == str(c),
                                                       AuditEvent.detail["to_status"].as_string() == "queued"))
                  - s.get(Case, c).history_completed_at).total_seconds() for c in never_submitted]
        assert all(s.scalar(select(AuditEvent.actor_id).where(
            AuditEvent.entity_id == str(c), AuditEvent.detail["to_status"].as_string() == "queued")) == "sweeper"
            for c in never_submitted)
    print(f"backlog of {len(everything)} cases drained in {elapsed:.1f} s with stuck_after_s={stuck_s}; "
          f"never-submitted cases submitted by the sweeper {min(waits):.1f}-{max(waits):.1f} s after their last answer")


@pytest.mark.slow
def test_a_worker_killed_mid_step_is_still_recovered(clinic, worker_env):
    stuck_s = 2.0
    worker = worker_env(SKINBRIDGE_FAULT_DELAY_S="30", SKINBRIDGE_STUCK_AFTER_S=str(stuck_s)).start()
    case_id = _case(clinic)
    submit_case(case_id)
    wait_for(lambda: _get(clinic, case_id).status == "analysing", 120, message="analysis to start")
    # the fault delay sits in the models' step of analyse (quality gate -> models -> report)
    wait_for(lambda: _live_step(clinic, case_id) == "skinbridge.analyse", 60, message="analyse to hold the case")
    worker.kill_all()  # SIGKILL the whole worker: the step is lost with it, its lease stops being renewed
    killed = time.monotonic()
    worker_env(SKINBRIDGE_FAULT_DELAY_S="0", SKINBRIDGE_STUCK_AFTER_S=str(stuck_s)).start()
    wait_for(lambda: _results(clinic, [case_id]), 180, message="the sweeper to recover the case")
    case = _get(clinic, case_id)
    assert case.status in DONE and case.pipeline_attempts == 2  # the lost run and the recovery
    assert _results(clinic, [case_id]) == 1
    print(f"killed worker's case completed {time.monotonic() - killed:.1f} s after the SIGKILL "
          f"(stuck_after_s={stuck_s}, a new worker started at once)")


def _live_step(clinic, case_id: uuid.UUID) -> str | None:
    with clinic.session() as s:
        return s.scalar(select(TaskLease.step).where(TaskLease.case_id == case_id, TaskLease.released_at.is_(None),
                                                     TaskLease.expires_at > utcnow()))


def test_a_result_waiting_for_its_message_is_not_flooded_with_notifies(swept):
    """A backlog of notify steps is not a loss either (the sweeper used to add one notify per sweep)."""
    case_id = _case(swept, CaseStatus.analysing)
    with swept.session() as s:
        case = s.get(Case, case_id)
        cases.transition(s, case, CaseStatus.preliminary, Actor.system("test"))
        s.commit()
        s.execute(update(Case).where(Case.id == case_id).values(status_changed_at=utcnow() - timedelta(hours=1)))
        s.commit()
    other = _case(swept, CaseStatus.analysing)
    _lease(swept, other, expires_in_s=30)  # the worker is busy: the notify is somewhere in the queue
    assert [sweep()["notified"] for _ in range(3)] == [0, 0, 0]
    with swept.session() as s:
        s.execute(update(TaskLease).values(released_at=utcnow() - timedelta(hours=1),
                                           renewed_at=utcnow() - timedelta(hours=1)))
        s.commit()
    assert sweep()["notified"] == 1  # quiet, broker empty: the notify was lost
    assert sweep()["notified"] == 0  # the one just sent waits in the broker


@pytest.mark.slow
def test_a_batching_worker_diagnoses_concurrent_cases_in_shared_passes_each_on_its_own(clinic, worker_env):
    """SKINBRIDGE_BATCH_WINDOW_MS: one worker process runs several cases at once in threads, their photos
    share classifier passes, and every case still gets exactly one result, one message and its own audit
    trail; the worker beats like any other."""
    from clinic_db import heartbeat
    from clinic_db.models import AIResult

    n = 6
    worker = worker_env(SKINBRIDGE_BATCH_WINDOW_MS="400", SKINBRIDGE_BATCH_SLOTS=str(n)).start()
    wait_for(lambda: any(b.component == "worker" for b in heartbeat.alive(clinic, within_s=60)), 120,
             message="the batching worker's heartbeat")
    ids = [_case(clinic) for _ in range(n)]
    for case_id in ids:
        submit_case(case_id)
    wait_for(lambda: _results(clinic, ids) == n or "failed" in _statuses(clinic, ids), 180, interval=0.5,
             message="the cases' results")
    assert _statuses(clinic, ids).get("failed", 0) == 0 and _results(clinic, ids) == n
    with clinic.session() as s:
        rows = s.execute(select(AIResult.case_id, AIResult.timings).where(AIResult.case_id.in_(ids),
                                                                         AIResult.engine == "classifier")).all()
        trails = {c: s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.entity_id == str(c), AuditEvent.detail["to_status"].as_string() == "analysing")) for c in ids}
    assert sorted(str(c) for c, _ in rows) == sorted(str(c) for c in ids)  # one classifier result per case
    passes = [t["batch_photos"] for _, t in rows]
    assert max(passes) > 1, passes  # cases submitted together shared a forward pass
    assert set(trails.values()) == {1}  # each case moved (and was audited) on its own
    assert worker.proc.poll() is None
