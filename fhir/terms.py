"""Code systems and the condition lookup shared by the FHIR mapping and the API.

The condition vocabulary belongs to ``inference.vocabulary``; until it is importable (or for a code
it does not know) a small built-in table with the same SNOMED CT concepts keeps publication working.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
LOCAL_CONDITION = "urn:skinbridge:condition"
PATIENT_SYSTEM = "urn:skinbridge:patient"
CASE_SYSTEM = "urn:skinbridge:case"
CLINICIAN_SYSTEM = "urn:skinbridge:clinician"
MODEL_SYSTEM = "urn:skinbridge:ai-model"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
MEDIA_TYPE = "http://terminology.hl7.org/CodeSystem/media-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"

# The HL7 AI transparency label: "Artificial Intelligence asserted".
AIAST = {"system": OBSERVATION_VALUE, "code": "AIAST", "display": "Artificial Intelligence asserted"}

# DiagnosticReport.category: SNOMED CT 394582007 "Dermatology" (the specialty).
DERMATOLOGY = {"system": SNOMED, "code": "394582007", "display": "Dermatology"}
# DiagnosticReport.code: LOINC 11488-4 "Consult note" -- a store-and-forward teledermatology
# consultation is a request for a specialist opinion on a patient's photos (see docs/fhir.md).
REPORT_CODE = {"system": LOINC, "code": "11488-4", "display": "Consult note"}
# SNOMED CT 52101004 "Present": the value of a dermatologist's diagnosis observation.
PRESENT = {"system": SNOMED, "code": "52101004", "display": "Present"}


@dataclass(frozen=True)
class ConditionTerm:
    code: str  # vocabulary slug
    snomed: str | None
    display: str  # SNOMED display or English name
    name: str  # English name for narrative and PDF
    malignant: bool

    def coding(self) -> list[dict[str, str]]:
        if self.snomed:
            return [{"system": SNOMED, "code": self.snomed, "display": self.display}]
        return [{"system": LOCAL_CONDITION, "code": self.code, "display": self.name}]

    def concept(self) -> dict[str, object]:
        return {"coding": self.coding(), "text": self.name}


# Used only when inference.vocabulary is missing or does not know a code.
_BUILTIN: dict[str, tuple[str, str, str, bool]] = {
    "melanoma": ("93655004", "Malignant melanoma of skin", "Melanoma", True),
    "basal_cell_carcinoma": ("254701007", "Basal cell carcinoma of skin", "Basal cell carcinoma", True),
    "psoriasis": ("9014002", "Psoriasis", "Psoriasis", False),
    "acne": ("88616000", "Acne vulgaris", "Acne", False),
}


@functools.lru_cache(maxsize=1)
def _vocabulary():  # type: ignore[no-untyped-def]
    try:
        from inference.vocabulary import load_vocabulary
    except ImportError:
        return None
    try:
        return load_vocabulary()
    except Exception:  # noqa: BLE001 - a broken vocabulary file must not stop publication
        return None


def condition(code: str) -> ConditionTerm:
    vocab = _vocabulary()
    if vocab is not None:
        try:
            c = vocab.get(code)
        except (KeyError, LookupError):
            c = None
        if c is not None:
            name = c.name("en")
            return ConditionTerm(code, c.snomed or None, c.snomed_display or name, name, bool(c.malignant))
    if code in _BUILTIN:
        snomed, display, name, malignant = _BUILTIN[code]
        return ConditionTerm(code, snomed, display, name, malignant)
    return ConditionTerm(code, None, code.replace("_", " "), code.replace("_", " ").capitalize(), False)
