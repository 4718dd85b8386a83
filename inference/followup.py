"""Answers to a patient's follow-up questions about their case (the SkinGPT-4 interactive loop).

One path for every answer, whether or not a VLM is configured:

1. guard rails on the question (``prompts/guardrails.json``): a red flag escalates to a dermatologist,
   prescription dosing is refused;
2. a question about cancer gets a plain answer from the condition vocabulary: whether a condition the
   result message lists is a skin cancer (or precancerous), never left to a model;
3. otherwise the VLM answers with the photos and the case in context (the question as quoted data), and
   its reply is checked (:func:`inference.engines.checks.check_reply`: no dose, no definitive diagnosis,
   no "you do not need a doctor", no leaked prompt, readable, only the case's conditions); a reply that
   fails gets the canned safe text. Without a VLM the answer is built from the vocabulary.

The answer text carries no disclaimer: the patient-facing message (bot locale ``followup.answer``) adds
exactly one.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from string import Template
from typing import Any

from PIL import Image as PILImage
from sqlalchemy.orm import Session

from clinic_db import cases, review
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import Case
from inference.engines.checks import check_reply
from inference.engines.guardrails import GuardRails, load_guardrails
from inference.vocabulary import Vocabulary, load_vocabulary

FLAG_RED_FLAG = "red_flag"
FLAG_DOSING_REFUSED = "dosing_refused"
FLAG_REPLY_REJECTED = "reply_rejected"
FLAG_CANCER_QUESTION = "cancer_question"
FLAG_EMERGENCY_SIGN = "emergency_sign"  # with FLAG_RED_FLAG: the words are one of triage's emergency signs
# the conditions the patient's result message names (bot/render.py: the top one and up to two alternatives
# from 5 %); a cancer question is answered about exactly these
LISTED = 3
MIN_LISTED_PROBABILITY = 0.05


class FollowupAnswer(str):
    """The answer text (a plain ``str`` for callers that only need text) plus guard-rail flags."""

    flags: list[str]

    def __new__(cls, text: str, flags: list[str] | None = None) -> "FollowupAnswer":
        obj = super().__new__(cls, text)
        obj.flags = list(flags or [])
        return obj

    @property
    def text(self) -> str:
        return str(self)

    @property
    def needs_dermatologist(self) -> bool:
        return FLAG_RED_FLAG in self.flags


def _differential(clinic: Clinic, session: Session, case: Case) -> list[dict[str, Any]]:
    result = cases.preferred_result(session, case)
    if result is None:
        return []
    return clinic.vault.get_json(session, result, "differential", owner=case.patient_id) or []


def answer_question(clinic: Clinic, session: Session, case: Case, question: str, vlm: Any | None) -> FollowupAnswer:
    """Answer ``question`` about ``case``; ``vlm`` is the worker's VLM engine, or None (vocabulary answer).
    Exceptions of the VLM propagate: the task decides between a retry and the vocabulary answer."""
    lang = case.patient.language or "en"

    def photos() -> list[PILImage.Image]:
        return [PILImage.open(io.BytesIO(cases.image_bytes(clinic, session, img, Actor.system("worker"),
                                                           purpose="treatment"))).convert("RGB")
                for img in case.images]

    from inference.triage import driving_condition

    differential = _differential(clinic, session, case)
    result = cases.preferred_result(session, case)
    # the condition that set the case's urgency (e.g. melanoma above its operating point), which the result
    # message names even when it is not among the listed candidates: a cancer question must not contradict it
    driver = driving_condition(differential, case.urgency or "routine", result.flags if result is not None else ())
    return answer(question, differential, lang, vlm=vlm, photos=photos,
                  history=cases.history(clinic, session, case), suspected=[driver] if driver else [],
                  urgency=review.urgency_now(session, case))


def answer(question: str, differential: Sequence[dict[str, Any]], lang: str = "en", *, vlm: Any | None = None,
           photos: Callable[[], list[PILImage.Image]] = list, history: dict[str, Any] | None = None,
           vocabulary: Vocabulary | None = None, rails: GuardRails | None = None,
           suspected: Sequence[str] = (), urgency: str | None = None) -> FollowupAnswer:
    """``suspected``: conditions the result message says cannot be ruled out (they set its urgency);
    ``urgency``: the case's urgency now (clinic_db.review.urgency_now), which no answer may play down."""
    rails = rails or load_guardrails()
    vocab = vocabulary or load_vocabulary()
    red_flags = rails.red_flags_in(question)
    emergency = emergency_signs(question)
    if red_flags or emergency:  # a warning sign always goes to a human, whatever a model would say
        # an emergency (the case's, or the words') says "seek care now" first and no "if you feel unwell"
        key = "red_flag_emergency" if emergency or urgency == "emergency" else "red_flag"
        return FollowupAnswer(rails.text(key, lang), [FLAG_RED_FLAG, *(f"red_flag:{n}" for n in red_flags),
                                                      *([FLAG_EMERGENCY_SIGN] if emergency else [])])
    if rails.asks_for_dosing(question):
        return FollowupAnswer(rails.text("dosing_refused", lang), [FLAG_DOSING_REFUSED])
    ranked = sorted((d for d in differential if d.get("code") in vocab), key=lambda d: -float(d["probability"]))
    if not ranked:
        return FollowupAnswer(rails.text("no_answer", lang), ["no_answer"])
    if rails.asks_about_cancer(question):
        return _cancer_answer(ranked, lang, vocab, rails, suspected)
    if vlm is None:
        return _answer_from_vocabulary(ranked, lang, vocab, urgency)
    context = {
        "preliminary assessment": ", ".join(f"{vocab.get(d['code']).name(lang)} ({float(d['probability']):.0%})"
                                            for d in ranked[:LISTED]),
        **(history or {}),
    }
    reply = vlm.followup(photos(), context, question, lang).strip()
    problems = check_reply(reply, rails, allowed_codes={d["code"] for d in ranked}, vocabulary=vocab)
    if "dosing" in problems:
        return FollowupAnswer(rails.text("dosing_refused", lang), [FLAG_DOSING_REFUSED])
    if problems:
        return FollowupAnswer(rails.text("safe_reply", lang),
                              [FLAG_REPLY_REJECTED, *(f"{FLAG_REPLY_REJECTED}:{p}" for p in problems)])
    return FollowupAnswer(reply, [])


def emergency_signs(question: str) -> list[str]:
    """Triage's emergency red flags in the question (fever with a spreading rash, trouble breathing): the
    same words in the history make the case an emergency, so in a follow-up they make the review one."""
    from inference.triage import red_flags

    return [r.rule for r in red_flags({"free_text": question}) if r.urgency == "emergency"]


def listed(ranked: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conditions the result message names: the top one and likely-enough alternatives."""
    return [d for i, d in enumerate(ranked[:LISTED]) if i == 0 or float(d["probability"]) >= MIN_LISTED_PROBABILITY]


def _cancer_answer(ranked: Sequence[dict[str, Any]], lang: str, vocab: Vocabulary, rails: GuardRails,
                   suspected: Sequence[str] = ()) -> FollowupAnswer:
    shown = listed(ranked)

    def names(items: list[dict[str, Any]]) -> str:
        return ", ".join(f"{vocab.get(d['code']).name(lang)} ({float(d['probability']):.0%})" for d in items)

    cancers = [d for d in shown if vocab.get(d["code"]).malignant]
    precancers = [d for d in shown if vocab.get(d["code"]).premalignant and d not in cancers]
    parts = []
    if cancers:
        parts.append(Template(rails.text("cancer_listed", lang)).substitute(names=names(cancers)))
    if precancers:
        parts.append(Template(rails.text("precancer_listed", lang)).substitute(names=names(precancers)))
    named = {d["code"] for d in cancers}
    not_ruled_out = [c for c in suspected if c in vocab and vocab.get(c).malignant and c not in named]
    if not_ruled_out:
        parts.insert(0, Template(rails.text("cancer_not_ruled_out", lang)).substitute(
            names=", ".join(vocab.get(c).name(lang) for c in not_ruled_out)))
    if not parts:
        parts.append(Template(rails.text("cancer_not_listed", lang)).substitute(names="", top=names(shown[:1])))
    return FollowupAnswer("\n\n".join(parts), [FLAG_CANCER_QUESTION])


def _answer_from_vocabulary(ranked: Sequence[dict[str, Any]], lang: str, vocab: Vocabulary,
                            urgency: str | None = None) -> FollowupAnswer:
    condition = vocab.get(ranked[0]["code"])
    # the advice is written for the condition's own urgency: in a case raised above it ("No treatment is
    # needed" in an emergency) it would contradict what the result message said to do (bot.render does the same)
    advice = condition.advice(lang) if urgency is None or urgency == condition.default_urgency else ""
    intro = {
        "en": "The preliminary assessment points most to {name}.",
        "de": "Die vorläufige Einschätzung deutet am ehesten auf {name} hin.",
    }.get(lang, "The preliminary assessment points most to {name}.")
    text = "\n\n".join(part for part in (intro.format(name=condition.name(lang)), condition.description(lang),
                                         advice) if part)
    return FollowupAnswer(text, [])
