"""FHIR Bulk Data export (``$export``, system and Patient level) for registered EHRs.

Kick-off (``Prefer: respond-async``) records a job in the database and answers 202 with a status
URL; the export itself is a Celery task on the ``cpu`` queue (:mod:`fhir.tasks`), never work inside
the API process. It reads a snapshot (``seq`` at kick-off) and writes NDJSON files of at most
``MAX_FILE_BYTES`` each, sealed with the system key (``fhir_bulk_files``). The status URL answers
202 with ``X-Progress`` until the manifest is ready. ``DELETE`` on the status URL cancels and
deletes the files. Only the client that started a job can see it.

Limits against amplification: ``_type`` is de-duplicated, a client has at most
``MAX_ACTIVE_JOBS`` jobs accepted or running at once (429 beyond), and files expire
``FILE_TTL`` after the job completed (their rows are deleted; the status URL then answers 404).
All of it lives in the database, so any number of API processes share it.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta
from email.utils import format_datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from clinic_db.db import Clinic, get_clinic
from clinic_db.keys import KeyUnavailable
from clinic_db.models import BulkExportFile, BulkExportJob, FhirResource, utcnow
from clinic_db.vault import SYSTEM_KEY_ID
from fhir import mapping, search, smart
from fhir.api import FhirError, audit_access, authorise, outcome, require_grant
from fhir.publish import row_bytes

log = logging.getLogger(__name__)
NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
EXPORT_TYPES = ("Patient", "DiagnosticReport", "Observation", "Media", "Provenance", "Device", "Practitioner",
                "Organization")
PATIENT_TYPES = ("Patient", "DiagnosticReport", "Observation", "Media", "Provenance")
ACTIVE = ("accepted", "running")
MAX_ACTIVE_JOBS = 2  # per client, across every API process
MAX_FILE_BYTES = 8 * 2**20  # an NDJSON file is cut here and continues in the next file of the same type
FILE_TTL = timedelta(hours=1)  # after completion; then the files are deleted
ORPHAN_AFTER = timedelta(hours=1)  # a job neither finished nor failed by then was lost with its worker


def _kick_off(request: Request, level: str) -> Response:
    clinic = get_clinic()
    grant = require_grant(clinic, request)
    if "respond-async" not in request.headers.get("prefer", ""):
        raise FhirError(400, "invalid", "$export needs the header Prefer: respond-async")
    fmt = request.query_params.get("_outputFormat")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise FhirError(400, "not-supported", f"_outputFormat {fmt[:100]!r} not supported; use {NDJSON}")
    allowed_types = PATIENT_TYPES if level == "patient" else EXPORT_TYPES
    asked = list(dict.fromkeys(t.strip() for t in ",".join(request.query_params.getlist("_type")).split(",")
                               if t.strip()))  # each type once, however often it is named
    for t in asked:
        if t not in allowed_types:
            raise FhirError(400, "not-supported", f"cannot export {t[:100]!r} at {level} level")
        authorise(clinic, grant, t, "s", "fhir.export")
    types = asked or [t for t in allowed_types if grant.allows(t, "s")]
    if not types:
        raise FhirError(403, "forbidden", "the token's scopes allow no exportable type")
    since = request.query_params.get("_since")
    if since is not None:
        try:
            search.parse_date(since)
        except search.SearchError as exc:
            raise FhirError(400, "invalid", f"_since: {exc}") from exc
    with clinic.session() as session:
        expire_files(session)
        active = session.scalar(select(func.count()).select_from(BulkExportJob).where(
            BulkExportJob.client_id == grant.client_id, BulkExportJob.status.in_(ACTIVE),
            BulkExportJob.created_at > utcnow() - ORPHAN_AFTER))
        if active >= MAX_ACTIVE_JOBS:
            raise FhirError(429, "throttled", f"this client already has {active} exports in progress (at most "
                            f"{MAX_ACTIVE_JOBS}); wait for one to finish or cancel it", {"Retry-After": "30"})
        job = BulkExportJob(client_id=grant.client_id, status="accepted", level=level,
                            params={"types": types, "since": since, "request": _request_url(request),
                                    "snapshot": search.current_snapshot(session)},
                            transaction_time=utcnow())
        job.ensure_id()
        session.add(job)
        audit_access(session, grant, "fhir.export", "BulkExportJob", job.id, level=level, types=types)
        session.commit()
        job_id = job.id
    from fhir.tasks import export  # the Celery app is only needed here

    try:
        export.apply_async(args=[str(job_id)], queue="cpu")
    except Exception as exc:  # noqa: BLE001 - the broker is down: the job cannot run
        log.error("could not queue export %s: %r", job_id, exc)
        with clinic.session() as session:
            session.execute(update(BulkExportJob).where(BulkExportJob.id == job_id)
                            .values(status="error", error="could not be queued"))
            session.commit()
        raise FhirError(503, "transient", "the export could not be queued; try again later",
                        {"Retry-After": "60"}) from exc
    status_url = f"{smart.fhir_base(request)}/$export-status/{job_id}"
    return Response(status_code=202, headers={"Content-Location": status_url})


def _request_url(request: Request) -> str:
    """The kick-off URL as the client should see it (under the public base URL, not the Host header)."""
    query = request.url.query
    return smart.public_base(request) + request.url.path + (f"?{query}" if query else "")


def expire_files(session: Session) -> int:
    """Delete the files of jobs completed more than FILE_TTL ago (the job row stays, as 'expired')."""
    expired = select(BulkExportJob.id).where(BulkExportJob.status == "complete",
                                              BulkExportJob.completed_at < utcnow() - FILE_TTL)
    session.execute(delete(BulkExportFile).where(BulkExportFile.job_id.in_(expired)))
    return session.execute(update(BulkExportJob).where(BulkExportJob.id.in_(expired))
                           .values(status="expired").execution_options(synchronize_session=False)).rowcount


def run_export(clinic: Clinic, job_id: uuid.UUID) -> None:
    """The export of one job (run by the fhir.export Celery task): NDJSON files of at most
    MAX_FILE_BYTES per type, checking for cancellation after each file."""
    try:
        with clinic.session() as session:
            claimed = session.execute(update(BulkExportJob).where(
                BulkExportJob.id == job_id, BulkExportJob.status == "accepted").values(status="running")).rowcount
            session.commit()
            if not claimed:
                return  # cancelled, or another delivery of the task already ran it
            job = session.get(BulkExportJob, job_id)
            assert job is not None
            params, level = dict(job.params), job.level
        since = search.parse_date(params["since"])[0] if params.get("since") else None
        types = list(params["types"])
        for n, rtype in enumerate(types, start=1):
            stmt = search.snapshot_select(rtype, int(params["snapshot"])).order_by(FhirResource.seq)
            if since is not None:
                stmt = stmt.where(FhirResource.last_updated > since)
            if level == "patient":
                stmt = stmt.where(FhirResource.patient_id.is_not(None))
            lines: list[bytes] = []
            size = 0
            with clinic.session() as read:
                for row in read.scalars(stmt).yield_per(500):
                    try:
                        line = row_bytes(clinic, read, row)
                    except KeyUnavailable:
                        continue  # erased meanwhile
                    if lines and size + len(line) + 1 > MAX_FILE_BYTES:
                        if not _write_file(clinic, job_id, rtype, lines):
                            return
                        lines, size = [], 0
                    lines.append(line)
                    size += len(line) + 1
            if lines and not _write_file(clinic, job_id, rtype, lines):
                return
            with clinic.session() as session:
                session.execute(update(BulkExportJob).where(BulkExportJob.id == job_id)
                                .values(progress=f"{n}/{len(types)} types"))
                session.commit()
        with clinic.session() as session:
            session.execute(update(BulkExportJob).where(BulkExportJob.id == job_id, BulkExportJob.status == "running")
                            .values(status="complete", completed_at=utcnow()))
            session.commit()
    except Exception as exc:  # noqa: BLE001 - the job records the failure for the client
        log.exception("export %s failed", job_id)
        with clinic.session() as session:
            session.execute(update(BulkExportJob).where(BulkExportJob.id == job_id, BulkExportJob.status == "running")
                            .values(status="error", error=type(exc).__name__))
            session.commit()


def _write_file(clinic: Clinic, job_id: uuid.UUID, rtype: str, lines: list[bytes]) -> bool:
    """Seal and store one NDJSON file; False when the job was cancelled meanwhile (nothing stored)."""
    with clinic.session() as session:
        status = session.scalar(select(BulkExportJob.status).where(BulkExportJob.id == job_id).with_for_update())
        if status != "running":
            return False
        file = BulkExportFile(job_id=job_id, resource_type=rtype, count=len(lines), data_enc=b"")
        file.ensure_id()
        file.data_enc = clinic.vault.seal_for(session, SYSTEM_KEY_ID, "fhir_bulk_files", str(file.id), "data",
                                              b"\n".join(lines) + b"\n")
        session.add(file)
        session.commit()
    return True


def _own_job(session: Session, client_id: str, job_id: str) -> BulkExportJob:
    try:
        job = session.get(BulkExportJob, uuid.UUID(job_id))
    except ValueError:
        job = None
    if job is None or job.client_id != client_id or job.status in ("cancelled", "expired"):
        raise FhirError(404, "not-found", "no such export job (files expire "
                        f"{int(FILE_TTL.total_seconds() // 60)} minutes after completion)")
    return job


def build_router() -> APIRouter:
    from fhir.api import FhirRoute

    router = APIRouter(route_class=FhirRoute)

    @router.get("/fhir/$export")
    def export_system(request: Request) -> Response:
        return _kick_off(request, "system")

    @router.get("/fhir/Patient/$export")
    def export_patients(request: Request) -> Response:
        return _kick_off(request, "patient")

    @router.get("/fhir/$export-status/{job_id}")
    def export_status(job_id: str, request: Request) -> Response:
        clinic = get_clinic()
        base = smart.fhir_base(request)
        with clinic.session() as session:
            grant = require_grant(clinic, request, session)
            if expire_files(session):
                session.commit()
            job = _own_job(session, grant.client_id, job_id)
            if job.status in ACTIVE and utcnow() - job.created_at > ORPHAN_AFTER:  # its worker was lost
                job.status, job.error = "error", "interrupted"
                session.commit()
            if job.status in ACTIVE:
                return Response(status_code=202, headers={"X-Progress": job.progress or job.status,
                                                          "Retry-After": "1"})
            if job.status == "error":  # the Bulk Data spec: a failed job answers 5xx with an OperationOutcome
                return outcome(500, "exception", f"export failed: {job.error}")
            files = session.scalars(select(BulkExportFile).where(BulkExportFile.job_id == job.id)
                                    .order_by(BulkExportFile.resource_type)).all()
            manifest = {
                "transactionTime": mapping.instant(job.transaction_time),
                "request": job.params["request"],
                "requiresAccessToken": True,
                "output": [{"type": f.resource_type, "url": f"{base}/$export-file/{f.id}", "count": f.count}
                           for f in files],
                "error": [],
            }
            expires = (job.completed_at or utcnow()) + FILE_TTL
        return Response(orjson.dumps(manifest), 200, media_type="application/json",
                        headers={"Expires": format_datetime(expires, usegmt=True)})

    @router.delete("/fhir/$export-status/{job_id}")
    def export_cancel(job_id: str, request: Request) -> Response:
        clinic = get_clinic()
        with clinic.session() as session:
            grant = require_grant(clinic, request, session)
            job = _own_job(session, grant.client_id, job_id)
            job.status = "cancelled"
            session.flush()  # takes the job's row lock first (PostgreSQL), as the writer of files does
            session.execute(delete(BulkExportFile).where(BulkExportFile.job_id == job.id))
            audit_access(session, grant, "fhir.export.cancel", "BulkExportJob", job.id)
            session.commit()
        return outcome(202, "informational", "export cancelled")

    @router.get("/fhir/$export-file/{file_id}")
    def export_file(file_id: str, request: Request) -> Response:
        clinic = get_clinic()
        with clinic.session() as session:
            grant = require_grant(clinic, request, session)
            try:
                file = session.get(BulkExportFile, uuid.UUID(file_id))
            except ValueError:
                file = None
            job = session.get(BulkExportJob, file.job_id) if file is not None else None
            if file is None or job is None or job.client_id != grant.client_id or job.status != "complete":
                raise FhirError(404, "not-found", "no such export file")
            data = clinic.vault.open_for(session, SYSTEM_KEY_ID, "fhir_bulk_files", str(file.id), "data",
                                         file.data_enc)
            patients = sorted({_patient_ref(json.loads(line)) for line in data.decode("utf-8").splitlines()
                               if line} - {""})
            audit_access(session, grant, "fhir.export.download", file.resource_type, file.id, count=file.count,
                         patients=patients[:500])
            session.commit()
        return Response(data, 200, media_type=NDJSON)

    return router


def _patient_ref(resource: dict[str, Any]) -> str:
    if resource.get("resourceType") == "Patient":
        return f"Patient/{resource['id']}"
    return str((resource.get("subject") or {}).get("reference", ""))
