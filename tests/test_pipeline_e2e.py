"""The whole case chain through real Celery worker processes: embedded filesystem broker and Redis,
a worker child killed mid-task, a whole worker killed and the sweeper finishing the job."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select

from clinic_db import cases, patients
from clinic_db.models import AIResult, AuditEvent, Case, ExplanationImage, OutboxMessage
from clinic_db.states import CaseStatus
from inference.pipeline import case_chain, submit_case
from skinbridge.celery_app import app, configure
from skinbridge.settings import get_settings, reset_settings_cache
from tests.e2e_support import Worker, tiny_model_env
from tests.support import wait_for

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
DONE = {CaseStatus.preliminary.value, CaseStatus.in_review.value}


@pytest.fixture
def models(clinic, tmp_path_factory) -> dict[str, str]:
    return tiny_model_env(tmp_path_factory.mktemp("models"), clinic)


@pytest.fixture
def pipeline(clinic, models, tmp_path, monkeypatch):
    """Configure this process and a worker environment on the same database, keys and broker."""

    def make(**overrides: str) -> Worker:
        env_over = {**models, "SKINBRIDGE_SWEEPER_INTERVAL_S": "1", **overrides}
        for key, value in env_over.items():
            monkeypatch.setenv(key, value)
        reset_settings_cache()
        configure(app, get_settings())
        env = {k: v for k, v in os.environ.items()}
        env["PYTHONPATH"] = str(REPO)
        return Worker(env, tmp_path)

    workers: list[Worker] = []

    def factory(**overrides: str) -> Worker:
        w = make(**overrides)
        workers.append(w)
        return w

    yield factory
    for w in workers:
        w.stop()
    reset_settings_cache()
    configure(app, get_settings())


def _photo(shared_data: Path, name: str) -> cases.CleanImage:
    from inference.quality import sanitize

    return sanitize((shared_data / "ham10000" / "images" / name).read_bytes(), name)


def _new_case(clinic, shared_data, tg_id: int = 4242) -> str:
    with clinic.session() as s:
        p = patients.register(clinic, s, tg_id, consent_version="2026-11")
        case = cases.open_case(clinic, s, p)
        for i, name in enumerate(sorted(os.listdir(shared_data / "ham10000" / "images"))[:2]):
            cases.add_image(clinic, s, case, _photo(shared_data, name), source_ref=f"{case.id}:{i}")
        cases.set_history(clinic, s, case, body_site="back", duration="months", bleeding=False, growth=True)
        s.commit()
        return str(case.id)


def _status(clinic, case_id: str) -> str:
    with clinic.session() as s:
        return s.get(Case, __import__("uuid").UUID(case_id)).status


def _counts(clinic, case_id: str) -> dict[str, int]:
    import uuid

    cid = uuid.UUID(case_id)
    with clinic.session() as s:
        return {
            "ai": s.scalar(select(func.count()).select_from(AIResult).where(AIResult.case_id == cid)),
            "explanations": s.scalar(select(func.count()).select_from(ExplanationImage)
                                     .where(ExplanationImage.case_id == cid)),
            "results": s.scalar(select(func.count()).select_from(OutboxMessage)
                                .where(OutboxMessage.dedup_key == f"result:{case_id}")),
        }


def _finished(clinic, case_id: str) -> bool:
    """The result, and the example pictures that follow it (inference.tasks.explain)."""
    counts = _counts(clinic, case_id)
    return _status(clinic, case_id) in DONE and counts["results"] == 1 \
        and counts["explanations"] == get_settings().explanation_images


def _check_outcome(clinic, case_id: str) -> None:
    import uuid

    counts = _counts(clinic, case_id)
    assert counts == {"ai": 1, "explanations": get_settings().explanation_images, "results": 1}, counts
    with clinic.session() as s:
        case = s.get(Case, uuid.UUID(case_id))
        result = s.scalars(select(AIResult).where(AIResult.case_id == case.id)).one()
        differential = clinic.vault.get_json(s, result, "differential", owner=case.patient_id)
        probs = [d["probability"] for d in differential]
        assert 0 < sum(probs) <= 1.0001 and probs == sorted(probs, reverse=True)  # top-k of a softmax
        assert case.condition_code == differential[0]["code"]
        assert result.model_id == "tiny-classifier" and len(result.weights_sha256) == 64
        png = clinic.vault.decrypt(s, s.scalars(select(ExplanationImage)
                                                .where(ExplanationImage.case_id == case.id)).first(), "data")
        meta = PILImage.open(io.BytesIO(png)).info
        assert any("ai" in k.lower() for k in meta), meta  # marked AI-generated in the metadata
        transitions = s.scalars(select(AuditEvent.detail).where(AuditEvent.entity_id == case_id,
                                                                AuditEvent.action == "case.transition")).all()
        tos = [t["to_status"] for t in transitions]
        assert tos[:2] == ["queued", "analysing"] and "preliminary" in tos, tos


def test_chain_on_embedded_filesystem_broker(clinic, pipeline, shared_data):
    worker = pipeline().start()
    case_id = _new_case(clinic, shared_data)
    submit_case(case_id)
    submit_case(case_id)  # a double tap from the bot changes nothing
    wait_for(lambda: _finished(clinic, case_id), 180, message="the case to be analysed")
    _check_outcome(clinic, case_id)
    # re-running the whole chain (as a redelivery would) adds nothing
    case_chain(case_id).apply_async()
    time.sleep(3)
    _check_outcome(clinic, case_id)
    assert worker.proc.poll() is None


def test_chain_on_redis(clinic, pipeline, shared_data, redis_url):
    pipeline(SKINBRIDGE_BROKER_URL=redis_url).start()
    case_id = _new_case(clinic, shared_data)
    submit_case(case_id)
    wait_for(lambda: _finished(clinic, case_id), 180, message="the case to be analysed over Redis")
    _check_outcome(clinic, case_id)


def test_worker_child_killed_mid_task_completes_exactly_once(clinic, pipeline, shared_data):
    worker = pipeline(SKINBRIDGE_FAULT_DELAY_S="4").start()
    case_id = _new_case(clinic, shared_data)
    submit_case(case_id)
    wait_for(lambda: _status(clinic, case_id) == CaseStatus.analysing.value, 120, message="analysis to start")
    time.sleep(1.5)  # the diagnose step is now inside its fault delay
    children = wait_for(worker.children, 30, message="pool processes")
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: _finished(clinic, case_id), 180, message="the case to complete after the kill")
    _check_outcome(clinic, case_id)


def test_whole_worker_killed_then_sweeper_finishes(clinic, pipeline, shared_data):
    worker = pipeline(SKINBRIDGE_FAULT_DELAY_S="3", SKINBRIDGE_STUCK_AFTER_S="4").start()
    case_id = _new_case(clinic, shared_data)
    submit_case(case_id)
    wait_for(lambda: _status(clinic, case_id) == CaseStatus.analysing.value, 120, message="analysis to start")
    time.sleep(1)
    worker.kill_all()  # the in-flight task is lost with the worker
    assert _status(clinic, case_id) == CaseStatus.analysing.value
    pipeline(SKINBRIDGE_FAULT_DELAY_S="0", SKINBRIDGE_STUCK_AFTER_S="4").start()
    wait_for(lambda: _finished(clinic, case_id), 180, message="the sweeper to re-run the case")
    _check_outcome(clinic, case_id)
