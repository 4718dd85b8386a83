"""Publication of cases as FHIR R4 resources: versions, signing, amendment, provenance, validity,
encryption at rest and erasure."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import uuid
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest
from fhir.resources.R4B import get_fhir_model_class
from sqlalchemy import select

from clinic_db import patients
from clinic_db.audit import Actor
from clinic_db.keys import KeyUnavailable
from clinic_db.models import Case, FhirResource
from fhir import mapping
from fhir.publish import publish_case, retract_patient, row_json
from fhir.terms import condition
from tests.test_fhir_support import make_case, make_clinician, sign
from fhir.checks import check_resources
from tests.conftest import service_missing

JS_DIR = Path(__file__).parent / "js"


def current(clinic, s, rtype: str, rid: str) -> tuple[FhirResource, dict]:  # type: ignore[no-untyped-def]
    row = s.scalar(select(FhirResource).where(FhirResource.resource_type == rtype, FhirResource.id == rid,
                                              FhirResource.is_current.is_(True)))
    assert row is not None, f"{rtype}/{rid} not published"
    return row, row_json(clinic, s, row)


def all_current(clinic, s) -> list[dict]:  # type: ignore[no-untyped-def]
    rows = s.scalars(select(FhirResource).where(FhirResource.is_current.is_(True)).order_by(FhirResource.seq))
    return [row_json(clinic, s, r) for r in rows]


def pdf_text(pdf: bytes) -> str:
    """The text drawn in a PDF made by fpdf2 (its content streams are zlib-compressed)."""
    out = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            out.append(zlib.decompress(stream).decode("latin-1"))
        except zlib.error:
            continue  # an image
    return "".join(out)


def test_report_is_preliminary_until_signed_then_final_then_amended(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 501, name="Erika Muster")
        cid = str(case.id)
        row, report = current(clinic, s, "DiagnosticReport", cid)
        assert (row.version_id, report["status"], row.status) == (1, "preliminary", "preliminary")
        assert "not a diagnosis" in report["conclusion"] and "Melanoma" in report["conclusion"]
        assert "resultsInterpreter" not in report
        assert report["performer"] == [{"reference": "Organization/skinbridge"}]
        assert report["meta"]["security"][0]["code"] == "AIAST"
        ai_obs = [current(clinic, s, "Observation", r["reference"].split("/")[1])[1] for r in report["result"]]
        assert [o["valueQuantity"]["value"] for o in ai_obs] == [0.71, 0.2, 0.09]
        assert all(o["status"] == "preliminary" and o["meta"]["security"][0]["code"] == "AIAST" for o in ai_obs)
        melanoma = condition("melanoma")
        assert ai_obs[0]["code"]["coding"][0] == {"system": "http://snomed.info/sct", "code": melanoma.snomed,
                                                  "display": melanoma.display}
        assert ai_obs[0]["device"]["reference"].startswith("Device/ai-")
        ai_prov = s.scalars(select(FhirResource).where(FhirResource.resource_type == "Provenance")).all()
        assert len(ai_prov) == 1
        prov = row_json(clinic, s, ai_prov[0])
        assert prov["target"][0] == {"reference": f"DiagnosticReport/{cid}/_history/1"}
        assert [a["who"]["reference"].split("/")[0] for a in prov["agent"]] == ["Device"]

        # publishing again without a change writes nothing
        assert publish_case(clinic, s, cid).changed == []

        doctor = make_clinician(s)
        task = sign(clinic, s, case, doctor, note="Benign-looking? No: please see us within 2 weeks.")
        row, report = current(clinic, s, "DiagnosticReport", cid)
        assert (row.version_id, report["status"]) == (2, "final")
        assert report["resultsInterpreter"] == [{"reference": f"Practitioner/{doctor.id}"}]
        assert "Dr. Anna Weiss" in report["conclusion"] and "2 weeks" in report["conclusion"]
        derm = current(clinic, s, "Observation", report["result"][0]["reference"].split("/")[1])[1]
        assert derm["status"] == "final" and derm["performer"] == [{"reference": f"Practitioner/{doctor.id}"}]
        assert "meta" not in derm or "security" not in derm["meta"]  # the dermatologist's own finding
        _, sign_prov = current(clinic, s, "Provenance", str(task.id))
        assert sign_prov["target"][0] == {"reference": f"DiagnosticReport/{cid}/_history/2"}
        kinds = {a["who"]["reference"].split("/")[0]: a["type"]["coding"][0]["code"] for a in sign_prov["agent"]}
        assert kinds == {"Practitioner": "verifier", "Device": "author"}
        assert s.get(Case, case.id).report_version == 2

        amend = sign(clinic, s, case, doctor, decision="amend", condition_code="nevus", note="Histology: nevus.")
        row, report = current(clinic, s, "DiagnosticReport", cid)
        assert (row.version_id, report["status"]) == (3, "amended")
        assert report["conclusionCode"][0]["coding"][0]["code"] == condition("nevus").snomed
        _, amend_prov = current(clinic, s, "Provenance", str(amend.id))
        assert amend_prov["target"][0] == {"reference": f"DiagnosticReport/{cid}/_history/3"}
        assert amend_prov["activity"]["text"] == "amended by dermatologist"
        # every version stays readable; earlier ones are no longer current
        versions = s.scalars(select(FhirResource).where(FhirResource.resource_type == "DiagnosticReport",
                                                        FhirResource.id == cid).order_by(FhirResource.version_id))
        assert [(v.version_id, v.status, v.is_current) for v in versions] == [
            (1, "preliminary", False), (2, "final", False), (3, "amended", True)]
        seqs = s.scalars(select(FhirResource.seq).order_by(FhirResource.seq)).all()
        assert len(seqs) == len(set(seqs))


def test_photos_pdf_and_attachment_hashes(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 502, photos=2)
        _, report = current(clinic, s, "DiagnosticReport", str(case.id))
        assert len(report["media"]) == 2
        for link in report["media"]:
            _, media = current(clinic, s, "Media", link["link"]["reference"].split("/")[1])
            _, photo = current(clinic, s, "Binary", media["content"]["url"].split("/")[1])
            data = base64.b64decode(photo["data"])
            assert media["content"]["hash"] == base64.b64encode(hashlib.sha1(data).digest()).decode()
            assert media["content"]["size"] == len(data) and data.startswith(b"\x89PNG")
            assert media["bodySite"] == {"text": "left forearm"}
        form = report["presentedForm"][0]
        _, pdf_res = current(clinic, s, "Binary", form["url"].split("/")[1])
        pdf = base64.b64decode(pdf_res["data"])
        assert pdf.startswith(b"%PDF") and form["contentType"] == "application/pdf"
        assert form["hash"] == base64.b64encode(hashlib.sha1(pdf).digest()).decode()
        text = pdf_text(pdf)
        assert "PRELIMINARY" in text and "not a diagnosis" in text and "NOT the patient" in text
        assert pdf.count(b"/Subtype /Image") >= 3  # two photos and one AI illustration


def test_sealed_at_rest_and_gone_after_erasure(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 503, name="Zyxwvut Secretname")
        patient_rows = s.scalars(select(FhirResource).where(FhirResource.patient_id == case.patient_id)).all()
        assert patient_rows and all(r.data is None and r.data_enc for r in patient_rows)
        assert all(b"Secretname" not in r.data_enc for r in patient_rows)
        _, pat = current(clinic, s, "Patient", str(case.patient_id))
        assert pat["name"] == [{"use": "usual", "text": "Zyxwvut Secretname"}]
        assert pat["identifier"] == [{"system": "urn:skinbridge:patient", "value": str(case.patient_id)}]
        org = s.scalar(select(FhirResource).where(FhirResource.resource_type == "Organization"))
        assert org is not None and org.data["name"] == mapping.ORGANIZATION_NAME
        # a sealed version cannot be moved to another version slot
        dr = s.scalar(select(FhirResource).where(FhirResource.resource_type == "DiagnosticReport"))
        with pytest.raises(Exception):
            clinic.vault.open_for(s, case.patient_id, "fhir_resources", f"DiagnosticReport/{dr.id}/2", "data",
                                  dr.data_enc)

        patients.erase(clinic, s, case.patient_id, Actor.system("test"))  # retracts the published rows too
        s.commit()
        s.expire_all()
        retracted = s.scalars(select(FhirResource).where(FhirResource.patient_id == case.patient_id)).all()
        assert len(retracted) == len(patient_rows) and all(r.deleted for r in retracted)
        assert retract_patient(s, case.patient_id) == 0  # nothing left to retract
        with pytest.raises(KeyUnavailable):
            row_json(clinic, s, dr)


def test_nameless_patient_has_no_name_and_unknown_condition_keeps_local_code(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 504, differential=[{"code": "zz_unknown_rash", "probability": 0.6},
                                                       {"code": "psoriasis", "probability": 0.4}])
        _, pat = current(clinic, s, "Patient", str(case.patient_id))
        assert "name" not in pat
        _, report = current(clinic, s, "DiagnosticReport", str(case.id))
        first = current(clinic, s, "Observation", report["result"][0]["reference"].split("/")[1])[1]
        assert first["code"]["coding"][0] == {"system": "urn:skinbridge:condition", "code": "zz_unknown_rash",
                                              "display": "Zz unknown rash"}


def _validate_all_with_fhir_resources(resources: list[dict]) -> None:
    for res in resources:
        get_fhir_model_class(res["resourceType"]).model_validate(res)


def test_every_resource_validates_with_fhir_resources_and_offline_node_validators(clinic, tmp_path):
    with clinic.session() as s:
        case = make_case(clinic, s, 505, name="Eva")
        doctor = make_clinician(s)
        sign(clinic, s, case, doctor)
        sign(clinic, s, case, doctor, decision="amend", condition_code="basal_cell_carcinoma")
        resources = all_current(clinic, s)
        # older versions too: the preliminary report must be valid as well
        old = s.scalars(select(FhirResource).where(FhirResource.is_current.is_(False))).all()
        resources += [row_json(clinic, s, r) for r in old]
    resources.append(mapping.audit_event(
        event_id=str(uuid.uuid4()), recorded=datetime.now(timezone.utc), interaction="read", client_id="ehr-1",
        server_base="http://127.0.0.1/fhir", outcome_ok=True, patient_ids=[str(case.patient_id)],
        entity=f"DiagnosticReport/{case.id}"))
    resources.append(mapping.audit_event(
        event_id=str(uuid.uuid4()), recorded=datetime.now(timezone.utc), interaction="search-type",
        client_id="ehr-1", server_base="http://127.0.0.1/fhir", outcome_ok=True, patient_ids=[],
        query="patient=x&status=final"))
    types = {r["resourceType"] for r in resources}
    assert types >= {"Patient", "DiagnosticReport", "Observation", "Media", "Binary", "Device", "Provenance",
                     "Practitioner", "Organization", "AuditEvent"}
    _validate_all_with_fhir_resources(resources)
    problems = check_resources(resources)  # the project's own code and reference-target checks
    assert problems == [], "\n".join(map(str, problems))

    node = shutil.which("node")
    if node is None or not (JS_DIR / "node_modules").is_dir():
        service_missing("the offline FHIR validators", "node or tests/js/node_modules missing (make installs them)")
    bundle = tmp_path / "bundle.json"
    bundle.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                  "entry": [{"resource": r} for r in resources]}))
    proc = subprocess.run([node, str(JS_DIR / "validate.js"), str(bundle)], capture_output=True, text=True,
                          timeout=120)
    report = json.loads(proc.stdout)
    assert report["checked"] == len(resources)
    assert proc.returncode == 0, json.dumps([r for r in report["report"] if not r["ok"]], indent=1)
