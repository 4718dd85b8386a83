"""A failing VLM or explainer never fails the case (issue 21, graceful degradation): the real tasks run
in-process (Celery's eager ``apply``) on a real clinic database with tiny real models; the failure is a
real exception raised inside the model's ``generate`` call."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image as PILImage
from sqlalchemy import select

from clinic_db import cases, patients
from clinic_db.models import AIResult, Case, ExplanationImage, OutboxMessage, ReviewTask
from clinic_db.states import CaseStatus
from inference import tasks
from inference.engines.registry import clear_engine_cache
from inference.engines.synthetic import TINY_LLAVA, build_llava, save_vlm, train_tokenizer
from skinbridge.settings import reset_settings_cache
from tests.e2e_support import tiny_model_env


@pytest.fixture
def worker_models(clinic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    env = tiny_model_env(tmp_path / "models", clinic)
    model, processor = build_llava(TINY_LLAVA, train_tokenizer())
    env["SKINBRIDGE_VLM_PATH"] = str(save_vlm(tmp_path / "models" / "vlm", model, processor))
    env["SKINBRIDGE_DEVICE"] = "cpu"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    tasks.engines.cache_clear()
    clear_engine_cache()
    eng = tasks.engines()
    eng.vlm.max_new_tokens = 4
    yield eng
    tasks.engines.cache_clear()
    clear_engine_cache()


def _new_case(clinic) -> str:  # type: ignore[no-untyped-def]
    from inference.quality import sanitize

    buf = io.BytesIO()
    PILImage.new("RGB", (320, 240), (180, 120, 100)).save(buf, format="JPEG")
    with clinic.session() as s:
        p = patients.register(clinic, s, 777, consent_version="2026-11")
        case = cases.open_case(clinic, s, p)
        cases.add_image(clinic, s, case, sanitize(buf.getvalue()), source_ref=f"{case.id}:0")
        cases.set_history(clinic, s, case, body_site="back", duration="months")
        cases.transition(s, case, CaseStatus.queued, tasks.WORKER)
        s.commit()
        return str(case.id)


def _run_chain(case_id: str) -> None:
    for task in (tasks.analyse, tasks.explain):  # inference.pipeline.case_chain
        task.apply(args=[case_id])


def _raising(exc: BaseException):  # type: ignore[no-untyped-def]
    calls = []

    def hook(step: str, prompt_len: int) -> list:  # type: ignore[type-arg]
        calls.append(step)
        raise exc

    return hook, calls


def test_vlm_crash_publishes_the_classifier_result_flagged_for_review(clinic, worker_models) -> None:
    hook, calls = _raising(RuntimeError("CUDA error: an illegal memory access was encountered"))
    worker_models.vlm.generation_hook = hook
    case_id = _new_case(clinic)
    _run_chain(case_id)
    assert calls == ["describe"]  # a model bug is not retried
    with clinic.session() as s:
        case = s.get(Case, uuid.UUID(case_id))
        results = {r.engine: r for r in s.scalars(select(AIResult).where(AIResult.case_id == case.id))}
        assert case.status == CaseStatus.in_review.value  # triage_rules.json: vlm_error -> review
        assert results["classifier"].top_condition_code and case.condition_code == results["classifier"].top_condition_code
        assert results["vlm"].top_condition_code is None
        assert results["vlm"].flags == ["vlm_error", "vlm_error:RuntimeError"]
        task = s.scalars(select(ReviewTask).where(ReviewTask.case_id == case.id)).one()
        assert "ai_unusable" in task.reasons
        assert s.scalar(select(OutboxMessage.id).where(OutboxMessage.dedup_key == f"result:{case_id}")) is not None
        from console import stats

        assert stats.compute(s).model_failures["vlm_error"] == 1


def test_transient_vlm_error_retries_with_the_pipeline_policy_then_degrades(clinic, worker_models) -> None:
    hook, calls = _raising(ConnectionError("model server went away"))
    worker_models.vlm.generation_hook = hook
    case_id = _new_case(clinic)
    _run_chain(case_id)
    assert len(calls) == tasks.diagnose.max_retries + 1  # first try + max_retries, then the flagged result
    with clinic.session() as s:
        rows = s.scalars(select(AIResult).where(AIResult.case_id == uuid.UUID(case_id))).all()
        assert sorted(r.engine for r in rows) == ["classifier", "vlm"]  # the classifier ran once, kept across retries
        assert s.get(Case, uuid.UUID(case_id)).status == CaseStatus.in_review.value


def test_explainer_crash_keeps_the_result_and_flags_it(clinic, worker_models, monkeypatch) -> None:
    worker_models.vlm = None  # classifier only, as the embedded default
    explainer = worker_models.explainer

    def broken_unet(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("NaN in UNet output")

    monkeypatch.setattr(explainer.unet, "forward", broken_unet)
    case_id = _new_case(clinic)
    _run_chain(case_id)
    with clinic.session() as s:
        case = s.get(Case, uuid.UUID(case_id))
        assert case.status in (CaseStatus.preliminary.value, CaseStatus.in_review.value)
        assert s.scalar(select(ExplanationImage.id).where(ExplanationImage.case_id == case.id)) is None
        result = s.scalars(select(AIResult).where(AIResult.case_id == case.id)).one()
        assert "explainer_error" in result.flags
        assert s.scalar(select(OutboxMessage.id).where(OutboxMessage.dedup_key == f"result:{case_id}")) is not None


# --- follow-up questions: on the worker that holds the VLM, with a fallback ----------------------------
def _question(clinic, case_id: str, text: str) -> str:  # type: ignore[no-untyped-def]
    from clinic_db.models import CaseMessage

    with clinic.session() as s:
        case = s.get(Case, uuid.UUID(case_id))
        row = CaseMessage(case_id=case.id, patient_id=case.patient_id, role="patient", flags=[])
        row.ensure_id()
        clinic.vault.set_text(s, row, "text", text, owner=case.patient_id)
        s.add(row)
        s.commit()
        return str(row.id)


def _reply(clinic, case_id: str):  # type: ignore[no-untyped-def]
    from clinic_db.models import CaseMessage

    with clinic.session() as s:
        row = s.scalars(select(CaseMessage).where(CaseMessage.case_id == uuid.UUID(case_id),
                                                  CaseMessage.role == "assistant")).one()
        return clinic.vault.get_text(s, row, "text", owner=row.patient_id), list(row.flags)


def test_followup_on_a_cpu_worker_never_uses_the_vlm(clinic, worker_models) -> None:
    hook, calls = _raising(AssertionError("a CPU worker must not run the VLM"))
    case_id = _new_case(clinic)
    _run_chain(case_id)  # the VLM fails here too: a classifier result to talk about
    worker_models.vlm.generation_hook = hook
    calls.clear()
    tasks.answer_followup.apply(args=[case_id, _question(clinic, case_id, "What can I do?")], routing_key="cpu")
    text, flags = _reply(clinic, case_id)
    assert calls == [] and text.startswith("The preliminary assessment points most to") and flags == []


def test_followup_vlm_failure_falls_back_to_the_vocabulary_answer_and_is_counted(clinic, worker_models) -> None:
    case_id = _new_case(clinic)
    _run_chain(case_id)
    hook, calls = _raising(RuntimeError("CUDA error"))
    worker_models.vlm.generation_hook = hook
    tasks.answer_followup.apply(args=[case_id, _question(clinic, case_id, "What can I do?")], routing_key="gpu")
    text, flags = _reply(clinic, case_id)
    assert calls == ["followup"] and flags == ["followup_vlm_error"]
    assert text.startswith("The preliminary assessment points most to")
    with clinic.session() as s:
        from console import stats

        assert stats.compute(s).model_failures["followup_vlm_error"] == 1


@pytest.mark.parametrize(("vlm", "queue"), [(True, "gpu"), (False, "cpu")])
def test_submit_followup_routes_to_the_queue_that_holds_the_model(clinic, monkeypatch, tmp_path, vlm, queue) -> None:
    import json

    from inference.pipeline import submit_followup
    from skinbridge.celery_app import app, configure
    from skinbridge.settings import get_settings

    if vlm:
        monkeypatch.setenv("SKINBRIDGE_VLM_PATH", str(tmp_path))
    reset_settings_cache()
    configure(app, get_settings())
    try:
        submit_followup(uuid.uuid4(), uuid.uuid4())
        sent = [json.loads(p.read_text()) for p in (get_settings().broker_folder / "out").iterdir() if p.is_file()]
    finally:
        monkeypatch.delenv("SKINBRIDGE_VLM_PATH", raising=False)
        reset_settings_cache()
        configure(app, get_settings())
    assert [m["properties"]["delivery_info"]["routing_key"] for m in sent] == [queue]
