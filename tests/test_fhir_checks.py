"""fhir.checks: every resource we publish has known, well-formed codes and references that point at
allowed target types and resolve; and the check catches each kind of mistake."""

from __future__ import annotations

import copy
import uuid
from datetime import datetime, timezone

import httpx
import pytest

from fhir import mapping
from fhir.checks import (
    check_published,
    check_resource,
    check_resources,
    loinc_ok,
    published_resources,
)
from inference.vocabulary import load_vocabulary, valid_concept_sctid
from tests.test_fhir_support import make_case, make_clinician, serve_ehr, sign


def codes(problems) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    return sorted((p.code, p.path) for p in problems)


def test_loinc_check_digit():
    assert loinc_ok("11488-4")  # Consult note
    assert loinc_ok("8302-2") and loinc_ok("29463-7") and loinc_ok("2160-0")
    assert not loinc_ok("11488-5")  # wrong check digit
    assert not loinc_ok("14188-4")  # transposed digits
    assert not loinc_ok("11488") and not loinc_ok("LP1234-5") and not loinc_ok("011488-4")


def test_published_case_passes_through_preliminary_signed_and_amended(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 801, name="Eva Beispiel", photos=2)
        # an unknown AI label keeps a local code (not SNOMED) and must not count as a problem
        make_case(clinic, s, 802, differential=[{"code": "zz_unknown_rash", "probability": 0.6},
                                                {"code": "psoriasis", "probability": 0.4}])
        preliminary = published_resources(clinic, s)
        assert {r["resourceType"] for r in preliminary} >= {"DiagnosticReport", "Observation", "Media", "Binary",
                                                             "Patient", "Device", "Provenance", "Organization"}
        assert check_published(clinic, s) == []

        doctor = make_clinician(s)
        sign(clinic, s, case, doctor, note="Please see us within 2 weeks.")
        assert check_published(clinic, s) == []

        sign(clinic, s, case, doctor, decision="amend", condition_code="basal_cell_carcinoma")
        everything = published_resources(clinic, s)
        assert check_resources(everything) == []
        # the amended report and its provenance chain really are in the checked set
        reports = [r for r in everything if r["resourceType"] == "DiagnosticReport" and r["id"] == str(case.id)]
        assert [r["status"] for r in reports] == ["preliminary", "final", "amended"]
        provenance_targets = {t["reference"] for r in everything if r["resourceType"] == "Provenance"
                              for t in r["target"]}
        assert f"DiagnosticReport/{case.id}/_history/1" in provenance_targets
        assert f"DiagnosticReport/{case.id}/_history/3" in provenance_targets
        patient_id = str(case.patient_id)

    # IHE BALP audit events we render are checked too (their entity.what may name any resource)
    event = mapping.audit_event(event_id=str(uuid.uuid4()), recorded=datetime.now(timezone.utc), interaction="read",
                                client_id="ehr-1", server_base="http://127.0.0.1/fhir", outcome_ok=True,
                                patient_ids=[patient_id], entity=f"DiagnosticReport/{case.id}")
    assert check_resources(everything + [event]) == []


def test_search_bundle_from_the_api_passes(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 811)
        sign(clinic, s, case, make_clinician(s))
    with serve_ehr(clinic) as ehr:
        params = [("_id", str(case.id))] + [("_include", f"DiagnosticReport:{p}") for p in
                                             ("result", "media", "subject", "performer", "results-interpreter")]
        bundle = httpx.get(ehr.fhir + "/DiagnosticReport", params=params, headers=ehr.headers()).json()
    assert len(bundle["entry"]) >= 6
    assert check_resource(bundle) == []
    # what a bundle holds resolves within it, except what it was not asked to include
    dangling = {p.message.split()[0].split("/")[0] for p in check_resources([bundle])}
    assert dangling == {"Binary", "Device"}  # the PDF and the AI model: not _include targets of the report


@pytest.fixture
def published(clinic) -> list[dict]:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        case = make_case(clinic, s, 821)
        sign(clinic, s, case, make_clinician(s))
        resources = published_resources(clinic, s)
    assert check_resources(resources) == []
    return resources


def _current(resources: list[dict], rtype: str) -> dict:
    return [r for r in resources if r["resourceType"] == rtype][-1]


def test_catches_a_wrong_reference_target_type(published):
    report = copy.deepcopy(_current(published, "DiagnosticReport"))
    device_id = _current(published, "Device")["id"]
    report["performer"] = [{"reference": f"Device/{device_id}"}]  # R4 does not allow a Device as performer
    report["subject"] = {"reference": f"Practitioner/{_current(published, 'Practitioner')['id']}"}
    assert codes(check_resource(report)) == [("reference-type", "DiagnosticReport.performer[0]"),
                                             ("reference-type", "DiagnosticReport.subject")]
    obs = copy.deepcopy(_current(published, "Observation"))
    obs["device"] = {"reference": f"Organization/{mapping.ORGANIZATION_ID}"}
    problems = check_resource(obs)
    assert codes(problems) == [("reference-type", "Observation.device")]
    assert "may not point at Organization" in problems[0].message


def test_catches_unknown_snomed_bad_check_digits_and_wrong_display(published):
    obs = copy.deepcopy(_current(published, "Observation"))
    assert valid_concept_sctid("22298006")  # a real concept (myocardial infarction), but not one of ours
    obs["code"]["coding"][0]["code"] = "22298006"
    assert codes(check_resource(obs)) == [("snomed-unknown", "Observation.code.coding[0]")]

    melanoma = load_vocabulary().get("melanoma").snomed
    obs["code"]["coding"][0]["code"] = melanoma[:-1] + str((int(melanoma[-1]) + 1) % 10)  # one-digit typo
    assert codes(check_resource(obs)) == [("snomed-check-digit", "Observation.code.coding[0]")]

    obs["code"]["coding"][0].update(code=melanoma, display="Benign melanocytic nevus")
    assert codes(check_resource(obs)) == [("snomed-display", "Observation.code.coding[0]")]

    report = copy.deepcopy(_current(published, "DiagnosticReport"))
    report["code"]["coding"][0]["code"] = "11488-5"
    report["category"][0]["coding"][0]["code"] = "11488-4"  # a LOINC code in a SNOMED coding
    assert codes(check_resource(report)) == [("loinc-check-digit", "DiagnosticReport.code.coding[0]"),
                                             ("snomed-check-digit", "DiagnosticReport.category[0].coding[0]")]


def test_catches_dangling_references(published):
    media_ids = {r["id"] for r in published if r["resourceType"] == "Media"}
    without_media = [r for r in published if r["resourceType"] != "Media"]
    problems = check_resources(without_media)
    assert problems and {p.code for p in problems} == {"reference-dangling"}
    assert {p.message.split()[0] for p in problems} == {f"Media/{m}" for m in media_ids}
    holders = {p.resource.split("/")[0] for p in problems}
    assert holders >= {"DiagnosticReport", "Observation", "Provenance"}  # report media, derivedFrom, entity

    report = copy.deepcopy(_current(published, "DiagnosticReport"))
    report["result"].append({"reference": "Observation/no-such-observation"})
    report["presentedForm"][0]["url"] = "Binary/no-such-pdf"
    assert codes(check_resources(published + [report])) == [
        ("reference-dangling", "DiagnosticReport.presentedForm[0]"),
        ("reference-dangling", f"DiagnosticReport.result[{len(report['result']) - 1}]"),
    ]
    prov = copy.deepcopy(_current(published, "Provenance"))
    prov["target"][0]["reference"] = prov["target"][0]["reference"].rsplit("/", 1)[0] + "/99"
    assert codes(check_resources(published + [prov])) == [("reference-dangling", "Provenance.target[0]")]


def test_catches_unruled_elements_and_malformed_references(published):
    obs = copy.deepcopy(_current(published, "Observation"))
    obs["focus"] = [{"reference": f"Patient/{obs['subject']['reference'].split('/')[1]}"}]
    obs["subject"] = {"reference": "not a reference"}
    assert codes(check_resource(obs)) == [("reference-element", "Observation.focus[0]"),
                                          ("reference-format", "Observation.subject")]
    media = copy.deepcopy(_current(published, "Media"))
    media["content"]["url"] = "https://elsewhere.example/photo.png"
    assert codes(check_resource(media)) == [("reference-type", "Media.content")]
