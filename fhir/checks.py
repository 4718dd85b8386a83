"""The project's own checks of the FHIR resources it emits: codes and reference targets.

``fhir.resources`` and the Node validators check structure; they do not know which SNOMED CT
concepts we mean, whether a LOINC code was mistyped, or whether a reference points at a resource
that exists. This module does:

* every ``Coding`` in SNOMED CT (``http://snomed.info/sct``) must be a concept id with a valid Verhoeff
  check digit, be one we publish (condition vocabulary or :mod:`fhir.terms`) and carry its display;
* every LOINC ``Coding`` must have the ``NNNNN-C`` form with the LOINC (mod 10) check digit;
* every ``Reference`` must point at a target type R4 allows for that element (where R4 allows Any,
  at the type this project uses there), and an element without a rule is reported, so a new
  reference in :mod:`fhir.mapping` cannot slip past unchecked;
* with :func:`check_resources`, every reference (and attachment ``Binary/…`` url) must resolve to a
  resource in the given set, at the referenced version when it names one.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from clinic_db.db import Clinic
from clinic_db.keys import KeyUnavailable
from clinic_db.models import FhirResource
from fhir import terms
from inference.vocabulary import valid_concept_sctid

ANY = frozenset({"*"})
_PRACTITIONERS = frozenset({"Practitioner", "PractitionerRole", "Organization", "CareTeam"})
_AGENTS = frozenset({"Practitioner", "PractitionerRole", "RelatedPerson", "Patient", "Device", "Organization"})

# element path (list indices dropped) -> target types allowed by R4 (4.0.1). Where R4 says
# Reference(Any) the set is what this project emits there, so a slip is still caught.
REFERENCE_TARGETS: dict[str, frozenset[str]] = {
    "DiagnosticReport.subject": frozenset({"Patient", "Group", "Device", "Location"}),
    "DiagnosticReport.result": frozenset({"Observation"}),
    "DiagnosticReport.media.link": frozenset({"Media"}),
    "DiagnosticReport.performer": _PRACTITIONERS,
    "DiagnosticReport.resultsInterpreter": _PRACTITIONERS,
    "DiagnosticReport.specimen": frozenset({"Specimen"}),
    "DiagnosticReport.imagingStudy": frozenset({"ImagingStudy"}),
    "DiagnosticReport.encounter": frozenset({"Encounter"}),
    "DiagnosticReport.basedOn": frozenset({"CarePlan", "ImmunizationRecommendation", "MedicationRequest",
                                           "NutritionOrder", "ServiceRequest"}),
    "Observation.subject": frozenset({"Patient", "Group", "Device", "Location"}),
    "Observation.device": frozenset({"Device", "DeviceMetric"}),
    "Observation.performer": _PRACTITIONERS | {"Patient", "RelatedPerson"},
    "Observation.derivedFrom": frozenset({"DocumentReference", "ImagingStudy", "Media", "QuestionnaireResponse",
                                          "Observation", "MolecularSequence"}),
    "Observation.hasMember": frozenset({"Observation", "QuestionnaireResponse", "MolecularSequence"}),
    "Observation.specimen": frozenset({"Specimen"}),
    "Observation.encounter": frozenset({"Encounter"}),
    "Media.subject": frozenset({"Patient", "Practitioner", "PractitionerRole", "Group", "Device", "Specimen",
                                "Location"}),
    "Media.operator": frozenset({"Practitioner", "PractitionerRole", "Organization", "CareTeam", "Patient",
                                 "Device", "RelatedPerson"}),
    "Media.device": frozenset({"Device", "DeviceMetric"}),
    "Media.encounter": frozenset({"Encounter"}),
    "Device.owner": frozenset({"Organization"}),
    "Device.patient": frozenset({"Patient"}),
    "Device.parent": frozenset({"Device"}),
    "Device.location": frozenset({"Location"}),
    "Organization.partOf": frozenset({"Organization"}),
    "Binary.securityContext": frozenset({"DiagnosticReport"}),  # R4: Any
    "Provenance.target": frozenset({"DiagnosticReport", "Observation"}),  # R4: Any
    "Provenance.agent.who": _AGENTS,
    "Provenance.agent.onBehalfOf": _AGENTS,
    "Provenance.entity.what": frozenset({"Media", "Observation", "DiagnosticReport"}),  # R4: Any
    "Provenance.location": frozenset({"Location"}),
    "AuditEvent.agent.who": _AGENTS,
    "AuditEvent.source.observer": _AGENTS,
    "AuditEvent.entity.what": ANY,  # R4: Any; a BALP event may name any resource it touched
    "Parameters.parameter.valueReference": ANY,  # SubscriptionStatus: subscription, focus
    "Parameters.parameter.part.valueReference": ANY,
}
# Attachments whose url is a relative ``Binary/<id>`` in this server.
ATTACHMENTS = frozenset({"DiagnosticReport.presentedForm", "Media.content"})
# Where resources nest: checked as resources of their own.
NESTED = frozenset({"Bundle.entry.resource", "Parameters.parameter.resource"})

# a literal reference, relative or absolute: [base/]Type/id[/_history/vid]
_REF = re.compile(r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})"
                  r"(?:/_history/(?P<vid>[A-Za-z0-9\-.]{1,64}))?$")
_LOINC = re.compile(r"^(?P<num>[1-9][0-9]{0,6})-(?P<check>[0-9])$")


@dataclass(frozen=True)
class Problem:
    resource: str  # "Type/id" of the resource holding the element
    path: str  # FHIRPath-like, with indices: DiagnosticReport.result[0]
    code: str  # see the module docstring: snomed-*, loinc-*, reference-*
    message: str

    def __str__(self) -> str:
        return f"{self.resource} {self.path}: [{self.code}] {self.message}"


# --- codes ----------------------------------------------------------------------------------------
def loinc_check_digit(number: str) -> int:
    """The LOINC mod-10 check digit (Luhn: double every other digit from the right)."""
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d // 10 + d % 10
    return (10 - total % 10) % 10


def loinc_ok(code: str) -> bool:
    m = _LOINC.match(code)
    return m is not None and loinc_check_digit(m["num"]) == int(m["check"])


@functools.lru_cache(maxsize=1)
def known_snomed() -> dict[str, frozenset[str]]:
    """SNOMED CT concept id -> the display(s) we publish for it."""
    from inference.vocabulary import load_vocabulary

    out: dict[str, set[str]] = {}
    for c in load_vocabulary():
        out.setdefault(c.snomed, set()).add(c.snomed_display)
    for coding in (terms.DERMATOLOGY, terms.PRESENT):
        out.setdefault(coding["code"], set()).add(coding["display"])
    return {code: frozenset(displays) for code, displays in out.items()}


def _check_coding(coding: dict[str, Any], where: tuple[str, str]) -> Iterator[Problem]:
    system, code = coding.get("system"), str(coding.get("code", ""))
    if system == terms.SNOMED:
        if not valid_concept_sctid(code):
            yield Problem(*where, "snomed-check-digit",
                          f"{code!r} is not a SNOMED CT concept id (format, partition or Verhoeff check digit)")
        elif code not in known_snomed():
            yield Problem(*where, "snomed-unknown", f"SNOMED CT {code} is not a concept this project publishes")
        elif "display" in coding and coding["display"] not in known_snomed()[code]:
            yield Problem(*where, "snomed-display",
                          f"display {coding['display']!r} for {code}; expected {sorted(known_snomed()[code])}")
    elif system == terms.LOINC:
        if not _LOINC.match(code):
            yield Problem(*where, "loinc-format", f"{code!r} is not a LOINC code (NNNNN-C)")
        elif not loinc_ok(code):
            yield Problem(*where, "loinc-check-digit", f"{code!r} has a wrong LOINC check digit")


# --- walking ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ref:
    holder: str
    path: str
    target: str  # Type/id
    version: str | None


def _label(resource: dict[str, Any]) -> str:
    return f"{resource.get('resourceType')}/{resource.get('id', '?')}"


def _walk(resource: dict[str, Any], problems: list[Problem], refs: list[_Ref],
          found: list[dict[str, Any]]) -> None:
    """Check one resource (and those nested in it); collect its references and nested resources."""
    rtype = str(resource.get("resourceType"))
    holder = _label(resource)
    found.append(resource)

    def visit(value: Any, element: str, path: str) -> None:
        if isinstance(value, list):
            for i, item in enumerate(value):
                visit(item, element, f"{path}[{i}]")
            return
        if not isinstance(value, dict):
            return
        if element in NESTED or element.endswith(".contained"):
            if "resourceType" in value:
                _walk(value, problems, refs, found)
            return
        where = (holder, path)
        if "system" in value and "code" in value and isinstance(value.get("code"), str):
            problems.extend(_check_coding(value, where))
        if isinstance(value.get("reference"), str):
            _reference(value["reference"], element, where)
        if element in ATTACHMENTS and isinstance(value.get("url"), str):
            url = value["url"]
            if not url.startswith("Binary/"):
                problems.append(Problem(*where, "reference-type", f"attachment url {url!r} is not Binary/<id>"))
            else:
                _reference(url, element, where, allowed=frozenset({"Binary"}))
        for key, child in value.items():
            if key != "resourceType":
                visit(child, f"{element}.{key}", f"{path}.{key}")

    def _reference(text: str, element: str, where: tuple[str, str], allowed: frozenset[str] | None = None) -> None:
        if text.startswith("#"):
            return  # a contained resource: resolved by the structural validators
        m = _REF.search(text)
        if m is None:
            problems.append(Problem(*where, "reference-format", f"{text!r} is not a literal Type/id reference"))
            return
        allowed = allowed if allowed is not None else REFERENCE_TARGETS.get(element)
        if allowed is None:
            problems.append(Problem(*where, "reference-element",
                                    f"no target rule for {element} (add it to fhir.checks.REFERENCE_TARGETS)"))
        elif allowed is not ANY and m["type"] not in allowed:
            problems.append(Problem(*where, "reference-type",
                                    f"{element} may not point at {m['type']} (allowed: {', '.join(sorted(allowed))})"))
        refs.append(_Ref(holder, where[1], f"{m['type']}/{m['id']}", m["vid"]))

    for key, child in resource.items():
        if key != "resourceType":
            visit(child, f"{rtype}.{key}", f"{rtype}.{key}")


def check_resource(resource: dict[str, Any]) -> list[Problem]:
    """Codes and reference target types of one resource (a Bundle: of every entry); no resolution."""
    problems: list[Problem] = []
    _walk(resource, problems, [], [])
    return problems


def check_resources(resources: Iterable[dict[str, Any]], *, resolve: bool = True) -> list[Problem]:
    """:func:`check_resource` for each, and (``resolve``) every reference resolves within the set.

    Pass every stored version when references name versions (Provenance targets a report version).
    """
    problems: list[Problem] = []
    refs: list[_Ref] = []
    found: list[dict[str, Any]] = []
    for resource in resources:
        _walk(resource, problems, refs, found)
    if resolve:
        present: set[str] = set()
        for res in found:
            label = _label(res)
            present.add(label)
            version = (res.get("meta") or {}).get("versionId")
            if version:
                present.add(f"{label}/_history/{version}")
        for ref in refs:
            key = ref.target + (f"/_history/{ref.version}" if ref.version else "")
            if key not in present:
                problems.append(Problem(ref.holder, ref.path, "reference-dangling", f"{key} does not exist"))
    return problems


def published_resources(clinic: Clinic, session: Session) -> list[dict[str, Any]]:
    """Every stored version of every published resource that can still be read (erased ones cannot)."""
    from fhir.publish import row_json

    out = []
    for row in session.scalars(select(FhirResource).where(FhirResource.deleted.is_(False))
                               .order_by(FhirResource.seq)):
        try:
            out.append(row_json(clinic, session, row))
        except KeyUnavailable:
            continue
    return out


def check_published(clinic: Clinic, session: Session) -> list[Problem]:
    """Check everything in ``fhir_resources``: codes, target types, and that references resolve."""
    return check_resources(published_resources(clinic, session))
