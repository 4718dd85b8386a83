"""The clinical message model: what a patient reads about a case, in the patient's language.

One urgency, one action with one timeframe, and advice about the condition that drives them, from
one place: the triage result (preliminary) or the dermatologist's decision (signed). Timeframes come
from the ``sla.*`` texts of :data:`clinic_db.review.URGENCY_SLA`'s levels, so "see a doctor within
24 hours" and "a dermatologist will review your case within 24 hours" cannot disagree; a
recommendation may only go with the urgency whose timeframe it matches
(:func:`clinic_db.review.recommendation_fits`). The patient never reads a code.

The AI result is always framed as preliminary: the disclaimer is part of every result and
follow-up answer, never optional.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from bot.i18n import t
from clinic_db import review

# probability -> words; thresholds chosen so "very likely" needs a clearly dominant class
LIKELIHOOD_WORDS: list[tuple[float, str]] = [
    (0.8, "very_likely"),
    (0.5, "likely"),
    (0.2, "possible"),
    (0.05, "less_likely"),
    (0.0, "unlikely"),
]
# a top guess below "possible" is not introduced as "most likely"
SURE_ENOUGH_TO_LEAD = next(bound for bound, word in LIKELIHOOD_WORDS if word == "possible")
MAX_ALTERNATIVES = 2
MIN_ALTERNATIVE_P = 0.05
URGENCIES = tuple(review.URGENCY_PRIORITY)


def likelihood(lang: str, probability: float) -> str:
    for threshold, key in LIKELIHOOD_WORDS:
        if probability >= threshold:
            return t(lang, f"likelihood.{key}")
    return t(lang, "likelihood.unlikely")


def _vocabulary() -> Any:
    from inference.vocabulary import load_vocabulary

    return load_vocabulary()


def condition(code: str | None) -> Any | None:
    if not code:
        return None
    try:
        return _vocabulary().get(code)
    except KeyError:
        return None


def condition_name(lang: str, code: str | None) -> str:
    found = condition(code)
    # an unknown code is never shown as such: the patient reads "an unclear skin finding"
    return t(lang, "result.unknown_condition") if found is None else found.name(lang)


def _urgency(urgency: str | None) -> str:
    return urgency if urgency in URGENCIES else "soon"  # unknown: err on the side of a doctor soon


def timeframe(lang: str, urgency: str) -> str:
    """The one duration an urgency stands for ("24 hours", "3 days"): review SLA and advice alike."""
    return t(lang, f"sla.{_urgency(urgency)}")


def action_text(lang: str, urgency: str | None, recommendation: str | None = None) -> str:
    """The single sentence saying what to do and by when.

    Without a recommendation (the AI's preliminary result) the urgency decides; with one (a
    dermatologist's decision) the recommendation says what, the urgency when. A stored pair that
    does not fit (signed before the check existed) falls back to the urgency, the safety-relevant half.
    """
    urgency = _urgency(urgency)
    if recommendation is None or not review.recommendation_fits(urgency, recommendation):
        if urgency in ("urgent", "soon"):
            return t(lang, f"urgency.{urgency}", when=timeframe(lang, urgency))
        return t(lang, f"urgency.{urgency}")
    if recommendation == "self_care":
        return t(lang, "plan.self_care")
    if recommendation == "see_gp":
        return t(lang, "plan.see_gp.routine") if urgency == "routine" else \
            t(lang, "plan.see_gp", when=timeframe(lang, urgency))
    if recommendation == "urgent_in_person":
        return t(lang, "urgency.emergency") if urgency == "emergency" else \
            t(lang, "plan.in_person", when=timeframe(lang, urgency))
    days = review.within_days(recommendation)
    assert days is not None  # recommendation_fits accepted it
    when = timeframe(lang, "urgent") if days == 1 else t(lang, "sla.days", days=days)
    return t(lang, "plan.dermatologist", when=when)


def _advice_fits(code: str | None, urgency: str) -> bool:
    """A condition's advice is written for its own default urgency: beside a higher one it plays the
    urgency down ("no treatment is needed" next to "within 24 hours"), beside a lower one it pushes
    ("a dermatologist should examine it" next to "this does not look urgent")."""
    found = condition(code)
    return found is not None and found.default_urgency == urgency


def _advice(lang: str, code: str | None) -> str | None:
    found = condition(code)
    return (found.advice(lang) or None) if found is not None else None


def result_text(lang: str, differential: list[dict[str, Any]], urgency: str, *, in_review: bool = False,
                flags: Iterable[str] = ()) -> str:
    """The preliminary assessment in plain words: most likely, alternatives, what to do and why,
    advice about the condition behind the urgency, disclaimer; ``in_review`` when triage already
    sent the case to the dermatologist queue."""
    from inference.triage import driving_condition

    lines = [t(lang, "result.title").upper(), ""]
    ranked = sorted(differential, key=lambda d: float(d["probability"]), reverse=True)
    if not ranked:
        lines += [t(lang, "result.none"), "", "⚠ " + t(lang, "result.disclaimer")]
        return "\n".join(lines)
    urgency = _urgency(urgency)
    top = ranked[0]
    # "Most likely: X – unlikely" contradicts itself: a weak top guess is called what it is
    weak = float(top["probability"]) < SURE_ENOUGH_TO_LEAD
    lead = "result.top_unsure" if weak else "result.top"
    lines.append(t(lang, lead, name=condition_name(lang, top["code"]),
                   likelihood=likelihood(lang, float(top["probability"]))))
    others = [d for d in ranked[1 : 1 + MAX_ALTERNATIVES] if float(d["probability"]) >= MIN_ALTERNATIVE_P]
    if others:
        # names carry their own parentheses and commas ("Hives (urticaria)"): a dash sets the likelihood
        # apart, a semicolon the items
        items = "; ".join(
            t(lang, "result.item", name=condition_name(lang, d["code"]), likelihood=likelihood(lang, float(d["probability"])))
            for d in others
        )
        lines.append(t(lang, "result.alternatives", items=items))
    lines.append("")
    # what to do comes first: in an emergency "seek care now" must not follow "a dermatologist will look"
    lines.append(action_text(lang, urgency))
    # advice about the condition that set the urgency: a suspected cancer's, not the harmless top guess's
    driver = driving_condition(ranked, urgency, flags)
    advice_code: str | None = top["code"]
    if driver is not None and driver != top["code"]:
        lines.append(t(lang, "result.reason", name=condition_name(lang, driver)))
        advice_code = driver
    elif driver is None and not _advice_fits(top["code"], urgency):
        if urgency != "routine":  # raised by a red flag, an AI warning sign, ...: say so
            lines.append(t(lang, "result.reason_other"))
        advice_code = None  # the top guess's advice is written for another urgency
    advice = _advice(lang, advice_code)
    if advice and (advice_code != top["code"] or weak):  # only a candidate: its advice applies if it is that
        lines.append(t(lang, "result.advice_if", name=condition_name(lang, advice_code), advice=advice))
    elif advice:
        lines.append(t(lang, "result.advice", advice=advice))
    if in_review:
        lines.append(t(lang, "review.emergency") if urgency == "emergency" else t(lang, "result.in_review"))
    lines += ["", "⚠ " + t(lang, "result.disclaimer")]
    return "\n".join(lines)


def final_text(lang: str, *, condition_code: str | None, urgency: str | None, recommendation: str | None,
               note: str | None) -> str:
    """The dermatologist's signed decision: assessment, one action, advice about it, the note."""
    lines = [t(lang, "final.title")]
    if condition_code:
        lines.append(t(lang, "final.condition", name=condition_name(lang, condition_code)))
    lines.append(action_text(lang, urgency, recommendation))
    advice = _advice(lang, condition_code) if _advice_fits(condition_code, _urgency(urgency)) else None
    if advice:
        lines.append(t(lang, "final.advice", name=condition_name(lang, condition_code), advice=advice))
    if note:
        lines.append(t(lang, "final.note", note=note))
    return "\n\n".join(lines)


def review_requested_text(lang: str, urgency: str | None) -> str:
    """Sent when a review task opens: the review task's urgency (a red flag may have raised it).

    In an emergency the patient reads "seek care now" first and no review time: "usually within 4
    hours" would read as "wait for us"."""
    urgency = _urgency(urgency)
    if urgency == "emergency":
        return t(lang, "urgency.emergency") + " " + t(lang, "review.emergency")
    return t(lang, "review.requested", sla=timeframe(lang, urgency))


def followup_text(lang: str, answer: str, urgency: str | None) -> str:
    """A follow-up answer with its disclaimer; in an emergency case "seek care now" comes first, so an
    answer about the condition (or "a dermatologist will look at your case") never reads as a reason to wait."""
    text = t(lang, "followup.answer", text=answer)
    return t(lang, "urgency.emergency") + "\n\n" + text if urgency == "emergency" else text
