"""The FHIR REST API on a real server: fhirpy as the EHR, search and paging, conditional reads,
history, errors as OperationOutcomes, and the audit trail."""

from __future__ import annotations

import base64
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from fhirpy import SyncFHIRClient
from sqlalchemy import select

from clinic_db import patients
from clinic_db.audit import Actor
from clinic_db.models import AuditEvent
from fhir.terms import condition
from tests.test_fhir_support import make_case, make_clinician, serve_ehr, sign


def fhirpy_client(ehr) -> SyncFHIRClient:  # type: ignore[no-untyped-def]
    return SyncFHIRClient(ehr.fhir, authorization=f"Bearer {ehr.token()}")


def test_fhirpy_metadata_search_by_patient_and_include(clinic):
    with clinic.session() as s:
        mine = make_case(clinic, s, 601, name="Ana")
        make_case(clinic, s, 602)
    with serve_ehr(clinic) as ehr:
        meta = httpx.get(ehr.fhir + "/metadata").json()
        assert meta["fhirVersion"] == "4.0.1" and meta["resourceType"] == "CapabilityStatement"
        rest = meta["rest"][0]
        assert rest["security"]["extension"][0]["extension"][0] == {"url": "token", "valueUri": ehr.token_url}
        dr = next(r for r in rest["resource"] if r["type"] == "DiagnosticReport")
        assert {"patient", "date", "issued", "code", "status"} <= {p["name"] for p in dr["searchParam"]}

        fc = fhirpy_client(ehr)
        reports = fc.resources("DiagnosticReport").search(patient=f"Patient/{mine.patient_id}").fetch_all()
        assert [r.id for r in reports] == [str(mine.id)]
        assert fc.resources("DiagnosticReport").search(subject=str(mine.patient_id)).count() == 1

        raw = fc.resources("DiagnosticReport").search(_id=str(mine.id)) \
            .include("DiagnosticReport", "result").include("DiagnosticReport", "media") \
            .include("DiagnosticReport", "subject").fetch_raw()
        modes = {}
        for entry in raw.entry:
            modes.setdefault(entry.search.mode, []).append(entry.resource.resourceType)
        assert modes["match"] == ["DiagnosticReport"]
        assert sorted(modes["include"]) == ["Media", "Observation", "Observation", "Observation", "Patient"]
        patient = next(e.resource for e in raw.entry if e.resource.resourceType == "Patient")
        assert patient.id == str(mine.patient_id) and patient.name[0].text == "Ana"

        # the photo itself: Binary as FHIR JSON or as the raw image
        media = next(e.resource for e in raw.entry if e.resource.resourceType == "Media")
        raw_photo = httpx.get(f"{ehr.fhir}/{media.content.url}", headers={
            "Authorization": fc.authorization, "Accept": "image/png"})
        assert raw_photo.status_code == 200 and raw_photo.headers["content-type"] == "image/png"
        as_json = httpx.get(f"{ehr.fhir}/{media.content.url}", headers={
            "Authorization": fc.authorization, "Accept": "application/fhir+json"}).json()
        assert base64.b64decode(as_json["data"]) == raw_photo.content

    with clinic.session() as s:
        events = s.scalars(select(AuditEvent).where(AuditEvent.actor_type == "client")).all()
        actions = {e.action for e in events}
        assert {"fhir.search", "fhir.read"} <= actions
        searches = [e for e in events if e.action == "fhir.search" and e.outcome == "success"]
        assert any(str(mine.patient_id) in e.detail.get("patients", []) for e in searches)
        assert all(e.actor_id == ehr.client_id for e in events)


def test_search_parameters(clinic):
    with clinic.session() as s:
        a = make_case(clinic, s, 611)
        b = make_case(clinic, s, 612, differential=[{"code": "psoriasis", "probability": 0.9},
                                                    {"code": "acne", "probability": 0.1}])
        sign(clinic, s, b, make_clinician(s))
    with serve_ehr(clinic) as ehr:
        h = ehr.headers()

        def ids(rtype: str, **params: str) -> list[str]:
            resp = httpx.get(f"{ehr.fhir}/{rtype}", params=params, headers=h)
            assert resp.status_code == 200, resp.text
            return [e["resource"]["id"] for e in resp.json().get("entry", []) if e["search"]["mode"] == "match"]

        assert ids("DiagnosticReport", status="final") == [str(b.id)]
        assert set(ids("DiagnosticReport", status="preliminary,final")) == {str(a.id), str(b.id)}
        assert len(ids("DiagnosticReport", category="http://snomed.info/sct|394582007")) == 2
        assert len(ids("DiagnosticReport", code="http://loinc.org|11488-4")) == 2
        assert ids("DiagnosticReport", code="http://loinc.org|00000-0") == []
        assert ids("DiagnosticReport", identifier=f"urn:skinbridge:case|{a.id}") == [str(a.id)]
        today = a.created_at.date().isoformat()
        assert len(ids("DiagnosticReport", date=today)) == 2
        assert len(ids("DiagnosticReport", date=f"ge{today}")) == 2
        assert ids("DiagnosticReport", date=f"lt{today}") == []
        assert ids("DiagnosticReport", issued=f"gt{today}T23:59:59Z") == []
        assert len(ids("DiagnosticReport", issued=f"le{today}T23:59:59Z")) == 2
        assert len(ids("DiagnosticReport", _lastUpdated=f"ge{today}")) == 2
        # reports sorted by issued, newest first (b was signed last)
        assert ids("DiagnosticReport", _sort="-issued") == [str(b.id), str(a.id)]
        psoriasis = condition("psoriasis")
        code = f"http://snomed.info/sct|{psoriasis.snomed}" if psoriasis.snomed else "psoriasis"
        obs = ids("Observation", code=code)
        assert len(obs) == 2  # the AI candidate and the dermatologist's (accepted) diagnosis
        assert len(ids("Observation", patient=str(a.patient_id))) == 3
        assert len(ids("Media", subject=f"Patient/{b.patient_id}")) == 1
        assert ids("Patient", identifier=f"urn:skinbridge:patient|{a.patient_id}") == [str(a.patient_id)]
        assert len(ids("Provenance", patient=str(b.patient_id))) == 2
        assert len(ids("Device")) == 1
        assert ids("DiagnosticReport", patient="not-a-uuid") == []


def _walk(ehr, headers, url):  # type: ignore[no-untyped-def]
    """Follow next links; yields each page's match ids."""
    while url:
        page = httpx.get(url, headers=headers).json()
        yield [e["resource"]["id"] for e in page.get("entry", [])]
        url = next((l["url"] for l in page["link"] if l["relation"] == "next"), None)


def test_paging_has_no_gaps_or_duplicates_while_new_reports_arrive(any_clinic):
    clinic = any_clinic
    with clinic.session() as s:
        first = [make_case(clinic, s, 700 + i) for i in range(7)]
    with serve_ehr(clinic) as ehr:
        h = ehr.headers()
        seen: list[str] = []
        pages = _walk(ehr, h, f"{ehr.fhir}/DiagnosticReport?_count=3")
        seen += next(pages)
        # while the EHR pages: two new reports, and one already-seen report is signed (new version)
        with clinic.session() as s:
            late = [make_case(clinic, s, 790 + i) for i in range(2)]
            sign(clinic, s, s.merge(first[0]), make_clinician(s))
        for page in pages:
            assert len(page) <= 3
            seen += page
        assert sorted(seen) == sorted(str(c.id) for c in first)  # the snapshot: all of it, once
        assert len(seen) == len(set(seen))
        # a new search sees the newcomers, and the signed report once, at its new version
        fresh = [i for page in _walk(ehr, h, f"{ehr.fhir}/DiagnosticReport?_count=4") for i in page]
        assert sorted(fresh) == sorted(str(c.id) for c in first + late)
        bundle = httpx.get(f"{ehr.fhir}/DiagnosticReport", params={"_id": str(first[0].id)}, headers=h).json()
        assert bundle["entry"][0]["resource"]["status"] == "final"
        # explicit sort pages through the same snapshot too
        sorted_ids = [i for page in _walk(ehr, h, f"{ehr.fhir}/DiagnosticReport?_count=2&_sort=-_lastUpdated")
                      for i in page]
        assert sorted(sorted_ids) == sorted(fresh) and len(sorted_ids) == len(set(sorted_ids))
        assert sorted_ids[0] == str(first[0].id)  # the signed report changed last

        # fhirpy follows the same next links
        fc = fhirpy_client(ehr)
        every = fc.resources("DiagnosticReport").limit(2).fetch_all()
        assert sorted(r.id for r in every) == sorted(fresh)


def test_conditional_read_vread_and_history(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 620)
        sign(clinic, s, case, make_clinician(s))
    with serve_ehr(clinic) as ehr:
        h = ehr.headers()
        url = f"{ehr.fhir}/DiagnosticReport/{case.id}"
        first = httpx.get(url, headers=h)
        assert first.status_code == 200 and first.headers["etag"] == 'W/"2"'
        assert first.json()["meta"]["versionId"] == "2" and "last-modified" in first.headers
        again = httpx.get(url, headers={**h, "If-None-Match": 'W/"2"'})
        assert again.status_code == 304 and again.content == b""
        stale = httpx.get(url, headers={**h, "If-None-Match": 'W/"1"'})
        assert stale.status_code == 200
        v1 = httpx.get(f"{url}/_history/1", headers=h)
        assert v1.status_code == 200 and v1.json()["status"] == "preliminary" and v1.headers["etag"] == 'W/"1"'
        assert httpx.get(f"{url}/_history/9", headers=h).status_code == 404
        history = httpx.get(f"{url}/_history", headers=h).json()
        assert history["type"] == "history"
        assert [e["resource"]["meta"]["versionId"] for e in history["entry"]] == ["2", "1"]
        assert [e["resource"]["status"] for e in history["entry"]] == ["final", "preliminary"]


def test_errors_are_operation_outcomes(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 630)
        gone = make_case(clinic, s, 631)
        patients.erase(clinic, s, gone.patient_id, Actor.system("test"))
        s.commit()
    with serve_ehr(clinic, scopes=["system/DiagnosticReport.rs"]) as ehr:
        h = ehr.headers(scope="system/DiagnosticReport.rs")
        dr = f"{ehr.fhir}/DiagnosticReport"

        def expect(status: int, resp: httpx.Response) -> dict:
            assert resp.status_code == status, resp.text
            assert resp.headers["content-type"].startswith("application/fhir+json")
            body = resp.json()
            assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["diagnostics"]
            return body

        expect(400, httpx.get(dr, params={"date": "yesterday"}, headers=h))
        expect(400, httpx.get(dr, params={"_count": "-1"}, headers=h))
        expect(400, httpx.get(dr, params={"colour": "red"}, headers={**h, "Prefer": "handling=strict"}))
        lenient = httpx.get(dr, params={"colour": "red"}, headers=h)
        assert lenient.status_code == 200 and "colour" not in lenient.json()["link"][0]["url"]
        expect(401, httpx.get(dr))
        expect(401, httpx.get(dr, headers={"Authorization": "Bearer nonsense"}))
        expect(403, httpx.get(f"{ehr.fhir}/Observation", headers=h))
        expect(404, httpx.get(f"{dr}/{'0' * 8}-0000-0000-0000-{'0' * 12}", headers=h))
        expect(404, httpx.get(f"{ehr.fhir}/Unicorn", headers=h))
        expect(406, httpx.get(f"{dr}/{case.id}", headers={**h, "Accept": "application/fhir+xml"}))
        expect(406, httpx.get(dr, params={"_format": "xml"}, headers=h))
        expect(410, httpx.get(f"{dr}/{gone.id}", headers=h))  # the patient was erased
        expect(415, httpx.post(f"{dr}/_search", json={"status": "final"}, headers=h))
        expect(422, httpx.get(dr, params={"_sort": "colour"}, headers=h))
        expect(422, httpx.get(dr, params={"_include": "DiagnosticReport:specimen"}, headers=h))
        expect(405, httpx.post(dr, json={"resourceType": "DiagnosticReport"}, headers=h))
        expect(405, httpx.put(f"{dr}/{case.id}", json={"resourceType": "DiagnosticReport"}, headers=h))
        expect(405, httpx.delete(f"{dr}/{case.id}", headers=h))
        # an erased patient's reports vanish from search; POST _search works with a form body
        found = httpx.post(f"{dr}/_search", data={"status": "preliminary"}, headers=h).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [str(case.id)]
        token = parse_qs(urlparse(found["link"][0]["url"]).query)
        assert token == {"status": ["preliminary"]}

    with clinic.session() as s:
        denied = s.scalars(select(AuditEvent).where(AuditEvent.action == "fhir.search",
                                                    AuditEvent.outcome == "denied")).all()
        assert [e.entity_type for e in denied] == ["Observation"]
        failed = s.scalars(select(AuditEvent).where(AuditEvent.action == "fhir.read",
                                                    AuditEvent.outcome == "failure")).all()
        assert {e.detail["status"] for e in failed} == {404, 410}


@pytest.mark.postgres
def test_publication_and_search_on_postgresql(pg_clinic):
    clinic = pg_clinic
    with clinic.session() as s:
        case = make_case(clinic, s, 640, name="Pg")
        sign(clinic, s, case, make_clinician(s))
    with serve_ehr(clinic) as ehr:
        fc = fhirpy_client(ehr)
        report = fc.resources("DiagnosticReport").search(patient=str(case.patient_id), status="final").get()
        assert report.resultsInterpreter[0].reference.startswith("Practitioner/")
        assert fc.resources("DiagnosticReport").search(_lastUpdated="ge2000-01-01").count() == 1


@pytest.mark.postgres
def test_concurrent_publishers_get_distinct_increasing_seqs(pg_clinic):
    import threading

    from clinic_db.models import FhirResource

    clinic = pg_clinic
    errors: list[BaseException] = []

    def publish_one(n: int) -> None:
        try:
            with clinic.session() as s:
                make_case(clinic, s, 900 + n)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish_one, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    with clinic.session() as s:
        rows = s.scalars(select(FhirResource)).all()
        seqs = [r.seq for r in rows]
        assert len(seqs) == len(set(seqs))
        reports = [r for r in rows if r.resource_type == "DiagnosticReport"]
        assert len(reports) == 4 and all(r.version_id == 1 for r in reports)
        # the shared Organization was written once, not once per publisher
        assert len([r for r in rows if r.resource_type == "Organization"]) == 1
