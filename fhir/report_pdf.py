"""The human-readable report (DiagnosticReport.presentedForm): a PDF made with fpdf2.

Deterministic for the same case content (fixed creation date), so re-publishing an unchanged case
does not create a new FHIR version.
"""

from __future__ import annotations

import io

from fpdf import FPDF

from console.labels import HISTORY_LABELS
from fhir.mapping import DISCLAIMER, CaseData, conclusion, decision_condition, report_status
from fhir.terms import condition

SIGNED_NOTE = ("Signed by a dermatologist: the conclusion above is the dermatologist's. The AI candidates are "
               "listed for reference only; they are not a diagnosis.")


def _latin1(text: str) -> str:
    # the PDF core fonts are Latin-1; anything else degrades to "?" rather than failing
    return text.encode("latin-1", "replace").decode("latin-1")


def render(case: CaseData) -> bytes:
    status = report_status(case)
    pdf = FPDF(format="A4")
    pdf.set_creation_date(case.created_at)
    pdf.set_title("SkinBridge teledermatology report")
    pdf.set_author("SkinBridge")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    width = pdf.w - pdf.l_margin - pdf.r_margin

    def line(text: str, size: int = 10, style: str = "", h: float = 5.5) -> None:
        pdf.set_font("Helvetica", style, size)
        pdf.multi_cell(width, h, _latin1(text), new_x="LMARGIN", new_y="NEXT")

    line("SkinBridge teledermatology report", 16, "B", 9)
    line(f"Case {case.case_id}  -  status: {status.upper()}", 10)
    line(f"Patient (pseudonymous id): {case.patient_id}", 9)
    if case.patient_name:
        line(f"Name: {case.patient_name}", 9)
    pdf.ln(2)
    if status == "preliminary":
        pdf.set_text_color(180, 0, 0)
        line("PRELIMINARY - " + DISCLAIMER, 11, "B", 6)
        pdf.set_text_color(0, 0, 0)
    text, _codes = conclusion(case)
    line("Conclusion", 12, "B", 7)
    line(text)
    decision = case.decision if status in ("final", "amended") else None
    if decision is not None:
        code = decision_condition(case, decision)
        line(f"Signed by {decision.clinician.display_name} on {decision.decided_at:%Y-%m-%d %H:%M} UTC"
             + (f" - diagnosis: {condition(code).name}" if code else ""), 9)
    urgency = decision.urgency if decision is not None and decision.urgency else case.urgency
    if urgency:
        line(f"Urgency: {urgency}" + ("" if decision is not None else " (triage, preliminary)"), 10, "B")
    answers = [(label, case.history[key]) for key, label in HISTORY_LABELS.items()
               if case.history.get(key) not in (None, "")]
    if answers:
        pdf.ln(1)
        line("History (the patient's answers)", 11, "B", 6)
        for label, value in answers:
            line(f"  {label}: {value}", 10)
    pdf.ln(2)
    for ai in case.latest_ai:
        line(f"AI candidates ({ai.engine}: {ai.model_id} {ai.model_version}) - AI-generated, not a diagnosis",
             11, "B", 6)
        for rank, cand in enumerate(ai.differential, start=1):
            line(f"  {rank}. {condition(cand['code']).name}: {float(cand['probability']) * 100:.1f}%", 10)
        if ai.description:
            line(f"Model description: {ai.description}", 9)
    for i, photo in enumerate(case.photos, start=1):
        _image(pdf, photo.data, f"Patient photo {i}")
    for ex in case.explanations:
        _image(pdf, ex.png, f"AI-generated illustration of {condition(ex.condition_code).name} "
                            "(synthetic example, NOT the patient's skin)")
    pdf.ln(3)
    # a signed report must not end calling itself preliminary
    line(SIGNED_NOTE if decision is not None else DISCLAIMER, 8, "I", 4.5)
    return bytes(pdf.output())


def _image(pdf: FPDF, data: bytes, caption: str) -> None:
    if pdf.get_y() > pdf.h - 80:
        pdf.add_page()
    pdf.set_font("Helvetica", "B", 9)
    pdf.cell(0, 6, _latin1(caption), new_x="LMARGIN", new_y="NEXT")
    pdf.image(io.BytesIO(data), h=55, keep_aspect_ratio=True, w=90)
    pdf.ln(2)
