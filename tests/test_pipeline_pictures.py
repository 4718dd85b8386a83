"""The result goes out before the example pictures (issue 25): the real tasks in-process (Celery's eager
``apply``) with tiny real models on a real clinic database and the embedded broker folder.

* analyse commits the result message with the status change; the pictures are drawn by explain and
  follow in a message of their own, the progress message saying 'drawing example pictures' until then;
* a redelivered analyse adds nothing, and lets the chain go on to the pictures;
* explain steps aside (to the back of the queue) while another case waits for its analysis;
* the sweeper re-sends explain for pictures that were announced but never finished.
"""

from __future__ import annotations

import io
import os
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import func, select, update

from clinic_db import cases, patients
from clinic_db.audit import Actor
from clinic_db.models import Case, ExplanationImage, FhirResource, OutboxMessage, utcnow
from clinic_db.states import CaseStatus
from inference import tasks
from inference.engines.registry import clear_engine_cache
from inference.quality import sanitize
from skinbridge.celery_app import app, configure
from skinbridge.settings import get_settings, reset_settings_cache
from tests.e2e_support import tiny_model_env

DONE = {CaseStatus.preliminary.value, CaseStatus.in_review.value}


@pytest.fixture
def worker(clinic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """This process as a gpu worker: tiny models (generator signed off), the test's broker folder."""
    for key, value in {**tiny_model_env(tmp_path / "models", clinic), "SKINBRIDGE_DEVICE": "cpu",
                       "SKINBRIDGE_STUCK_AFTER_S": "60"}.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    configure(app, get_settings())
    tasks.engines.cache_clear()
    clear_engine_cache()
    yield clinic
    tasks.engines.cache_clear()
    clear_engine_cache()
    reset_settings_cache()
    configure(app, get_settings())


def _queued_case(clinic) -> str:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    PILImage.new("RGB", (320, 240), (180, 120, 100)).save(buf, format="JPEG")
    with clinic.session() as s:
        p = patients.register(clinic, s, uuid.uuid4().int % 10**9, consent_version="2026-11")
        case = cases.open_case(clinic, s, p)
        cases.add_image(clinic, s, case, sanitize(buf.getvalue()), source_ref=f"{case.id}:0")
        cases.set_history(clinic, s, case, body_site="back", duration="months")
        cases.transition(s, case, CaseStatus.queued, Actor.system("test"))
        s.commit()
        return str(case.id)


def _outbox(clinic, case_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    """The case's outbox, in the order the sender delivers it, as '<kind>' or 'progress:<stage>'."""
    with clinic.session() as s:
        rows = s.scalars(select(OutboxMessage).where(OutboxMessage.case_id == uuid.UUID(case_id))
                         .order_by(OutboxMessage.created_at)).all()
        return [r.kind if r.kind != "progress" else f"progress:{r.dedup_key.rsplit(':', 1)[1]}" for r in rows]


def _pictures(clinic, case_id: str) -> int:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        return s.scalar(select(func.count()).select_from(ExplanationImage)
                        .where(ExplanationImage.case_id == uuid.UUID(case_id)))


def _report_versions(clinic, case_id: str) -> int:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        return s.scalar(select(func.count()).select_from(FhirResource).where(
            FhirResource.case_id == uuid.UUID(case_id), FhirResource.resource_type == "DiagnosticReport"))


def _broker_messages(queue: str) -> int:
    folder = get_settings().broker_folder / "out"
    return len([n for n in os.listdir(folder) if n.endswith(f".{queue}.msg")])


def test_no_pictures_of_a_guess_the_result_calls_unlikely(worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default gate (20 %): the tiny model's spread-out guess is only the 'closest guess', and
    pictures of it would show the patient a condition the result calls unlikely."""
    monkeypatch.delenv("SKINBRIDGE_EXAMPLE_PICTURES_MIN_PROBABILITY")
    reset_settings_cache()
    case_id = _queued_case(worker)
    tasks.analyse.apply(args=[case_id])
    with worker.session() as s:
        case = s.get(Case, uuid.UUID(case_id))
        preferred = cases.preferred_result(s, case)
        assert case.status in DONE and preferred.top_probability < 0.2
    assert _outbox(worker, case_id) == ["progress:analysing", "result", "progress:ready"]
    tasks.explain.apply(args=[case_id])  # a stray explain (an old chain) draws nothing either
    assert _pictures(worker, case_id) == 0 and _outbox(worker, case_id)[-1] == "progress:ready"


def test_result_is_committed_before_the_pictures_which_follow_in_their_own_message(worker) -> None:
    case_id = _queued_case(worker)
    tasks.analyse.apply(args=[case_id])
    with worker.session() as s:
        assert s.get(Case, uuid.UUID(case_id)).status in DONE
    assert _outbox(worker, case_id) == ["progress:analysing", "result", "progress:pictures"]
    assert _pictures(worker, case_id) == 0 and _report_versions(worker, case_id) == 1

    tasks.analyse.apply(args=[case_id])  # redelivered: nothing new, and no failure
    assert _outbox(worker, case_id) == ["progress:analysing", "result", "progress:pictures"]

    tasks.explain.apply(args=[case_id])
    assert _pictures(worker, case_id) == get_settings().explanation_images
    assert _outbox(worker, case_id) == ["progress:analysing", "result", "progress:pictures", "pictures",
                                        "progress:ready"]
    assert _report_versions(worker, case_id) == 2  # the FHIR report again, with the pictures in its PDF
    tasks.explain.apply(args=[case_id])  # redelivered: nothing new
    assert _pictures(worker, case_id) == get_settings().explanation_images
    assert len(_outbox(worker, case_id)) == 5 and _report_versions(worker, case_id) == 2


def test_pictures_wait_behind_cases_that_wait_for_their_result(worker) -> None:
    first = _queued_case(worker)
    tasks.analyse.apply(args=[first])
    waiting = _queued_case(worker)  # another patient's case, queued for its analysis
    before = _broker_messages("gpu")
    tasks.explain.apply(args=[first])
    assert _pictures(worker, first) == 0  # stepped aside ...
    assert _broker_messages("gpu") == before + 1  # ... to the back of the queue, behind the waiting case
    tasks.analyse.apply(args=[waiting])
    tasks.explain.apply(args=[first])  # nobody waits now
    assert _pictures(worker, first) == get_settings().explanation_images


def test_sweeper_finishes_pictures_that_were_announced_but_never_drawn(worker) -> None:
    case_id = _queued_case(worker)
    tasks.analyse.apply(args=[case_id])  # result out, 'drawing example pictures'; the explain message is lost
    with worker.session() as s:
        s.execute(update(Case).where(Case.id == uuid.UUID(case_id))
                  .values(status_changed_at=utcnow() - timedelta(hours=1)))
        s.commit()
    from clinic_db.models import TaskLease

    with worker.session() as s:  # no worker did anything lately
        s.execute(update(TaskLease).values(released_at=utcnow() - timedelta(hours=1),
                                           renewed_at=utcnow() - timedelta(hours=1)))
        s.commit()
    before = _broker_messages("gpu")
    assert tasks.sweep()["notified"] == 1
    assert _broker_messages("gpu") == before + 1  # explain re-sent
    tasks.explain.apply(args=[case_id])
    assert _outbox(worker, case_id)[-2:] == ["pictures", "progress:ready"]
    assert tasks.sweep()["notified"] == 0  # finished: nothing more to re-send


def test_an_sd_explainer_draws_over_the_patients_photo_in_their_language(clinic, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker with a Stable-Diffusion explainer and SKINBRIDGE_SD_IMG2IMG_STRENGTH: the explain step reads
    the patient's photo (audited), draws the approved examples over it, and captions them in the patient's
    language as AI-made and not their skin."""
    from clinic_db import clinicians, explainer_review
    from clinic_db.models import AuditEvent, Patient
    from inference.engines.base import read_ai_marker
    from inference.engines.explainer import StableDiffusionExplainer
    from inference.engines.synthetic import TINY_SD, build_sd_pipeline, save_random_lora
    from inference.vocabulary import load_vocabulary

    sd = tmp_path / "sd"
    pipe = build_sd_pipeline(TINY_SD)
    pipe.save_pretrained(sd)
    for seed, code in enumerate(load_vocabulary().classifier_classes()):  # whatever the tiny classifier says
        save_random_lora(pipe, sd / "loras" / code, seed=seed)
    for key, value in {**tiny_model_env(tmp_path / "models"), "SKINBRIDGE_DEVICE": "cpu", "SKINBRIDGE_SD_PATH": str(sd),
                       "SKINBRIDGE_SD_IMG2IMG_STRENGTH": "0.5", "SKINBRIDGE_EXPLANATION_IMAGES": "1"}.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    configure(app, get_settings())
    tasks.engines.cache_clear()
    clear_engine_cache()
    try:
        explainer = tasks.engines().explainer
        assert isinstance(explainer, StableDiffusionExplainer) and explainer.uses_photo
        with clinic.session() as s:  # a dermatologist approves these examples, drawn this way
            reviewer, _ = clinicians.create(clinic, s, "sd-signoff", display_name="Dr SD", role="dermatologist",
                                            password="sd sign-off password")
            explainer_review.record(s, reviewer, explainer.review_subject, explainer_id=explainer.model_id,
                                    approve=list(explainer.codes), reject={})
            s.commit()
        case_id = _queued_case(clinic)
        with clinic.session() as s:
            case = s.get(Case, uuid.UUID(case_id))
            s.get(Patient, case.patient_id).language = "de"
            s.commit()
        tasks.analyse.apply(args=[case_id])
        tasks.explain.apply(args=[case_id])
        with clinic.session() as s:
            images = s.scalars(select(ExplanationImage).where(ExplanationImage.case_id == uuid.UUID(case_id))).all()
            assert len(images) == 1
            png = clinic.vault.decrypt(s, images[0], "data")
            reads = s.scalar(select(func.count()).select_from(AuditEvent).where(
                AuditEvent.action == "image.read", AuditEvent.actor_id == "worker"))
        assert reads == 2  # the analysis read the photo, and so did the step that drew over it
        marker = read_ai_marker(png)
        assert marker["ai_generated"] == "true"
        assert "über den Aufbau Ihres Fotos gezeichnet" in marker["caption"] and "nicht Ihre Haut" in marker["caption"]
        assert "pictures" in _outbox(clinic, case_id)
    finally:
        tasks.engines.cache_clear()
        clear_engine_cache()
        reset_settings_cache()
        configure(app, get_settings())
