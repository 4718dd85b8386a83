"""Triage: does a case need a dermatologist, and how urgently?

The rules are data (``inference/data/triage_rules.json``) so a clinician can tune thresholds without
code changes. :func:`decide` applies them to the engines' predictions, the patient's history answers
and the photo/patient signals and returns a :class:`TriageDecision` whose ``reasons`` are stable
codes (shown in the console and stored on the review task) and whose ``details`` say which rule
fired, in words. The AI result itself is never a diagnosis: review=False only means no rule asked
for a clinician *now*; the patient is still told the assessment is preliminary.

Urgency levels and their SLAs are those of :data:`clinic_db.review.URGENCY_SLA`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from clinic_db.review import URGENCY_PRIORITY, URGENCY_SLA
from inference.vocabulary import Vocabulary, fold, load_vocabulary

RULES_PATH = Path(__file__).resolve().parent / "data" / "triage_rules.json"

# reason codes (stable: stored on review tasks, labelled in the console)
MALIGNANCY_SUSPECTED = "malignancy_suspected"
URGENT_CONDITION = "urgent_condition"
LOW_CONFIDENCE = "low_confidence"
ENGINES_DISAGREE = "engines_disagree"
RED_FLAG = "red_flag"
AI_URGENCY_HINT = "ai_urgency_hint"
PHOTO_QUALITY = "photo_quality"
PATIENT_REQUESTED = "patient_requested"
AI_UNUSABLE = "ai_unusable"
REASON_CODES = (MALIGNANCY_SUSPECTED, URGENT_CONDITION, LOW_CONFIDENCE, ENGINES_DISAGREE, RED_FLAG,
                AI_URGENCY_HINT, PHOTO_QUALITY, PATIENT_REQUESTED, AI_UNUSABLE)


class PredictionLike(Protocol):
    """What triage reads of :class:`inference.engines.base.Prediction`."""

    engine: str
    differential: list[dict[str, Any]]
    flags: list[str]
    urgency_hints: list[str]


@dataclass(frozen=True)
class Reason:
    code: str  # one of REASON_CODES
    rule: str  # which rule fired, e.g. "melanoma>=0.15" or "red_flag:bleeding"
    urgency: str
    text: str  # English, for the clinician


@dataclass
class TriageDecision:
    review: bool
    urgency: str
    reasons: list[str] = field(default_factory=list)  # unique reason codes, most urgent first
    details: list[Reason] = field(default_factory=list)

    @property
    def sla(self) -> timedelta:
        return URGENCY_SLA[self.urgency]

    def explain(self) -> list[str]:
        return [f"[{d.urgency}] {d.text}" for d in self.details]


# --- rules ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rules:
    raw: Mapping[str, Any]

    @property
    def min_top_probability(self) -> float:
        return float(self.raw["confidence"]["min_top_probability"])

    def suspicion(self, code: str, category: str) -> tuple[float, str] | None:
        """(threshold, urgency) when ``code`` counts as suspected cancer/precancer, else None."""
        s = self.raw["suspicion"]
        if code in s["per_condition"]:
            r = s["per_condition"][code]
            return float(r["threshold"]), r["urgency"]
        if category in s["default_threshold"]:
            return float(s["default_threshold"][category]), s["default_urgency"][category]
        return None

    def serious(self, code: str) -> tuple[float, str] | None:
        r = self.raw["serious_conditions"]["per_condition"].get(code)
        return (float(r["threshold"]), r["urgency"]) if r else None


def _urgencies(raw: Mapping[str, Any]) -> Iterable[str]:
    s = raw["suspicion"]
    yield from s["default_urgency"].values()
    yield from (r["urgency"] for r in s["per_condition"].values())
    yield from (r["urgency"] for r in raw["serious_conditions"]["per_condition"].values())
    yield from (r["urgency"] for r in raw["ai_flags"].values())
    yield from (r["urgency"] for r in raw["red_flags"])
    hints = raw["urgency_hints"]
    yield hints["review_at_or_above"]
    yield from hints["signs"].values()
    yield from (c["urgency"] for c in hints["combinations"])
    for key in ("confidence", "disagreement", "photo_quality", "patient_requested"):
        yield raw[key]["urgency"]


def load_rules(path: Path = RULES_PATH) -> Rules:
    raw = json.loads(path.read_text(encoding="utf-8"))
    bad = sorted({u for u in _urgencies(raw) if u not in URGENCY_SLA})
    if bad:
        raise ValueError(f"triage rules use urgencies without an SLA: {bad}")
    return Rules(raw)


@functools.lru_cache(maxsize=1)
def default_rules() -> Rules:
    return load_rules()


# --- history red flags ------------------------------------------------------------------------
def _answer(history: Mapping[str, Any], name: str) -> str:
    value = history.get(name)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return fold(str(value)) if value is not None else ""


def _mentions(text: str, keyword: str) -> bool:
    """Keyword (folded) as a phrase, or as the start of a word (stems: "bleed" ~ "bleeding")."""
    kw = fold(keyword)
    if not kw:
        return False
    if " " in kw:
        return f" {kw}" in f" {text} "
    return any(word.startswith(kw) for word in text.split())


def _condition_holds(cond: Mapping[str, Any], history: Mapping[str, Any], text: str) -> bool:
    if "all" in cond:
        return all(_condition_holds(c, history, text) for c in cond["all"])
    if "field" in cond:
        return _answer(history, cond["field"]) in {fold(v) for v in cond["equals"]}
    if "free_text_any" in cond:
        return any(_mentions(text, kw) for kw in cond["free_text_any"])
    if "free_text_all" in cond:
        return all(any(_mentions(text, kw) for kw in group) for group in cond["free_text_all"])
    raise ValueError(f"red flag without a condition: {cond}")


def red_flags(history: Mapping[str, Any], rules: Rules | None = None) -> list[Reason]:
    rules = rules or default_rules()
    text = fold(str(history.get("free_text") or ""))
    return [
        Reason(RED_FLAG, f"red_flag:{rf['id']}", rf["urgency"], rf["text"])
        for rf in rules.raw["red_flags"]
        if _condition_holds(rf, history, text)
    ]


# --- decide ---------------------------------------------------------------------------------------
def _prob(entry: Mapping[str, Any]) -> float:
    try:
        return float(entry.get("probability") or 0.0)
    except (TypeError, ValueError):
        return 0.0


def _prediction_reasons(p: PredictionLike, vocab: Vocabulary, rules: Rules) -> list[Reason]:
    out: list[Reason] = []
    for entry in p.differential:
        code, prob = str(entry.get("code")), _prob(entry)
        if code not in vocab:
            continue
        condition = vocab.get(code)
        suspicion = rules.suspicion(code, condition.category)
        if suspicion and prob >= suspicion[0]:
            out.append(Reason(MALIGNANCY_SUSPECTED, f"{p.engine}:{code}>={suspicion[0]:g}", suspicion[1],
                              f"{p.engine} rates {condition.name('en')} at {prob:.0%} (review from {suspicion[0]:.0%})."))
        serious = rules.serious(code)
        if serious and prob >= serious[0]:
            out.append(Reason(URGENT_CONDITION, f"{p.engine}:{code}>={serious[0]:g}", serious[1],
                              f"{p.engine} rates {condition.name('en')} at {prob:.0%}; it needs prompt clinical care."))
    top = p.differential[0]
    top_code, top_prob = str(top.get("code")), _prob(top)
    if top_code not in vocab:
        out.append(Reason(AI_UNUSABLE, f"{p.engine}:unknown_code", "routine",
                          f"{p.engine} named a condition outside the vocabulary ({top_code!r})."))
    if top_prob < rules.min_top_probability:
        out.append(Reason(LOW_CONFIDENCE, f"{p.engine}:top<{rules.min_top_probability:g}",
                          rules.raw["confidence"]["urgency"],
                          f"{p.engine}'s most likely condition has only {top_prob:.0%} "
                          f"(below {rules.min_top_probability:.0%})."))
    return out


def _flag_reasons(predictions: Sequence[PredictionLike], rules: Rules, vocab: Vocabulary) -> list[Reason]:
    out = []
    known = rules.raw["ai_flags"]
    for p in predictions:
        for flag in p.flags:
            code = flag.removeprefix("suspect:")
            if flag.startswith("suspect:") and code in vocab:
                # the model's own validated operating point (e.g. melanoma at >= 90 % sensitivity)
                condition = vocab.get(code)
                suspicion = rules.suspicion(code, condition.category)
                urgency = suspicion[1] if suspicion else condition.default_urgency
                out.append(Reason(MALIGNANCY_SUSPECTED, f"{p.engine}:{code}:operating_point", urgency,
                                  f"{p.engine} rates {condition.name('en')} above its validated threshold."))
            if flag in known:
                out.append(Reason(AI_UNUSABLE, f"flag:{flag}", known[flag]["urgency"], known[flag]["text"]))
        if not p.differential:
            out.append(Reason(AI_UNUSABLE, f"{p.engine}:empty", "routine", f"{p.engine} returned no differential."))
    hint_rules = rules.raw["urgency_hints"]
    limit = URGENCY_PRIORITY[hint_rules["review_at_or_above"]]
    for p in predictions:
        hints = set(p.urgency_hints)
        for hint in p.urgency_hints:
            if hint in URGENCY_PRIORITY and URGENCY_PRIORITY[hint] <= limit:
                out.append(Reason(AI_URGENCY_HINT, f"{p.engine}:hint:{hint}", hint,
                                  f"{p.engine} suggests the case is {hint}."))
            elif hint in hint_rules["signs"]:
                level = hint_rules["signs"][hint]
                out.append(Reason(AI_URGENCY_HINT, f"{p.engine}:sign:{hint}", level,
                                  f"{p.engine} sees a warning sign: {hint.replace('_', ' ')}."))
        for combo in hint_rules["combinations"]:
            if set(combo["all"]) <= hints:
                out.append(Reason(AI_URGENCY_HINT, f"{p.engine}:signs:{'+'.join(combo['all'])}", combo["urgency"],
                                  f"{p.engine} sees {combo['text']}."))
    return out


def _disagreement(usable: Sequence[PredictionLike], rules: Rules) -> list[Reason]:
    by_engine = {p.engine: str(p.differential[0].get("code")) for p in usable}
    if "classifier" in by_engine and "vlm" in by_engine and by_engine["classifier"] != by_engine["vlm"]:
        return [Reason(ENGINES_DISAGREE, "classifier!=vlm", rules.raw["disagreement"]["urgency"],
                       f"The classifier's top condition ({by_engine['classifier']}) differs from the "
                       f"VLM's ({by_engine['vlm']}).")]
    return []


def decide(
    predictions: Sequence[PredictionLike],
    history: Mapping[str, Any] | None,
    *,
    photo_quality_failed: bool,
    patient_requested: bool,
    vocab: Vocabulary | None = None,
    rules: Rules | None = None,
) -> TriageDecision:
    """Apply the triage rules. No rule firing means routine and no review."""
    vocab = vocab or load_vocabulary()
    rules = rules or default_rules()
    history = history or {}
    usable = [p for p in predictions if p.differential]

    details: list[Reason] = []
    if not predictions:
        details.append(Reason(AI_UNUSABLE, "no_prediction", "routine", "No AI engine produced a result."))
    for p in usable:
        details.extend(_prediction_reasons(p, vocab, rules))
    details.extend(_flag_reasons(predictions, rules, vocab))
    details.extend(_disagreement(usable, rules))
    details.extend(red_flags(history, rules))
    if photo_quality_failed:
        details.append(Reason(PHOTO_QUALITY, "photo_quality", rules.raw["photo_quality"]["urgency"],
                              "The photos stayed below the quality bar after the patient was asked to retake them."))
    if patient_requested:
        details.append(Reason(PATIENT_REQUESTED, "patient_requested", rules.raw["patient_requested"]["urgency"],
                              "The patient asked for a dermatologist."))

    if not details:
        return TriageDecision(review=False, urgency="routine", reasons=[], details=[])
    details.sort(key=lambda d: URGENCY_PRIORITY[d.urgency])  # stable: rule order kept within a level
    urgency = details[0].urgency
    reasons = list(dict.fromkeys(d.code for d in details))
    return TriageDecision(review=True, urgency=urgency, reasons=reasons, details=details)


def driving_condition(differential: Sequence[Mapping[str, Any]], urgency: str, flags: Iterable[str] = (),
                      vocab: Vocabulary | None = None, rules: Rules | None = None) -> str | None:
    """The candidate condition whose rule raised the case to ``urgency``, for advice about it.

    Among the candidates at or above their suspicion / serious-condition threshold (or flagged by
    the model's own operating point) the one with the most urgent rule wins, then the likelier one.
    None when no condition rule fired at ``urgency`` (then a red flag, low confidence, ... set it).
    """
    vocab = vocab or load_vocabulary()
    rules = rules or default_rules()
    flagged = {f.removeprefix("suspect:") for f in flags if f.startswith("suspect:")}
    fired: list[tuple[int, float, str]] = []
    for entry in differential:
        code, prob = str(entry.get("code")), _prob(entry)
        if code not in vocab:
            continue
        for rule in (rules.suspicion(code, vocab.get(code).category), rules.serious(code)):
            if rule and (prob >= rule[0] or code in flagged):
                fired.append((URGENCY_PRIORITY[rule[1]], -prob, code))
    fired.sort()
    if fired and fired[0][0] == URGENCY_PRIORITY.get(urgency):
        return fired[0][2]
    return None
