"""Turn outbox messages into patient-facing text, in the patient's language.

The AI result is always framed as preliminary: the disclaimer is part of every result and
follow-up answer, never optional.
"""

from __future__ import annotations

from typing import Any

from bot.i18n import t

# probability -> words; thresholds chosen so "very likely" needs a clearly dominant class
LIKELIHOOD_WORDS: list[tuple[float, str]] = [
    (0.8, "very_likely"),
    (0.5, "likely"),
    (0.2, "possible"),
    (0.05, "less_likely"),
    (0.0, "unlikely"),
]
MAX_ALTERNATIVES = 2
MIN_ALTERNATIVE_P = 0.05


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
    if found is None:
        return t(lang, "result.unknown_condition") if not code else code.replace("_", " ")
    return found.name(lang)


def result_text(lang: str, differential: list[dict[str, Any]], urgency: str, *, in_review: bool = False) -> str:
    """The preliminary assessment in plain words: most likely, alternatives, urgency, advice, disclaimer;
    ``in_review`` when triage already sent the case to the dermatologist queue."""
    lines = [t(lang, "result.title").upper(), ""]
    ranked = sorted(differential, key=lambda d: d["probability"], reverse=True)
    if not ranked:
        lines += [t(lang, "result.none"), "", "⚠ " + t(lang, "result.disclaimer")]
        return "\n".join(lines)
    top = ranked[0]
    lines.append(t(lang, "result.top", name=condition_name(lang, top["code"]),
                   likelihood=likelihood(lang, float(top["probability"]))))
    others = [d for d in ranked[1 : 1 + MAX_ALTERNATIVES] if float(d["probability"]) >= MIN_ALTERNATIVE_P]
    if others:
        items = ", ".join(
            t(lang, "result.item", name=condition_name(lang, d["code"]), likelihood=likelihood(lang, float(d["probability"])))
            for d in others
        )
        lines.append(t(lang, "result.alternatives", items=items))
    lines.append("")
    if in_review:
        lines.append(t(lang, "result.in_review"))
    lines.append(t(lang, f"urgency.{urgency}" if urgency in ("emergency", "urgent", "soon", "routine") else "urgency.soon"))
    found = condition(top["code"])
    if found is not None:
        advice = found.advice(lang)
        if advice:
            lines.append(t(lang, "result.advice", advice=advice))
    lines += ["", "⚠ " + t(lang, "result.disclaimer")]
    return "\n".join(lines)
