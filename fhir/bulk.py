"""FHIR Bulk Data export (``$export``, system and Patient level) for registered EHRs.

Kick-off (``Prefer: respond-async``) answers 202 with a status URL; the export itself runs in a
background thread of the API process against a snapshot (``seq`` at kick-off), writes one NDJSON
file per type sealed with the system key (``fhir_bulk_files``), and the status URL answers 202 with
``X-Progress`` until the manifest is ready. ``DELETE`` on the status URL cancels and deletes the
files. Only the client that started a job can see it. A job that no process of this machine is
running and that has not finished within 15 minutes (interrupted by a restart) reports an error.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import delete, select

from clinic_db.db import Clinic, get_clinic
from clinic_db.keys import KeyUnavailable
from clinic_db.models import BulkExportFile, BulkExportJob, FhirResource, utcnow
from clinic_db.vault import SYSTEM_KEY_ID
from fhir import mapping, search, smart
from fhir.api import FhirError, _audit, _authorise, _grant, outcome
from fhir.publish import row_json

NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
EXPORT_TYPES = ("Patient", "DiagnosticReport", "Observation", "Media", "Provenance", "Device", "Practitioner",
                "Organization")
PATIENT_TYPES = ("Patient", "DiagnosticReport", "Observation", "Media", "Provenance")
ORPHAN_AFTER = timedelta(minutes=15)
_RUNNING: set[uuid.UUID] = set()  # jobs with a live worker thread in this process
_LOCK = threading.Lock()


def _kick_off(request: Request, level: str) -> Response:
    clinic = get_clinic()
    grant = _grant(clinic, request)
    if "respond-async" not in request.headers.get("prefer", ""):
        raise FhirError(400, "invalid", "$export needs the header Prefer: respond-async")
    fmt = request.query_params.get("_outputFormat")
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise FhirError(400, "not-supported", f"_outputFormat {fmt!r} not supported; use {NDJSON}")
    allowed_types = PATIENT_TYPES if level == "patient" else EXPORT_TYPES
    asked = [t for t in (request.query_params.get("_type") or "").split(",") if t]
    for t in asked:
        if t not in allowed_types:
            raise FhirError(400, "not-supported", f"cannot export {t!r} at {level} level")
        _authorise(clinic, grant, t, "s", "fhir.export")
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
        job = BulkExportJob(client_id=grant.client_id, status="accepted", level=level,
                            params={"types": types, "since": since, "request": str(request.url),
                                    "snapshot": search.current_snapshot(session)},
                            transaction_time=utcnow())
        job.ensure_id()
        session.add(job)
        _audit(session, grant, "fhir.export", "BulkExportJob", job.id, level=level, types=types)
        session.commit()
        job_id = job.id
    with _LOCK:
        _RUNNING.add(job_id)
    threading.Thread(target=_run, args=(clinic, job_id), name=f"fhir-export-{job_id}", daemon=True).start()
    status_url = f"{smart.fhir_base(request)}/$export-status/{job_id}"
    return Response(status_code=202, headers={"Content-Location": status_url})


def _run(clinic: Clinic, job_id: uuid.UUID) -> None:
    try:
        with clinic.session() as session:
            job = session.get(BulkExportJob, job_id)
            if job is None or job.status != "accepted":
                return
            job.status = "running"
            session.commit()
            params = job.params
            since = search.parse_date(params["since"])[0] if params.get("since") else None
            for n, rtype in enumerate(params["types"], start=1):
                stmt = search.snapshot_select(rtype, int(params["snapshot"])).order_by(FhirResource.seq)
                if since is not None:
                    stmt = stmt.where(FhirResource.last_updated > since)
                if job.level == "patient":
                    stmt = stmt.where(FhirResource.patient_id.is_not(None))
                lines = []
                for row in session.scalars(stmt):
                    try:
                        lines.append(json.dumps(row_json(clinic, session, row), ensure_ascii=False,
                                                separators=(",", ":")))
                    except KeyUnavailable:
                        continue  # erased meanwhile
                session.refresh(job)
                if job.status == "cancelled":
                    return
                if lines:
                    file = BulkExportFile(job_id=job.id, resource_type=rtype, count=len(lines), data_enc=b"")
                    file.ensure_id()
                    file.data_enc = clinic.vault.seal_for(session, SYSTEM_KEY_ID, "fhir_bulk_files", str(file.id),
                                                          "data", ("\n".join(lines) + "\n").encode("utf-8"))
                    session.add(file)
                job.progress = f"{n}/{len(params['types'])} types"
                session.commit()
            job.status, job.completed_at = "complete", utcnow()
            session.commit()
    except Exception as exc:  # noqa: BLE001 - the job records the failure for the client
        with clinic.session() as session:
            job = session.get(BulkExportJob, job_id)
            if job is not None:
                job.status, job.error = "error", type(exc).__name__
                session.commit()
    finally:
        with _LOCK:
            _RUNNING.discard(job_id)


def _own_job(session: Any, client_id: str, job_id: str) -> BulkExportJob:
    try:
        job = session.get(BulkExportJob, uuid.UUID(job_id))
    except ValueError:
        job = None
    if job is None or job.client_id != client_id or job.status == "cancelled":
        raise FhirError(404, "not-found", "no such export job")
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
        grant = _grant(clinic, request)
        base = smart.fhir_base(request)
        with clinic.session() as session:
            job = _own_job(session, grant.client_id, job_id)
            with _LOCK:
                ours = job.id in _RUNNING
            # another API worker process may be running it; only a long-silent job counts as lost
            orphaned = (job.status in ("accepted", "running") and not ours
                        and utcnow() - job.created_at > ORPHAN_AFTER)
            if orphaned:  # the process that ran it is gone
                job.status, job.error = "error", "interrupted"
                session.commit()
            if job.status in ("accepted", "running"):
                return Response(status_code=202, headers={"X-Progress": job.progress or job.status,
                                                          "Retry-After": "1"})
            if job.status == "error":
                return outcome(500, "exception", f"export failed: {job.error}")
            files = session.scalars(select(BulkExportFile).where(BulkExportFile.job_id == job.id)).all()
            manifest = {
                "transactionTime": mapping.instant(job.transaction_time),
                "request": job.params["request"],
                "requiresAccessToken": True,
                "output": [{"type": f.resource_type, "url": f"{base}/$export-file/{f.id}", "count": f.count}
                           for f in files],
                "error": [],
            }
        return Response(json.dumps(manifest), 200, media_type="application/json",
                        headers={"Expires": datetime.now(timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")})

    @router.delete("/fhir/$export-status/{job_id}")
    def export_cancel(job_id: str, request: Request) -> Response:
        clinic = get_clinic()
        grant = _grant(clinic, request)
        with clinic.session() as session:
            job = _own_job(session, grant.client_id, job_id)
            job.status = "cancelled"
            session.execute(delete(BulkExportFile).where(BulkExportFile.job_id == job.id))
            _audit(session, grant, "fhir.export.cancel", "BulkExportJob", job.id)
            session.commit()
        return outcome(202, "informational", "export cancelled")

    @router.get("/fhir/$export-file/{file_id}")
    def export_file(file_id: str, request: Request) -> Response:
        clinic = get_clinic()
        grant = _grant(clinic, request)
        with clinic.session() as session:
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
            _audit(session, grant, "fhir.export.download", file.resource_type, file.id, count=file.count,
                   patients=patients[:500])
            session.commit()
        return Response(data, 200, media_type=NDJSON)

    return router



def _patient_ref(resource: dict[str, Any]) -> str:
    if resource.get("resourceType") == "Patient":
        return f"Patient/{resource['id']}"
    return str((resource.get("subject") or {}).get("reference", ""))
