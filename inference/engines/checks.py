"""Checks on what models emit and on how patient text enters prompts (issue 21, "output checks as data").

- The diagnosis answer: a pydantic schema that tolerates what real models emit (prose or code fences
  around the JSON, extra keys such as ``reason``, ``null`` features, numbers as strings) and still
  rejects what is unsafe to use (probabilities outside 0..1 or given as booleans, no differential,
  more than 8 items, conditions outside the vocabulary).
- The follow-up reply: :func:`check_reply` against the patterns in ``prompts/guardrails.json``
  (no dosing, no definitive diagnosis, no "you do not need a doctor", no leaked prompt, readable
  text) and against the case's own conditions; a failing reply is replaced by a canned safe text.
- Patient text (and anything else that is data, not instructions) enters prompts through
  :func:`quote_data`: JSON-quoted, one line, inside markers the text itself cannot contain.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inference.engines.guardrails import GuardRails


class AnswerRejected(ValueError):
    """The model's answer is not usable; the message is fed back in the repair prompt."""


# --- the diagnosis answer -----------------------------------------------------------------------
class DifferentialItem(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)  # e.g. a "reason" per item
    condition: str = Field(min_length=1, max_length=120)
    probability: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)

    @field_validator("probability", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if isinstance(value, bool):  # true/false is no probability (pydantic would read 1.0/0.0)
            raise ValueError("probability must be a number between 0 and 1")
        if isinstance(value, str) and value.strip().endswith("%"):  # "60%" is what it says
            return float(value.strip()[:-1]) / 100
        return value


class VLMDiagnosis(BaseModel):
    model_config = ConfigDict(extra="ignore")
    differential: list[DifferentialItem] = Field(min_length=1, max_length=8)
    features: dict[str, str] = Field(default_factory=dict)
    urgency_hints: list[str] = Field(default_factory=list, max_length=10)
    advice: str = Field(default="", max_length=600)

    @field_validator("features", mode="before")
    @classmethod
    def _features(cls, value: Any) -> Any:
        if value is None:
            return {}
        if isinstance(value, dict):  # null / empty features are dropped, numbers and lists become text
            return {str(k): (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
                    for k, v in value.items() if v not in (None, "", [], {})}
        return value

    @field_validator("urgency_hints", mode="before")
    @classmethod
    def _hints(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if isinstance(value, list):
            return [h for h in value if isinstance(h, str)]
        return value

    @field_validator("advice", mode="before")
    @classmethod
    def _advice(cls, value: Any) -> Any:
        return "" if value is None else value


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every top-level JSON object in ``text``, in order (prose, code fences and stray braces around
    them are skipped: a ``{`` in prose before the answer does not hide it)."""
    decoder = json.JSONDecoder()
    found, i = [], text.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def validate_diagnosis(text: str) -> VLMDiagnosis:
    """The first JSON object in ``text`` that carries a differential, validated; AnswerRejected with a
    reason the model can act on otherwise."""
    objects = json_objects(text)
    if not objects:
        raise AnswerRejected("no complete JSON object found")
    candidate = next((o for o in objects if "differential" in o), objects[0])
    try:
        return VLMDiagnosis.model_validate(candidate)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AnswerRejected(f"invalid JSON answer at {where or 'top level'}: {first['msg']}") from None


# --- patient text in prompts --------------------------------------------------------------------
DATA_OPEN, DATA_CLOSE = "<<<DATA", "DATA>>>"
_MARKERS = re.compile(r"<<<|>>>")


def quote_data(value: Any) -> str:
    """One JSON-quoted line: newlines, quotes and markers in patient text cannot start a new prompt
    line, close the data block or pose as the list of allowed conditions."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return json.dumps(_MARKERS.sub("", text)[:2000], ensure_ascii=False)


def data_block(data: dict[str, Any] | str | None) -> str:
    """A delimited block of data for a prompt: ``key: "quoted value"`` lines between markers."""
    if data is None or data == {} or data == "":
        body = "(none)"
    elif isinstance(data, str):
        body = quote_data(data)
    else:
        body = "\n".join(f"{quote_data(str(k))}: {quote_data(v)}" for k, v in data.items())
    return f"{DATA_OPEN}\n{body}\n{DATA_CLOSE}"


# --- the follow-up reply -------------------------------------------------------------------------
def mentioned_conditions(text: str, vocabulary: Any, ignore: Collection[str] = ()) -> set[str]:
    """Codes of vocabulary conditions the text names (any name or synonym of 4+ letters, either language)."""
    from inference.vocabulary import fold

    padded = f" {fold(text)} "
    return {c.code for c in vocabulary
            if any(f" {t} " in padded for t in c.terms() if len(t) >= 4 and t not in ignore)}


_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_NOT_PROSE = re.compile(r"[{}\[\]<>|\\\ufffd\x00-\x08\x0b-\x1f]")  # code, markup, control bytes


def _readable(text: str) -> bool:
    """Sentences, not decoding garbage: enough words, mostly letters, no code or control characters, no
    endless tokens, at least one finished sentence."""
    words = _WORD.findall(text)
    if len(words) < 3 or _NOT_PROSE.search(text) or not re.search(r"[.!?]", text):
        return False
    letters = sum(len(w) for w in words)
    if letters / max(1, len(text.replace(" ", ""))) < 0.7:
        return False
    return max(len(w) for w in text.split()) <= 40


def check_reply(text: str, rails: GuardRails, *, allowed_codes: Collection[str] | None = None,
                vocabulary: Any | None = None) -> list[str]:
    """Why a model's follow-up reply must not reach the patient (empty: it may)."""
    problems = []
    if not text.strip():
        return ["empty"]
    if rails.answer_gives_dosing(text):
        problems.append("dosing")
    for kind, patterns in rails.answer_checks.items():
        if any(p.search(text) for p in patterns):
            problems.append(kind)
    if not _readable(text):
        problems.append("unreadable")
    if vocabulary is not None and allowed_codes is not None:
        off_case = mentioned_conditions(text, vocabulary, rails.off_case_ignore) - set(allowed_codes)
        if off_case:
            problems.append("off_case")
    return problems
