"""Bulk Data $export: kick-off, polling, manifest, NDJSON files, _type/_since, cancel, ownership."""

from __future__ import annotations

import json
import time

import httpx
from sqlalchemy import select

from clinic_db.models import AuditEvent, BulkExportFile
from fhir.smart import register_client
from tests.test_fhir_support import export_worker, make_case, make_clinician, rsa_key, serve_ehr, sign


def _poll(url: str, headers: dict[str, str], timeout: float = 60) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        resp = httpx.get(url, headers=headers)
        if resp.status_code != 202:
            return resp
        assert resp.headers["X-Progress"]
        assert time.monotonic() < deadline, "export did not finish"
        time.sleep(0.2)


def test_system_and_patient_export_with_type_and_since(clinic):
    with clinic.session() as s:
        a = make_case(clinic, s, 1001, name="Bulk A")
        b = make_case(clinic, s, 1002)
    with export_worker(), serve_ehr(clinic) as ehr:
        h = ehr.headers()
        async_h = {**h, "Prefer": "respond-async"}
        assert httpx.get(f"{ehr.fhir}/$export", headers=h).status_code == 400  # Prefer is required
        kick = httpx.get(f"{ehr.fhir}/$export", headers=async_h)
        assert kick.status_code == 202, kick.text
        status_url = kick.headers["Content-Location"]
        done = _poll(status_url, h)
        assert done.status_code == 200, done.text
        manifest = done.json()
        assert manifest["requiresAccessToken"] is True
        counts = {o["type"]: o["count"] for o in manifest["output"]}
        assert counts["DiagnosticReport"] == 2 and counts["Patient"] == 2 and counts["Organization"] == 1
        dr_file = next(o["url"] for o in manifest["output"] if o["type"] == "DiagnosticReport")
        assert httpx.get(dr_file).status_code == 401  # files need the token too
        ndjson = httpx.get(dr_file, headers=h)
        assert ndjson.headers["content-type"].startswith("application/fhir+ndjson")
        lines = [json.loads(line) for line in ndjson.text.splitlines()]
        assert sorted(r["id"] for r in lines) == sorted([str(a.id), str(b.id)])

        # _since: only what changed after the first export (b gets signed)
        since = manifest["transactionTime"]
        time.sleep(0.01)
        with clinic.session() as s:
            sign(clinic, s, s.merge(b), make_clinician(s))
        kick = httpx.get(f"{ehr.fhir}/Patient/$export", params={"_type": "DiagnosticReport,Observation",
                                                                   "_since": since}, headers=async_h)
        assert kick.status_code == 202, kick.text
        manifest = _poll(kick.headers["Content-Location"], h).json()
        assert {o["type"] for o in manifest["output"]} == {"DiagnosticReport", "Observation"}
        dr_file = next(o["url"] for o in manifest["output"] if o["type"] == "DiagnosticReport")
        reports = [json.loads(line) for line in httpx.get(dr_file, headers=h).text.splitlines()]
        assert [(r["id"], r["status"]) for r in reports] == [(str(b.id), "final")]

        # another client cannot see the job; cancelling deletes the files
        other_key = rsa_key("other")
        other_id = register_client(clinic, "Other EHR", {"keys": [other_key.public_jwk]}, ["system/*.rs"])
        other_token = httpx.post(ehr.token_url, data={
            "grant_type": "client_credentials", "scope": "system/*.rs",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": other_key.assertion(other_id, ehr.token_url)}).json()["access_token"]
        status_url = kick.headers["Content-Location"]
        assert httpx.get(status_url, headers={"Authorization": f"Bearer {other_token}"}).status_code == 404
        assert httpx.delete(status_url, headers=h).status_code == 202
        assert httpx.get(status_url, headers=h).status_code == 404
        assert httpx.get(dr_file, headers=h).status_code == 404

        assert httpx.get(f"{ehr.fhir}/$export", params={"_type": "Unicorn"}, headers=async_h).status_code == 400
        assert httpx.get(f"{ehr.fhir}/$export", params={"_outputFormat": "text/csv"},
                         headers=async_h).status_code == 400

    with clinic.session() as s:
        downloads = s.scalars(select(AuditEvent).where(AuditEvent.action == "fhir.export.download")).all()
        assert downloads and all(e.actor_id == ehr.client_id for e in downloads)
        assert any(f"Patient/{a.patient_id}" in e.detail["patients"] for e in downloads)
        sealed = s.scalars(select(BulkExportFile)).all()
        assert sealed and all(b"Bulk A" not in f.data_enc for f in sealed)


def test_export_respects_scopes(clinic):
    with clinic.session() as s:
        make_case(clinic, s, 1010)
    with export_worker(), serve_ehr(clinic, scopes=["system/DiagnosticReport.rs"]) as ehr:
        h = {**ehr.headers(scope="system/DiagnosticReport.rs"), "Prefer": "respond-async"}
        assert httpx.get(f"{ehr.fhir}/$export", params={"_type": "Patient"}, headers=h).status_code == 403
        kick = httpx.get(f"{ehr.fhir}/$export", headers=h)
        manifest = _poll(kick.headers["Content-Location"], h).json()
        assert {o["type"] for o in manifest["output"]} == {"DiagnosticReport"}
