"""Celery tasks of the case pipeline. Tasks carry case ids, never image bytes.

Idempotence: each step starts by reading the case row and returns early (stopping the chain with
``Ignore``) when its work is already done or the case has moved on. Transient errors retry with
back-off; anything else is poison: the case ends ``failed`` with a reason code and never loops.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from celery import chain
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from celery.signals import task_postrun, worker_init, worker_process_init
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from clinic_db import cases, explainer_review, outbox, review
from inference import leases
from clinic_db.audit import Actor
from clinic_db.db import Clinic, get_clinic
from clinic_db.models import AIResult, Case, CaseMessage, ExplanationImage, OutboxMessage, Patient, utcnow
from clinic_db.states import PIPELINE_STATES, CaseStatus
from skinbridge.celery_app import PIPELINE_QUEUES, SWEEPER_QUEUE, app
from skinbridge.settings import get_settings

# OpenMP's idle threads spin by default; beside the bot, the database and other workers on a few cores the
# spinning threads take the CPU from the ones with work (measured: 2 example pictures 32 s instead of 2.2 s
# on the 2-core machine under load). Read when torch first loads, which is after this import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

log = logging.getLogger(__name__)
WORKER = Actor.system("worker")
TRANSIENT = (OperationalError, ConnectionError, TimeoutError)


# --- per-process set-up -------------------------------------------------------------------------
@worker_process_init.connect
def init_worker_process(**_: Any) -> None:
    """After the fork: fresh DB connections, torch's share of the cores, and models loaded once (never touch
    CUDA before the fork)."""
    get_clinic().engine.dispose(close=False)
    if threads := get_settings().torch_threads:
        import torch

        torch.set_num_threads(threads)
    if "gpu" in os.environ.get("SKINBRIDGE_WORKER_QUEUES", "gpu"):
        engines()


@worker_init.connect
def _init_threads_worker(**_: Any) -> None:
    """A batching worker's threads pool forks nothing: its one process loads the models here."""
    if get_settings().worker_pool == "threads":
        init_worker_process()


@functools.lru_cache(maxsize=1)
def engines():  # type: ignore[no-untyped-def]
    from inference.engines.registry import load_engines

    return load_engines(get_settings())


# --- helpers ------------------------------------------------------------------------------------
class PoisonCase(Exception):
    """The case cannot be processed (bad data, model error); retrying would not help."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def case_step(task, case_id: str, allowed: set[CaseStatus]) -> Iterator[tuple[Clinic, Session, Case]]:  # type: ignore[no-untyped-def]
    """Open the case in a session; stop the chain if the case is not in an ``allowed`` state;
    turn errors into a retry (transient) or a failed case (poison). While the step runs, this process
    holds a lease on the case (inference.leases), released after the task in :func:`_release_lease`."""
    clinic = get_clinic()
    session = clinic.session()
    try:
        case = session.get(Case, uuid.UUID(case_id))
        if case is None or CaseStatus(case.status) not in allowed:
            raise Ignore()
        _hold_lease(clinic, task, case.id)
        yield clinic, session, case
        session.commit()
    except (Ignore, IntegrityError) as exc:
        session.rollback()
        if isinstance(exc, IntegrityError):
            log.info("step %s for case %s already done by another worker", task.name, case_id)
        raise Ignore() from None
    except TRANSIENT as exc:
        session.rollback()
        if task.request.retries >= task.max_retries:
            _fail(case_id, f"{task.name.split('.')[-1]}_transient_error")
            raise Ignore() from None
        raise task.retry(exc=exc, countdown=min(60, 2 ** task.request.retries))
    except SoftTimeLimitExceeded:
        session.rollback()
        _fail(case_id, f"{task.name.split('.')[-1]}_timeout")
        raise Ignore() from None
    except Exception as exc:  # noqa: BLE001 - poison: record and stop, never loop
        session.rollback()
        reason = exc.reason if isinstance(exc, PoisonCase) else f"{task.name.split('.')[-1]}_error:{type(exc).__name__}"
        log.exception("case %s failed in %s", case_id, task.name)
        _fail(case_id, reason)
        raise Ignore() from None
    finally:
        session.close()


_held: dict[str, leases.Held] = {}  # task id -> the lease this process renews for it


def _hold_lease(clinic: Clinic, task, case_id: uuid.UUID) -> None:  # type: ignore[no-untyped-def]
    task_id = task.request.id  # None when called as a plain function: no broker, nothing to lose
    if task_id is not None and task_id not in _held:  # an eager retry runs inside its first try
        _held[task_id] = leases.Held(clinic, case_id, task_id, task.name, get_settings().stuck_after_s)


@task_postrun.connect
def _release_lease(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    """After the task, when Celery has already published the chain's next step: a case is never
    without either a lease or a message in the broker. A step waiting for its retry (held in a worker's
    memory until its countdown, at most 60 s) keeps its lease until then plus stuck_after_s."""
    held = _held.pop(task_id, None) if task_id else None
    if held is not None:
        held.release(keep_s=60 + held.ttl_s if state == "RETRY" else None)


def _fail(case_id: str, reason: str) -> None:
    clinic = get_clinic()
    with clinic.session() as session:
        case = session.get(Case, uuid.UUID(case_id))
        if case is None or CaseStatus.failed not in _next_states(case):
            return
        cases.transition(session, case, CaseStatus.failed, WORKER, reason=reason)
        outbox.enqueue(
            clinic, session, patient_id=case.patient_id, case_id=case.id, kind="failed",
            dedup_key=f"failed:{case.id}:{case.pipeline_attempts}", payload={"case_id": case_id, "reason": reason},
        )
        session.commit()


def _next_states(case: Case) -> frozenset[CaseStatus]:
    from clinic_db.states import TRANSITIONS

    return TRANSITIONS[CaseStatus(case.status)]


def _photos(clinic: Clinic, session: Session, case: Case, read: dict[uuid.UUID, bytes] | None = None,
            ) -> list[PILImage.Image]:
    """The case's photos; ``read`` holds the ones this task already decrypted (and audited) for the gate."""
    photos = []
    for image in case.images:
        data = (read or {}).get(image.id) or cases.image_bytes(clinic, session, image, WORKER, purpose="treatment")
        photos.append(PILImage.open(io.BytesIO(data)).convert("RGB"))
    if not photos:
        raise PoisonCase("no_photos")
    return photos


def _seed(case_id: uuid.UUID, salt: int = 0) -> int:
    return (case_id.int + salt) % (2**31 - 1)


TASK_OPTS: dict[str, Any] = dict(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=5)


# --- the chain ------------------------------------------------------------------------------
# inference.pipeline.case_chain sends two tasks per case, both to the gpu queue:
#   analyse: quality gate -> models -> report; the report's transaction also writes the result message,
#            so the patient hears as soon as it is committed (one broker hop from the bot's submit);
#   explain: the example pictures, a message of their own that follows the result (never delays it).
# Each step still runs in its own transaction, re-reads the case and skips work already done. The
# one-step tasks below stay registered for chains already in a broker and for the sweeper.
@app.task(name="skinbridge.analyse", queue="gpu", **TASK_OPTS)
def analyse(self, case_id: str) -> None:
    try:
        read: dict[uuid.UUID, bytes] = {}
        _quality_gate(self, case_id, read)
        _diagnose(self, case_id, read)
        _assemble_report(self, case_id, with_result=True)
    except Ignore:
        if _status(case_id) not in RESULT_STATES:
            raise  # failed, withdrawn or gone: the chain stops here
        # a redelivery after the report was committed: its result message went with it; explain goes on


def _status(case_id: str) -> str | None:
    with get_clinic().session() as session:
        return session.scalar(select(Case.status).where(Case.id == uuid.UUID(case_id)))


@app.task(name="skinbridge.quality_gate", queue="cpu", **TASK_OPTS)
def quality_gate(self, case_id: str) -> None:
    _quality_gate(self, case_id)


def _quality_gate(self, case_id: str, read: dict[uuid.UUID, bytes] | None = None) -> None:  # type: ignore[no-untyped-def]
    from inference.quality import assess
    from clinic_db.cases import CleanImage

    with case_step(self, case_id, {CaseStatus.queued, CaseStatus.analysing}) as (clinic, session, case):
        if case.status == CaseStatus.queued.value:
            case.pipeline_attempts += 1
            if case.pipeline_attempts > get_settings().max_pipeline_attempts:
                raise PoisonCase("too_many_attempts")
            cases.transition(session, case, CaseStatus.analysing, WORKER)
        for image in case.images:
            if image.quality is None:
                data = cases.image_bytes(clinic, session, image, WORKER)
                if read is not None:
                    read[image.id] = data
                report = assess(CleanImage(data=data, mime=image.mime, width=image.width, height=image.height))
                image.quality = {"ok": report.ok, "problems": list(report.problems), **report.metrics}
        outbox.enqueue(
            clinic, session, patient_id=case.patient_id, case_id=case.id, kind="progress",
            dedup_key=f"progress:{case.id}:analysing", payload={"case_id": case_id, "stage": "analysing"},
        )


@app.task(name="skinbridge.diagnose", queue="gpu", **TASK_OPTS)
def diagnose(self, case_id: str) -> None:
    _diagnose(self, case_id)


def _diagnose(self, case_id: str, read: dict[uuid.UUID, bytes] | None = None) -> None:  # type: ignore[no-untyped-def]
    retry_vlm: BaseException | None = None
    with case_step(self, case_id, {CaseStatus.analysing}) as (clinic, session, case):
        delay = get_settings().fault_delay_s
        if delay:
            time.sleep(delay)
        done = set(session.scalars(select(AIResult.engine).where(AIResult.case_id == case.id)))
        eng = engines()
        photos = _photos(clinic, session, case, read)
        if "classifier" not in done:
            per_photo = eng.classifier.predict(photos)  # each photo's type read from it (photo_type.json)
            _store_prediction(clinic, session, case, _merge_photo_predictions(per_photo))
        if eng.vlm is not None and "vlm" not in done:
            # the VLM is optional: its failure never costs the classifier's result (issue 21, graceful degradation)
            try:
                vlm_prediction = eng.vlm.diagnose(photos, cases.history(clinic, session, case), case.patient.language)
            except Exception as exc:  # noqa: BLE001 - transient: retry (policy below); otherwise a flagged result
                vlm_prediction = None
                if _retry_model_error(self, exc):
                    session.commit()  # keep the classifier's result; the retry runs only the VLM
                    retry_vlm = exc
                else:
                    log.warning("VLM failed on case %s (%s); publishing the classifier's result flagged",
                                case_id, type(exc).__name__)
                    _store_prediction(clinic, session, case, _vlm_failure(eng.vlm, exc))
            if vlm_prediction is not None:
                _store_prediction(clinic, session, case, vlm_prediction)
    if retry_vlm is not None:
        raise self.retry(exc=retry_vlm, countdown=min(60, 2 ** self.request.retries))


def _store_prediction(clinic: Clinic, session: Session, case: Case, p: Any) -> None:
    cases.add_ai_result(
        clinic, session, case, engine=p.engine, model_id=p.model_id, model_version=p.model_version,
        weights_sha256=p.weights_sha256, differential=p.differential, description=p.description,
        saliency_png=p.saliency_png, flags=list(p.flags) + [f"hint:{h}" for h in p.urgency_hints],
        timings=p.timings,
    )


def _retry_model_error(task, exc: BaseException) -> bool:  # type: ignore[no-untyped-def]
    """The pipeline's retry policy applied to an optional model: transient errors (the TRANSIENT
    family, a GPU out of memory for the moment) retry with back-off while retries are left."""
    transient = isinstance(exc, TRANSIENT) or type(exc).__name__ == "OutOfMemoryError"
    return transient and not isinstance(exc, SoftTimeLimitExceeded) and task.request.retries < task.max_retries


def _vlm_failure(vlm: Any, exc: BaseException) -> Any:
    """An empty VLM result carrying the failure: the dermatologist sees the flag, triage applies its
    policy for ``vlm_error`` (inference/data/triage_rules.json), the admin page counts it."""
    from inference.engines.base import FLAG_VLM_ERROR, Prediction

    return Prediction(engine="vlm", model_id=vlm.model_id, model_version=vlm.model_version,
                      weights_sha256=vlm.weights_sha256, differential=[],
                      flags=[FLAG_VLM_ERROR, f"{FLAG_VLM_ERROR}:{type(exc).__name__}"])


def _merge_photo_predictions(per_photo: list) -> Any:  # type: ignore[type-arg]
    """Several photos of one lesion: average the probabilities; keep the first photo's saliency map."""
    import dataclasses

    first = per_photo[0]
    if len(per_photo) == 1:
        return first
    totals: dict[str, float] = {}
    for p in per_photo:
        for d in p.differential:
            totals[d["code"]] = totals.get(d["code"], 0.0) + d["probability"] / len(per_photo)
    merged = [{"code": c, "probability": round(v, 6)} for c, v in sorted(totals.items(), key=lambda kv: -kv[1])]
    timings = {k: sum(p.timings.get(k, 0.0) for p in per_photo) for k in first.timings}
    flags = sorted({f for p in per_photo for f in p.flags})
    hints = sorted({h for p in per_photo for h in p.urgency_hints})
    return dataclasses.replace(first, differential=merged, timings=timings, flags=flags, urgency_hints=hints)


@app.task(name="skinbridge.explain", queue="gpu", **TASK_OPTS)
def explain(self, case_id: str) -> None:
    """Example pictures of the case's top condition, then the message that brings them (and, once the
    result is out, the FHIR report again with them, and the progress message 'ready')."""
    settings = get_settings()
    retry_explainer: BaseException | None = None
    allowed = {CaseStatus.analysing, CaseStatus.preliminary, CaseStatus.in_review}
    with case_step(self, case_id, allowed) as (clinic, session, case):
        planned = _pictures_planned(session, case)
        if planned is not None and case.status in RESULT_STATES and _results_waiting(session):
            # results first: go to the back of the queue, behind the cases that wait for their analysis
            explain.apply_async(args=[case_id])
            return
        if planned is not None:
            top, explainer, approved = planned
            seed = _seed(case.id)
            try:
                # an image-conditioned explainer starts from the patient's first photo (read and audited)
                photo = _photos(clinic, session, case)[0] if explainer.uses_photo else None
                patient = session.get(Patient, case.patient_id)  # captions in the patient's language
                pngs = explainer.generate(top, settings.explanation_images, seed, patient.language if patient else "en",
                                          approved=approved, photo=photo)
            except Exception as exc:  # noqa: BLE001 - pictures are optional: the result goes out without them
                pngs = []
                if _retry_model_error(self, exc):
                    retry_explainer = exc
                else:
                    from inference.engines.base import FLAG_EXPLAINER_ERROR

                    log.warning("explainer failed on case %s (%s); no example pictures", case_id, type(exc).__name__)
                    preferred = cases.preferred_result(session, case)
                    preferred.flags = [*preferred.flags, FLAG_EXPLAINER_ERROR]  # shown in the console, counted by admin
            for i, png in enumerate(pngs):
                cases.add_explanation_image(clinic, session, case, condition_code=top, png=png,
                                            model_id=explainer.model_id, seed=seed + i)
        if retry_explainer is None:
            _pictures_out(clinic, session, case)
    if retry_explainer is not None:
        raise self.retry(exc=retry_explainer, countdown=min(60, 2 ** self.request.retries))


def _results_waiting(session: Session) -> bool:
    """A case queued for analysis (not one stuck there: the sweeper deals with those)."""
    recent = utcnow() - timedelta(seconds=get_settings().stuck_after_s)
    return session.scalar(select(Case.id).where(Case.status == CaseStatus.queued.value,
                                                Case.status_changed_at > recent).limit(1)) is not None


def sure_enough_for_pictures(result: AIResult | None) -> bool:
    """Whether a result's top guess is likely enough to be shown in example pictures (an engine that
    gives no probability, as a VLM may not, counts as sure enough)."""
    if result is None or result.top_condition_code is None:
        return False
    return result.top_probability is None or result.top_probability >= get_settings().example_pictures_min_probability


def _pictures_planned(session: Session, case: Case) -> tuple[str, Any, set[str]] | None:
    """(condition, explainer, approved codes) when this case gets example pictures not drawn yet."""
    settings = get_settings()
    preferred = cases.preferred_result(session, case)
    top = preferred.top_condition_code if preferred is not None else None
    if top is None or not sure_enough_for_pictures(preferred) or settings.explanation_images <= 0:
        return None
    have = session.scalar(
        select(ExplanationImage.id).where(ExplanationImage.case_id == case.id,
                                          ExplanationImage.condition_code == top).limit(1)
    )
    explainer = engines().explainer
    if have is not None or explainer is None or not explainer.knows(top):
        return None
    # patients get pictures only of conditions a dermatologist approved for these weights and settings
    approved = explainer_review.approved_codes(session, explainer.review_subject)
    return (top, explainer, approved) if top in approved else None


def _pictures_out(clinic: Clinic, session: Session, case: Case) -> None:
    """The pictures' own message (when there are any); after the result also the FHIR report with them
    and the progress message's last word. A chain from before (explain ahead of the report) leaves those
    to assemble_report and notify."""
    drawn = session.scalar(select(ExplanationImage.id).where(ExplanationImage.case_id == case.id).limit(1))
    if drawn is not None:
        outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="pictures",
                       dedup_key=f"pictures:{case.id}", payload={"case_id": str(case.id)})
    if case.status in RESULT_STATES:
        if drawn is not None:
            _publish(clinic, session, case)
        outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="progress",
                       dedup_key=f"progress:{case.id}:ready", payload={"case_id": str(case.id), "stage": "ready"})


@app.task(name="skinbridge.assemble_report", queue="cpu", **TASK_OPTS)
def assemble_report(self, case_id: str) -> None:
    _assemble_report(self, case_id, with_result=False)  # a chain from before: notify follows


def _assemble_report(self, case_id: str, *, with_result: bool) -> None:  # type: ignore[no-untyped-def]
    from inference.pipeline import pending_review_wishes
    from inference.triage import AI_UNUSABLE, PATIENT_REQUESTED, decide

    with case_step(self, case_id, {CaseStatus.analysing}) as (clinic, session, case):
        predictions = _predictions_from_db(clinic, session, case)
        quality_failed = bool(case.images) and all(not (i.quality or {}).get("ok", True) for i in case.images)
        wishes = pending_review_wishes(session, case.id)
        decision = decide(
            predictions, cases.history(clinic, session, case),
            photo_quality_failed=quality_failed, patient_requested=PATIENT_REQUESTED in wishes,
        )
        usable = [p for p in predictions if p.differential]
        case.urgency = decision.urgency
        preferred = cases.preferred_result(session, case)
        case.condition_code = preferred.top_condition_code if preferred is not None else None
        if usable:
            cases.transition(session, case, CaseStatus.preliminary, WORKER)
        if decision.review or not usable:
            reasons = list(decision.reasons) or [AI_UNUSABLE]
            cases.transition(session, case, CaseStatus.in_review, Actor.system("triage"), reason=",".join(reasons)[:200])
            review.open_task(session, case, urgency=decision.urgency, reasons=reasons)
        _publish(clinic, session, case)
        if with_result:  # committed with the status change: nothing can come between them
            _enqueue_result(clinic, session, case, pictures=_pictures_planned(session, case) is not None)


def _predictions_from_db(clinic: Clinic, session: Session, case: Case) -> list[Any]:
    from inference.engines.base import Prediction

    out = []
    for r in session.scalars(select(AIResult).where(AIResult.case_id == case.id).order_by(AIResult.created_at)):
        flags = [f for f in r.flags if not f.startswith("hint:")]
        hints = [f[5:] for f in r.flags if f.startswith("hint:")]
        out.append(Prediction(
            engine=r.engine, model_id=r.model_id, model_version=r.model_version, weights_sha256=r.weights_sha256,
            differential=clinic.vault.get_json(session, r, "differential", owner=case.patient_id) or [],
            description=None, features=None, flags=flags, urgency_hints=hints, advice=None, saliency_png=None,
            timings=dict(r.timings),
        ))
    return out


def _publish(clinic: Clinic, session: Session, case: Case) -> None:
    """Publish the FHIR DiagnosticReport (preliminary) in the same transaction as the status change."""
    try:
        from fhir.publish import publish_case
    except ImportError:  # the FHIR component is optional in a worker-only install
        return
    publish_case(clinic, session, case.id)


@app.task(name="skinbridge.notify", queue="cpu", **TASK_OPTS)
def notify(self, case_id: str) -> None:
    with case_step(self, case_id, {CaseStatus.preliminary, CaseStatus.in_review}) as (clinic, session, case):
        _enqueue_result(clinic, session, case)


def _enqueue_result(clinic: Clinic, session: Session, case: Case, *, pictures: bool = False) -> None:
    """The result message; the progress message says 'drawing example pictures' while they are drawn
    (explain then says 'ready'), else 'ready' at once."""
    payload = {"case_id": str(case.id)}
    outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="result",
                   dedup_key=f"result:{case.id}", payload=payload)
    stage = "pictures" if pictures else "ready"
    outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="progress",
                   dedup_key=f"progress:{case.id}:{stage}", payload=payload | {"stage": stage})


# --- follow-up questions --------------------------------------------------------------------
@app.task(name="skinbridge.answer_followup", queue="cpu", **TASK_OPTS)
def answer_followup(self, case_id: str, message_id: str) -> None:
    from inference.engines.base import FLAG_FOLLOWUP_FALLBACK
    from inference.followup import FLAG_EMERGENCY_SIGN, FLAG_RED_FLAG, answer_question

    allowed = {CaseStatus.preliminary, CaseStatus.in_review, CaseStatus.final, CaseStatus.amended}
    red_flag = emergency = False
    retry_vlm: BaseException | None = None
    with case_step(self, case_id, allowed) as (clinic, session, case):
        dedup = f"followup_answer:{message_id}"
        if session.scalar(select(OutboxMessage.id).where(OutboxMessage.dedup_key == dedup)) is not None:
            raise Ignore()
        question_row = session.get(CaseMessage, uuid.UUID(message_id))
        if question_row is None or question_row.case_id != case.id:
            raise PoisonCase("followup_message_missing")
        question = clinic.vault.get_text(session, question_row, "text", owner=case.patient_id) or ""
        vlm = _followup_vlm(self)
        try:
            answer = answer_question(clinic, session, case, question, vlm)
        except Exception as exc:  # noqa: BLE001 - a failing VLM: retry (policy), else the vocabulary answer
            if vlm is None:
                raise
            answer = None
            if _retry_model_error(self, exc):
                retry_vlm = exc
            else:
                log.warning("VLM failed on a follow-up of case %s (%s); answering from the vocabulary",
                            case_id, type(exc).__name__)
                answer = answer_question(clinic, session, case, question, None)
                answer.flags.append(FLAG_FOLLOWUP_FALLBACK)
        if answer is not None:
            reply = CaseMessage(case_id=case.id, patient_id=case.patient_id, role="assistant", flags=answer.flags)
            reply.ensure_id()
            clinic.vault.set_text(session, reply, "text", answer.text, owner=case.patient_id)
            session.add(reply)
            session.flush()
            outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="followup_answer",
                           dedup_key=dedup, payload={"case_id": case_id, "message_id": str(reply.id)})
            red_flag = FLAG_RED_FLAG in answer.flags
            emergency = FLAG_EMERGENCY_SIGN in answer.flags
    if retry_vlm is not None:
        raise self.retry(exc=retry_vlm, countdown=min(60, 2 ** self.request.retries))
    if red_flag:
        from inference.pipeline import request_review

        from inference.triage import RED_FLAG

        request_review(case_id, RED_FLAG, urgency="emergency" if emergency else "urgent")


def _followup_vlm(task) -> Any:  # type: ignore[no-untyped-def]
    """The VLM, only where it lives: a follow-up that came in on the gpu queue (inference.pipeline routes
    it there when a VLM is configured). A CPU worker never loads a VLM; it answers from the vocabulary."""
    if not get_settings().vlm_path:
        return None
    queue = (task.request.delivery_info or {}).get("routing_key")
    on_gpu = queue == "gpu" if queue else "gpu" in os.environ.get("SKINBRIDGE_WORKER_QUEUES", "gpu")
    return engines().vlm if on_gpu else None


@app.task(name="skinbridge.selfcheck", queue="cpu")
def selfcheck() -> list[str]:
    """Imports and schema as a worker process sees them (the `fhir` namespace in particular)."""
    from skinbridge.selfcheck import record_worker_check

    return record_worker_check()


@app.task(name="skinbridge.deliver_subscriptions", queue="cpu", ignore_result=True)
def deliver_subscriptions() -> None:
    """Push id-only notifications to EHRs' FHIR rest-hook subscriptions (retries with back-off)."""
    from fhir.subscriptions import deliver_due

    deliver_due(get_clinic())


# --- the sweeper: the case row is the source of truth ------------------------------------------
@app.task(name="skinbridge.sweep", queue=SWEEPER_QUEUE)
def sweep() -> dict[str, int]:
    """Redo lost work; never fail a case for waiting. Safe to run anywhere, any time.

    * a case whose lease expired unreleased (its worker died mid-step, or the process handing it to the
      broker died or met a broker outage) goes back to ``queued`` and its chain is re-sent; the re-run
      counts as a pipeline attempt, so a case that keeps killing workers ends ``too_many_attempts``;
    * a case held by a live lease is left alone however long its step takes;
    * a case waiting in the queue is re-sent (no attempt counted) only when the broker's pipeline queues
      are empty and no worker held or finished a step for ``stuck_after_s``: then its message was lost
      inside the broker (a Redis restart without persistence, say). A backlog is never re-sent;
    * a case whose photos and history are complete but which was never submitted is submitted;
    * a result whose patient message was never written gets it (by the same rule as a waiting case).
    """
    from inference.pipeline import publish_chain, submit_completed

    settings = get_settings()
    clinic = get_clinic()
    now = utcnow()
    cutoff = now - timedelta(seconds=settings.stuck_after_s)
    requeued = resent = notified = 0
    sweeper = Actor.system("sweeper")
    with clinic.session() as session:
        view = leases.survey(session, now)
        handled = set(view.held) | set(view.lost)
        for case_id, task_ids in view.lost.items():
            case = session.get(Case, case_id)
            if case_id in view.held or case is None or CaseStatus(case.status) not in PIPELINE_STATES:
                leases.settle(session, task_ids, now)  # someone else redoes it, or it finished before dying
                session.commit()
                if case is not None and case_id not in view.held and case.status in RESULT_STATES:
                    # died in notify or explain, or right after: both idempotent
                    chain(notify.si(str(case_id)), explain.si(str(case_id))).apply_async()
                    notified += 1
                continue
            try:
                if case.status == CaseStatus.analysing.value:
                    cases.transition(session, case, CaseStatus.queued, sweeper, reason="worker_lost")
                leases.settle(session, task_ids, now)
                publish_chain(clinic, session, case.id)
            except cases.StaleCase:
                session.rollback()
                continue
            requeued += 1
        # nothing held, nothing finished lately, nothing in the broker: what still waits was lost there
        quiet = view.idle_since(cutoff) and _messages_waiting() == 0
        if quiet:
            waiting = session.scalars(select(Case).where(
                Case.status.in_([s.value for s in PIPELINE_STATES]), Case.status_changed_at < cutoff,
            )).all()
            for case in (c for c in waiting if c.id not in handled):
                case.status_changed_at = now  # once per stuck_after_s, should no worker consume it
                publish_chain(clinic, session, case.id)
                resent += 1
        leases.prune(session, now - 2 * timedelta(seconds=settings.stuck_after_s))
        session.commit()
        submitted = submit_completed(clinic, before=cutoff)
        # a result without its patient message (the notify message lost), once nothing else is going on
        recent = [] if not quiet else session.scalars(
            select(Case).where(
                Case.status.in_(RESULT_STATES), Case.status_changed_at < cutoff,
                Case.status_changed_at > cutoff - timedelta(days=1),
            )
        ).all()
        keys = [k for c in recent for k in (f"result:{c.id}", f"progress:{c.id}:pictures", f"progress:{c.id}:ready")]
        sent_keys = set(session.scalars(
            select(OutboxMessage.dedup_key).where(OutboxMessage.dedup_key.in_(keys))
        )) if recent else set()
        unnotified = [c for c in recent if f"result:{c.id}" not in sent_keys and c.id not in view.held]
        for case in unnotified:
            notify.delay(str(case.id))
            notified += 1
        # pictures announced ('drawing example pictures') but never finished: their explain message was lost
        for case in recent:
            if f"progress:{case.id}:pictures" in sent_keys and f"progress:{case.id}:ready" not in sent_keys \
                    and case.id not in view.held:
                explain.delay(str(case.id))
                notified += 1
    if requeued or resent or submitted:
        log.warning("sweeper: %d lost cases re-queued, %d waiting cases re-sent, %d complete cases submitted",
                    requeued, resent, submitted)
    return {"requeued": requeued, "resent": resent, "submitted": submitted, "notified": notified}


RESULT_STATES = (CaseStatus.preliminary.value, CaseStatus.in_review.value)


def _messages_waiting() -> int | None:
    """Messages ready in the pipeline queues, as the broker counts them; None when it cannot say."""
    total = 0
    try:
        with app.connection_for_read() as conn:
            for queue in PIPELINE_QUEUES:
                with conn.channel() as channel:
                    try:
                        total += channel.queue_declare(queue=queue, passive=True).message_count
                    except conn.channel_errors:
                        pass  # the queue does not exist yet (Redis, AMQP): nothing waits in it
    except Exception:  # noqa: BLE001 - unknown is not empty: re-send nothing this time
        log.warning("sweeper: the broker did not say how many messages wait", exc_info=True)
        return None
    return total
