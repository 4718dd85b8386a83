"""Map a case (already decrypted into plain dataclasses) to FHIR R4 (4.0.1) resources.

Pure functions: no database, no keys. :mod:`fhir.publish` gathers a :class:`CaseData` from the DB
and stores what these functions return. Every resource is checked against the ``fhir.resources.R4B``
models (R4B shares R4's shape for every resource used here) before it leaves this module.

AI output is never presented as a diagnosis: AI Observations stay ``preliminary`` and carry the
HL7 AIAST security label; only a dermatologist's decision makes the DiagnosticReport ``final``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from bot.render import action_text
from fhir import terms
from fhir.terms import AIAST, condition

ORGANIZATION_ID = "skinbridge"
ORGANIZATION_NAME = "SkinBridge Teledermatology"
DISCLAIMER = (
    "Preliminary AI assessment - not a diagnosis. It must be reviewed by a dermatologist "
    "before any clinical decision."
)
SIGNING_DECISIONS = ("accept", "amend")


# --- inputs ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PhotoData:
    id: str
    mime: str
    data: bytes
    width: int
    height: int
    taken_at: datetime


@dataclass(frozen=True)
class AIData:
    id: str
    engine: str
    model_id: str
    model_version: str
    weights_sha256: str
    differential: list[dict[str, Any]]  # [{code, probability}] sorted desc
    description: str | None
    flags: list[str]
    created_at: datetime


@dataclass(frozen=True)
class ClinicianData:
    id: str
    username: str
    display_name: str
    active: bool = True


@dataclass(frozen=True)
class DecisionData:
    task_id: str
    decision: str  # accept | amend
    condition_code: str | None
    urgency: str | None
    recommendation: str | None
    note: str | None
    clinician: ClinicianData
    decided_at: datetime


@dataclass(frozen=True)
class ExplanationData:
    condition_code: str
    png: bytes


@dataclass(frozen=True)
class CaseData:
    case_id: str
    patient_id: str
    patient_name: str | None
    patient_language: str
    patient_active: bool
    status: str  # clinic_db.states.CaseStatus value
    urgency: str
    created_at: datetime
    body_site: str | None = None
    history: dict[str, Any] = field(default_factory=dict)  # the patient's answers (clinic_db.cases.history)
    photos: list[PhotoData] = field(default_factory=list)
    ai_results: list[AIData] = field(default_factory=list)  # oldest first
    decisions: list[DecisionData] = field(default_factory=list)  # signing decisions, oldest first
    explanations: list[ExplanationData] = field(default_factory=list)

    @property
    def latest_ai(self) -> list[AIData]:
        """The newest result of each engine (a re-run replaces the engine's older output)."""
        newest: dict[str, AIData] = {}
        for ai in self.ai_results:
            newest[ai.engine] = ai
        return sorted(newest.values(), key=lambda a: a.engine)

    @property
    def decision(self) -> DecisionData | None:
        return self.decisions[-1] if self.decisions else None


# --- helpers ---------------------------------------------------------------------------------
def instant(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def ref(resource_type: str, rid: str, version: int | None = None) -> dict[str, str]:
    return {"reference": f"{resource_type}/{rid}" + (f"/_history/{version}" if version else "")}


def sha1_b64(data: bytes) -> str:
    """R4 Attachment.hash: base64 of the SHA-1 digest."""
    return base64.b64encode(hashlib.sha1(data).digest()).decode("ascii")  # noqa: S324 - mandated by FHIR


def validate(resource: dict[str, Any]) -> dict[str, Any]:
    """Raise if ``resource`` is not a valid R4 resource; return it unchanged."""
    rtype = resource["resourceType"]
    module = importlib.import_module(f"fhir.resources.R4B.{rtype.lower()}")
    getattr(module, rtype).model_validate(resource)
    return resource


def device_id(ai: AIData) -> str:
    digest = hashlib.sha256(f"{ai.model_id}|{ai.model_version}|{ai.weights_sha256}".encode()).hexdigest()
    return f"ai-{digest[:32]}"


def report_status(case: CaseData) -> str:
    if case.status == "withdrawn":
        return "cancelled"
    if case.status in ("final", "amended") and case.decision is not None:
        return case.status
    return "preliminary"


def _security() -> dict[str, Any]:
    return {"security": [dict(AIAST)]}


# --- resources -------------------------------------------------------------------------------
def organization() -> dict[str, Any]:
    return validate({
        "resourceType": "Organization",
        "id": ORGANIZATION_ID,
        "active": True,
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type",
                              "code": "prov", "display": "Healthcare Provider"}]}],
        "name": ORGANIZATION_NAME,
    })


def patient(case: CaseData) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Patient",
        "id": case.patient_id,
        # pseudonymous: the only identifier is our random UUID (never the Telegram id)
        "identifier": [{"system": terms.PATIENT_SYSTEM, "value": case.patient_id}],
        "active": case.patient_active,
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": case.patient_language}]},
                           "preferred": True}],
    }
    if case.patient_name:
        res["name"] = [{"use": "usual", "text": case.patient_name}]
    return validate(res)


def practitioner(clinician: ClinicianData) -> dict[str, Any]:
    return validate({
        "resourceType": "Practitioner",
        "id": clinician.id,
        "identifier": [{"system": terms.CLINICIAN_SYSTEM, "value": clinician.username}],
        "active": clinician.active,
        "name": [{"use": "official", "text": clinician.display_name}],
        "qualification": [{"code": {"coding": [dict(terms.DERMATOLOGY)], "text": "Dermatologist"}}],
    })


def device(ai: AIData) -> dict[str, Any]:
    kind = "AI skin-lesion image classifier" if ai.engine == "classifier" else "AI vision-language model"
    return validate({
        "resourceType": "Device",
        "id": device_id(ai),
        "meta": _security(),
        "identifier": [{"system": terms.MODEL_SYSTEM, "value": f"{ai.model_id}@{ai.model_version}"}],
        "status": "active",
        "manufacturer": "SkinBridge",
        "deviceName": [{"name": ai.model_id, "type": "model-name"}],
        "type": {"text": kind},
        "version": [
            {"type": {"text": "model version"}, "value": ai.model_version},
            {"type": {"text": "weights sha256"}, "value": ai.weights_sha256},
        ],
        "owner": ref("Organization", ORGANIZATION_ID),
        "note": [{"text": "Decision support only: its output is preliminary until a dermatologist reviews it."}],
    })


def ai_observation_id(ai: AIData, rank: int) -> str:
    return f"{ai.id}-{rank}"


def ai_observations(case: CaseData, ai: AIData) -> list[dict[str, Any]]:
    """One Observation per candidate diagnosis: code = the condition, value = its probability."""
    media_refs = [ref("Media", p.id) for p in case.photos]
    out = []
    for rank, cand in enumerate(ai.differential, start=1):
        term = condition(cand["code"])
        res: dict[str, Any] = {
            "resourceType": "Observation",
            "id": ai_observation_id(ai, rank),
            "meta": _security(),
            "status": "preliminary",  # AI output is never final
            "category": [{"coding": [{"system": terms.OBS_CATEGORY, "code": "exam", "display": "Exam"}]}],
            "code": term.concept(),
            "subject": ref("Patient", case.patient_id),
            "effectiveDateTime": instant(case.photos[0].taken_at if case.photos else case.created_at),
            "issued": instant(ai.created_at),
            "valueQuantity": {"value": round(float(cand["probability"]), 6), "unit": "probability",
                              "system": terms.UCUM, "code": "1"},
            "method": {"text": f"AI image analysis ({ai.engine}), candidate rank {rank}"},
            "device": ref("Device", device_id(ai)),
            "note": [{"text": DISCLAIMER}],
        }
        if media_refs:
            res["derivedFrom"] = media_refs
        out.append(validate(res))
    return out


def clinician_observation_id(decision: DecisionData) -> str:
    return f"{decision.task_id}-dx"


def clinician_observation(case: CaseData, decision: DecisionData) -> dict[str, Any] | None:
    code = decision_condition(case, decision)
    if code is None:
        return None
    return validate({
        "resourceType": "Observation",
        "id": clinician_observation_id(decision),
        "status": "final",
        "category": [{"coding": [{"system": terms.OBS_CATEGORY, "code": "exam", "display": "Exam"}]}],
        "code": condition(code).concept(),
        "subject": ref("Patient", case.patient_id),
        "effectiveDateTime": instant(case.photos[0].taken_at if case.photos else case.created_at),
        "issued": instant(decision.decided_at),
        "performer": [ref("Practitioner", decision.clinician.id)],
        "valueCodeableConcept": {"coding": [dict(terms.PRESENT)]},
        "method": {"text": "Dermatologist review of patient photos (teledermatology)"},
    })


def decision_condition(case: CaseData, decision: DecisionData) -> str | None:
    """The condition the dermatologist signed: their own code, or the AI's top one they accepted."""
    if decision.condition_code:
        return decision.condition_code
    if decision.decision == "accept":
        top = _top_candidate(case)
        return top["code"] if top else None
    return None


def _top_candidate(case: CaseData) -> dict[str, Any] | None:
    cands = [c for ai in case.latest_ai for c in ai.differential]
    return max(cands, key=lambda c: c["probability"]) if cands else None


def media(case: CaseData, photo: PhotoData, index: int) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Media",
        "id": photo.id,
        "status": "completed",
        "type": {"coding": [{"system": terms.MEDIA_TYPE, "code": "image", "display": "Image"}]},
        "subject": ref("Patient", case.patient_id),
        "createdDateTime": instant(photo.taken_at),
        "width": photo.width,
        "height": photo.height,
        "content": {
            "contentType": photo.mime,
            "url": f"Binary/{photo.id}",
            "size": len(photo.data),
            "hash": sha1_b64(photo.data),
            "title": f"Skin photo {index}",
        },
    }
    if case.body_site:
        res["bodySite"] = {"text": case.body_site}
    return validate(res)


def binary(binary_id: str, content_type: str, data: bytes, case_id: str) -> dict[str, Any]:
    return validate({
        "resourceType": "Binary",
        "id": binary_id,
        "contentType": content_type,
        "securityContext": ref("DiagnosticReport", case_id),
        "data": base64.b64encode(data).decode("ascii"),
    })


def report_binary_id(case: CaseData) -> str:
    return f"{case.case_id}-report"


def conclusion(case: CaseData) -> tuple[str, list[dict[str, Any]]]:
    """The report's conclusion text and codes: the dermatologist's once signed, else the AI's (preliminary)."""
    decision = case.decision if report_status(case) in ("final", "amended") else None
    if decision is not None:
        code = decision_condition(case, decision)
        parts = [f"Dermatologist's assessment ({decision.clinician.display_name}):"]
        parts.append(f"{condition(code).name}." if code else "see note.")
        if decision.urgency:
            parts.append(f"Urgency: {decision.urgency}.")
        if decision.recommendation:  # the same words the patient reads (bot.render), never the stored code
            parts.append(f"Recommendation: {action_text('en', decision.urgency, decision.recommendation)}")
        if decision.note:
            parts.append(f"Note: {decision.note}")
        return " ".join(parts), ([condition(code).concept()] if code else [])
    top = _top_candidate(case)
    if top is None:
        return "Awaiting dermatologist review. " + DISCLAIMER, []
    term = condition(top["code"])
    text = f"{DISCLAIMER} Most likely candidate: {term.name} ({float(top['probability']) * 100:.0f}%)."
    return text, [term.concept()]


def diagnostic_report(
    case: CaseData,
    *,
    result_ids: list[str],
    pdf: bytes,
) -> dict[str, Any]:
    status = report_status(case)
    text, codes = conclusion(case)
    issued_at = max([case.created_at] + [a.created_at for a in case.ai_results]
                    + [d.decided_at for d in case.decisions])
    res: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": case.case_id,
        "meta": _security(),
        "identifier": [{"system": terms.CASE_SYSTEM, "value": case.case_id}],
        "status": status,
        "category": [{"coding": [dict(terms.DERMATOLOGY)]}],
        "code": {"coding": [dict(terms.REPORT_CODE)], "text": "Teledermatology report"},
        "subject": ref("Patient", case.patient_id),
        "effectiveDateTime": instant(case.photos[0].taken_at if case.photos else case.created_at),
        "issued": instant(issued_at),
        "performer": [ref("Organization", ORGANIZATION_ID)],  # R4: performer cannot be a Device
        "conclusion": text,
        "presentedForm": [{
            "contentType": "application/pdf",
            "language": case.patient_language,
            "url": f"Binary/{report_binary_id(case)}",
            "size": len(pdf),
            "hash": sha1_b64(pdf),
            "title": "Teledermatology report" + (" (PRELIMINARY)" if status == "preliminary" else ""),
        }],
    }
    if result_ids:
        res["result"] = [ref("Observation", rid) for rid in result_ids]
    if case.photos:
        res["media"] = [{"comment": f"Skin photo {i}", "link": ref("Media", p.id)}
                        for i, p in enumerate(case.photos, start=1)]
    if codes:
        res["conclusionCode"] = codes
    if status in ("final", "amended") and case.decision is not None:
        res["resultsInterpreter"] = [ref("Practitioner", case.decision.clinician.id)]
    return validate(res)


def ai_provenance(case: CaseData, ai: AIData, report_version: int) -> dict[str, Any]:
    """Who produced the AI part: the model (Device) on behalf of the operating Organization."""
    targets = [ref("DiagnosticReport", case.case_id, report_version)]
    targets += [ref("Observation", ai_observation_id(ai, r)) for r in range(1, len(ai.differential) + 1)]
    return validate({
        "resourceType": "Provenance",
        "id": ai.id,
        "meta": _security(),
        "target": targets,
        "recorded": instant(ai.created_at),
        "activity": {"coding": [{"system": terms.DATA_OPERATION, "code": "CREATE", "display": "create"}],
                     "text": "AI pre-assessment"},
        "agent": [{
            "type": {"coding": [{"system": terms.PARTICIPANT_TYPE, "code": "author", "display": "Author"}]},
            "who": ref("Device", device_id(ai)),
            "onBehalfOf": ref("Organization", ORGANIZATION_ID),
        }],
        "entity": [{"role": "source", "what": ref("Media", p.id)} for p in case.photos],
    })


def decision_provenance(case: CaseData, decision: DecisionData, report_version: int, first: bool) -> dict[str, Any]:
    """A dermatologist's signature (first decision) or amendment of the report the AI drafted."""
    targets = [ref("DiagnosticReport", case.case_id, report_version)]
    if decision_condition(case, decision):
        targets.append(ref("Observation", clinician_observation_id(decision)))
    agents: list[dict[str, Any]] = [{
        "type": {"coding": [{"system": terms.PARTICIPANT_TYPE, "code": "verifier" if first else "author",
                             "display": "Verifier" if first else "Author"}]},
        "who": ref("Practitioner", decision.clinician.id),
        "onBehalfOf": ref("Organization", ORGANIZATION_ID),
    }]
    agents += [{
        "type": {"coding": [{"system": terms.PARTICIPANT_TYPE, "code": "author", "display": "Author"}]},
        "who": ref("Device", device_id(ai)),
        "onBehalfOf": ref("Organization", ORGANIZATION_ID),
    } for ai in case.latest_ai]
    return validate({
        "resourceType": "Provenance",
        "id": decision.task_id,
        "meta": _security(),
        "target": targets,
        "recorded": instant(decision.decided_at),
        "activity": {"coding": [{"system": terms.DATA_OPERATION, "code": "UPDATE", "display": "revise"}],
                     "text": "signed by dermatologist" if first else "amended by dermatologist"},
        "agent": agents,
    })


# --- audit (IHE Basic Audit Log Patterns) ----------------------------------------------------
BALP_READ = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
BALP_QUERY = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientQuery"


def audit_event(
    *,
    event_id: str,
    recorded: datetime,
    interaction: str,  # read | vread | history-instance | search-type
    client_id: str,
    server_base: str,
    outcome_ok: bool,
    patient_ids: list[str],
    entity: str | None = None,  # "Type/id" for reads
    query: str | None = None,  # the query string for searches
) -> dict[str, Any]:
    """A FHIR AuditEvent in the IHE BALP shape for a RESTful read or search by an EHR client."""
    is_search = interaction.startswith("search")
    entities: list[dict[str, Any]] = [{
        "what": ref("Patient", pid),
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1",
                 "display": "Person"},
        "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
    } for pid in patient_ids]
    if entity:
        entities.append({
            "what": {"reference": entity},
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                     "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4",
                     "display": "Domain Resource"},
        })
    if query is not None:
        entities.append({
            "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2",
                     "display": "System Object"},
            "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
            "query": base64.b64encode(query.encode()).decode("ascii"),
        })
    return validate({
        "resourceType": "AuditEvent",
        "id": event_id,
        "meta": {"profile": [BALP_QUERY if is_search else BALP_READ]},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest",
                 "display": "RESTful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction",
                     "code": "search-type" if is_search else interaction, "display": interaction}],
        "action": "E" if is_search else "R",
        "recorded": instant(recorded),
        "outcome": "0" if outcome_ok else "4",
        "agent": [
            {"type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153",
                                  "display": "Source Role ID"}]},
             "who": {"identifier": {"system": "urn:skinbridge:fhir-client", "value": client_id}},
             "requestor": True},
            {"type": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110152",
                                  "display": "Destination Role ID"}]},
             "who": {"display": "SkinBridge FHIR API"},
             "requestor": False,
             "network": {"address": server_base, "type": "5"}},
        ],
        "source": {"site": server_base, "observer": ref("Organization", ORGANIZATION_ID),
                   "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4",
                             "display": "Application Server"}]},
        "entity": entities,
    })
