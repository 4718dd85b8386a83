"""Publish a case as FHIR resources: one ``fhir_resources`` row per resource version.

A new version is written only when a resource's content changed, so calling :func:`publish_case`
again (the pipeline after the AI result, the console after signing) is cheap and idempotent.
Patient resources are sealed with the patient's data key (AAD ``fhir_resources|Type/id/version|data``)
so erasing the patient crypto-shreds them too; practitioner, device and organization resources stay
clear. ``seq`` grows strictly with commit order (publishers are serialised on one counter row), which
is what keeps search paging free of gaps and duplicates.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from clinic_db import audit, cases
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import (
    AIResult,
    Case,
    Clinician,
    ExplanationImage,
    FhirResource,
    Image,
    KeyValue,
    Patient,
    ReviewTask,
    utcnow,
)
from fhir import mapping, report_pdf
from fhir.mapping import AIData, CaseData, ClinicianData, DecisionData, ExplanationData, PhotoData

ACTOR = Actor.system("fhir-publish")
SEQ_KEY = ("fhir", "seq")


@dataclass
class PublishResult:
    changed: list[str] = field(default_factory=list)  # "Type/id/_history/n" written
    report_version: int | None = None


# --- gathering --------------------------------------------------------------------------------
def load_case(clinic: Clinic, session: Session, case_id: uuid.UUID | str) -> CaseData | None:
    case = session.get(Case, uuid.UUID(str(case_id)))
    if case is None:
        return None
    vault, owner = clinic.vault, case.patient_id
    patient = session.get(Patient, owner)
    assert patient is not None

    def rows(model: Any) -> list[Any]:
        # queried, not case.<relationship>: rows added by id since the case was loaded must count
        return list(session.scalars(select(model).where(model.case_id == case.id).order_by(model.created_at)))

    photos = [
        PhotoData(id=str(img.id), mime=img.mime, width=img.width, height=img.height, taken_at=img.created_at,
                  data=cases.image_bytes(clinic, session, img, ACTOR, purpose="operations"))
        for img in rows(Image)
    ]
    ai_results = [
        AIData(id=str(ai.id), engine=ai.engine, model_id=ai.model_id, model_version=ai.model_version,
               weights_sha256=ai.weights_sha256,
               differential=vault.get_json(session, ai, "differential", owner=owner) or [],
               description=vault.get_text(session, ai, "description", owner=owner),
               flags=list(ai.flags or []), created_at=ai.created_at)
        for ai in rows(AIResult)
    ]
    decisions = []
    tasks = [t for t in rows(ReviewTask)
             if t.status == "decided" and t.decision in mapping.SIGNING_DECISIONS and t.decided_by is not None]
    for task in sorted(tasks, key=lambda t: t.decided_at or t.created_at):
        clinician = session.get(Clinician, task.decided_by)
        assert clinician is not None
        decisions.append(DecisionData(
            task_id=str(task.id), decision=task.decision or "accept", condition_code=task.decision_condition_code,
            urgency=task.decision_urgency, recommendation=task.recommendation,
            note=vault.get_text(session, task, "note", owner=owner),
            clinician=ClinicianData(id=str(clinician.id), username=clinician.username,
                                    display_name=clinician.display_name, active=clinician.active),
            decided_at=task.decided_at or case.status_changed_at,
        ))
    explanations = [
        ExplanationData(condition_code=ex.condition_code, png=vault.decrypt(session, ex, "data", owner=owner) or b"")
        for ex in rows(ExplanationImage)
    ]
    history = cases.history(clinic, session, case)
    return CaseData(
        case_id=str(case.id), patient_id=str(owner), patient_name=vault.get_text(session, patient, "name"),
        patient_language=patient.language, patient_active=patient.has_consent, status=case.status,
        urgency=case.urgency, created_at=case.created_at, body_site=history.get("body_site"), history=history,
        photos=photos, ai_results=ai_results, decisions=decisions, explanations=explanations,
    )


# --- storing ----------------------------------------------------------------------------------
def lock_publication(session: Session) -> KeyValue:
    """Take the publication lock (the seq counter row) until the caller's transaction ends.

    An UPDATE, not a SELECT: it takes the row lock on PostgreSQL and the write lock on SQLite. Held
    from the start of a publication, it serialises publishers (no deadlocks between them on shared
    rows such as Organization or Device) and makes seq order equal commit order.
    """
    for _ in range(3):
        locked = session.execute(
            update(KeyValue).where(KeyValue.namespace == SEQ_KEY[0], KeyValue.key == SEQ_KEY[1])
            .values(updated_at=utcnow()).execution_options(synchronize_session=False)
        ).rowcount
        if locked:
            row = session.get(KeyValue, SEQ_KEY, populate_existing=True)
            assert row is not None
            return row
        try:
            with session.begin_nested():
                session.add(KeyValue(namespace=SEQ_KEY[0], key=SEQ_KEY[1], value={"n": 0}))
        except IntegrityError:
            pass  # another publisher created it first; lock it on the next round
    raise RuntimeError("could not take the FHIR publication lock")


def next_seq(session: Session) -> int:
    """The next paging sequence number (strictly increasing, in commit order)."""
    row = lock_publication(session)
    stored_max = session.scalar(select(func.max(FhirResource.seq))) or 0
    n = max(int((row.value or {}).get("n", 0)), stored_max) + 1
    row.value = {"n": n}
    session.flush()
    return n


def _content(resource: dict[str, Any]) -> str:
    body = dict(resource)
    meta = {k: v for k, v in (body.pop("meta", None) or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        body["meta"] = meta
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def row_json(clinic: Clinic, session: Session, row: FhirResource) -> dict[str, Any]:
    """The stored resource (raises clinic_db.keys.KeyUnavailable once the patient is erased)."""
    if row.patient_id is None:
        assert row.data is not None
        return dict(row.data)
    return json.loads(row_bytes(clinic, session, row))


def row_bytes(clinic: Clinic, session: Session, row: FhirResource) -> bytes:
    """The stored resource as JSON bytes, unsealed but not parsed (the API serves them as they are)."""
    if row.patient_id is None:
        assert row.data is not None
        return json.dumps(row.data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert row.data_enc is not None
    return clinic.vault.open_for(session, row.patient_id, "fhir_resources",
                                 f"{row.resource_type}/{row.id}/{row.version_id}", "data", row.data_enc)


def _first_coding(concept: Any) -> str | None:
    if isinstance(concept, list):
        concept = concept[0] if concept else None
    for coding in (concept or {}).get("coding", []):
        return f"{coding.get('system', '')}|{coding.get('code', '')}"
    return None


def _parse(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def store(
    clinic: Clinic,
    session: Session,
    resource: dict[str, Any],
    *,
    patient_id: uuid.UUID | None,
    case_id: uuid.UUID | None,
    create_only: bool = False,
) -> tuple[int, bool]:
    """Write ``resource`` as a new version if its content differs from the current one.

    Returns (current version id, whether a new version was written).
    """
    rtype, rid = resource["resourceType"], resource["id"]
    current = session.scalar(
        select(FhirResource).where(FhirResource.resource_type == rtype, FhirResource.id == rid,
                                   FhirResource.is_current.is_(True))
    )  # no row lock needed: callers hold the publication lock
    if current is not None and not current.deleted:
        if create_only or _content(row_json(clinic, session, current)) == _content(resource):
            return current.version_id, False
    version = (current.version_id + 1) if current is not None else 1
    now = utcnow()
    resource = dict(resource)
    resource["meta"] = {**(resource.get("meta") or {}), "versionId": str(version),
                        "lastUpdated": mapping.instant(now)}
    if current is not None:
        session.execute(
            update(FhirResource).where(FhirResource.resource_type == rtype, FhirResource.id == rid,
                                       FhirResource.version_id == current.version_id)
            .values(is_current=False).execution_options(synchronize_session=False)
        )
        current.is_current = False
    identifier = (resource.get("identifier") or [{}])[0]
    row = FhirResource(
        resource_type=rtype, id=rid, version_id=version, is_current=True, patient_id=patient_id, case_id=case_id,
        status=resource.get("status"), code=_first_coding(resource.get("code")),
        category=_first_coding(resource.get("category")),
        identifier=f"{identifier['system']}|{identifier['value']}" if identifier.get("value") else None,
        effective_at=_parse(resource.get("effectiveDateTime") or resource.get("createdDateTime")
                            or resource.get("recorded")),
        issued_at=_parse(resource.get("issued")),
        last_updated=now, seq=next_seq(session), deleted=False,
    )
    blob = json.dumps(resource, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if patient_id is not None:
        row.data_enc = clinic.vault.seal_for(session, patient_id, "fhir_resources", f"{rtype}/{rid}/{version}",
                                             "data", blob)
    else:
        row.data = resource
    session.add(row)
    session.flush()
    return version, True


# --- publishing -------------------------------------------------------------------------------
def publish_case(clinic: Clinic, session: Session, case_id: uuid.UUID | str) -> PublishResult:
    """(Re)build the case's FHIR resources and store new versions of those that changed.

    Runs in the caller's transaction (the caller commits). Nothing is published for a case with
    neither an AI result nor a dermatologist's decision.
    """
    result = PublishResult()
    data = load_case(clinic, session, case_id)
    if data is None or (not data.ai_results and not data.decisions):
        return result
    lock_publication(session)
    pid, cid = uuid.UUID(data.patient_id), uuid.UUID(data.case_id)

    def put(res: dict[str, Any], owner: uuid.UUID | None, *, create_only: bool = False) -> int:
        version, changed = store(clinic, session, res, patient_id=owner,
                                 case_id=cid if owner else None, create_only=create_only)
        if changed:
            result.changed.append(f"{res['resourceType']}/{res['id']}/_history/{version}")
        return version

    put(mapping.organization(), None)
    put(mapping.patient(data), pid)
    for ai in data.latest_ai:
        put(mapping.device(ai), None)
    for decision in data.decisions:
        put(mapping.practitioner(decision.clinician), None)
    for i, photo in enumerate(data.photos, start=1):
        put(mapping.media(data, photo, i), pid)
        put(mapping.binary(photo.id, photo.mime, photo.data, data.case_id), pid)
    result_ids: list[str] = []
    for ai in data.latest_ai:
        for obs in mapping.ai_observations(data, ai):
            put(obs, pid)
            result_ids.append(obs["id"])
    for decision in data.decisions:
        obs = mapping.clinician_observation(data, decision)
        if obs is not None:
            put(obs, pid)
            if decision is data.decision and mapping.report_status(data) in ("final", "amended"):
                result_ids.insert(0, obs["id"])
    pdf = report_pdf.render(data)
    put(mapping.binary(mapping.report_binary_id(data), "application/pdf", pdf, data.case_id), pid)
    version = put(mapping.diagnostic_report(data, result_ids=result_ids, pdf=pdf), pid)
    result.report_version = version
    for ai in data.latest_ai:
        put(mapping.ai_provenance(data, ai, version), pid, create_only=True)
    for n, decision in enumerate(data.decisions):
        put(mapping.decision_provenance(data, decision, version, first=n == 0), pid, create_only=True)
    case = session.get(Case, cid)
    if case is not None and case.report_version != version:
        case.report_version = version
    if result.changed:
        from fhir.subscriptions import enqueue_matches  # lazy: subscriptions imports the API module

        enqueue_matches(session, result.changed)
        audit.record(session, ACTOR, "fhir.publish", "DiagnosticReport", cid,
                     purpose="operations", versions=len(result.changed), report_version=version)
    session.flush()
    return result


def retract_patient(session: Session, patient_id: uuid.UUID) -> int:
    """Mark every FHIR resource of an erased patient deleted (their data key is gone anyway)."""
    rows = session.execute(
        update(FhirResource).where(FhirResource.patient_id == patient_id, FhirResource.deleted.is_(False))
        .values(deleted=True).execution_options(synchronize_session=False)
    )
    return rows.rowcount or 0

