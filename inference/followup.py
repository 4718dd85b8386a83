"""Answers to a patient's follow-up questions about their case (the SkinGPT-4 interactive loop).

With a VLM configured, the model answers with the photos and the case in context. Without one
(the embedded default), the answer is built from the condition vocabulary. Either way the same
guard rails apply first: a red flag escalates to a dermatologist, prescription dosing is refused,
and every answer carries the "preliminary, not a diagnosis" disclaimer.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image as PILImage
from sqlalchemy.orm import Session

from clinic_db import cases
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import Case
from inference.engines.guardrails import load_guardrails
from inference.engines.vlm import FLAG_DOSING_REFUSED, FLAG_RED_FLAG, FollowupAnswer
from inference.vocabulary import load_vocabulary


def _differential(clinic: Clinic, session: Session, case: Case) -> list[dict[str, Any]]:
    result = cases.preferred_result(session, case)
    if result is None:
        return []
    return clinic.vault.get_json(session, result, "differential", owner=case.patient_id) or []


def answer_question(clinic: Clinic, session: Session, case: Case, question: str, engines: Any) -> FollowupAnswer:
    lang = case.patient.language or "en"
    vocab = load_vocabulary()
    differential = _differential(clinic, session, case)
    if engines.vlm is not None:
        photos = [
            PILImage.open(io.BytesIO(cases.image_bytes(clinic, session, img, Actor.system("worker")))).convert("RGB")
            for img in case.images
        ]
        context = {
            "preliminary assessment": ", ".join(
                f"{vocab.get(d['code']).name(lang)} ({d['probability']:.0%})" for d in differential[:3]
            ),
            **cases.history(clinic, session, case),
        }
        return engines.vlm.followup(photos, context, question, lang)
    return _answer_from_vocabulary(question, differential, lang)


def _answer_from_vocabulary(question: str, differential: list[dict[str, Any]], lang: str) -> FollowupAnswer:
    rails = load_guardrails()
    disclaimer = rails.text("disclaimer", lang)
    red_flags = rails.red_flags_in(question)
    if red_flags:
        return FollowupAnswer(f"{rails.text('red_flag', lang)}\n\n{disclaimer}",
                              [FLAG_RED_FLAG, *(f"red_flag:{name}" for name in red_flags)])
    if rails.asks_for_dosing(question):
        return FollowupAnswer(f"{rails.text('dosing_refused', lang)}\n\n{disclaimer}", [FLAG_DOSING_REFUSED])
    if not differential:
        return FollowupAnswer(f"{rails.text('no_answer', lang)}\n\n{disclaimer}", ["no_answer"])
    condition = load_vocabulary().get(differential[0]["code"])
    intro = {
        "en": "The preliminary assessment points most to {name}.",
        "de": "Die vorläufige Einschätzung deutet am ehesten auf {name} hin.",
    }.get(lang, "The preliminary assessment points most to {name}.")
    text = "\n\n".join([
        intro.format(name=condition.name(lang)),
        condition.description(lang),
        condition.advice(lang),
        disclaimer,
    ])
    return FollowupAnswer(text, [])
