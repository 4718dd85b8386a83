"""Condition names and search for the console, from ``inference.vocabulary`` when it is installed.

Without the vocabulary the console still works on raw codes (those in the AI differential and
the case's current code), so a deployment missing it degrades instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ConditionOption:
    code: str
    name: str
    malignant: bool | None = None
    default_urgency: str | None = None


def _vocabulary() -> Any | None:
    try:
        from inference.vocabulary import load_vocabulary
    except ModuleNotFoundError as exc:
        if exc.name not in ("inference.vocabulary", "inference"):
            raise
        return None
    return load_vocabulary()


def _option(condition: Any, lang: str) -> ConditionOption:
    return ConditionOption(code=condition.code, name=condition.name(lang), malignant=condition.malignant,
                           default_urgency=condition.default_urgency)


def label(code: str | None, lang: str = "en") -> str:
    """Human name of a condition code (the code itself when unknown)."""
    if not code:
        return "—"
    vocab = _vocabulary()
    if vocab is not None:
        try:
            condition = vocab.get(code)
        except KeyError:
            condition = None
        if condition is not None:
            return f"{condition.name(lang)}"
    return code.replace("_", " ")


def search(query: str, lang: str = "en", limit: int = 20) -> list[ConditionOption]:
    """Conditions matching ``query`` (all of them, by name, for an empty query)."""
    vocab = _vocabulary()
    if vocab is None:
        return []
    query = query.strip()
    if query:
        found = list(vocab.search(query, lang))
    else:
        found = sorted((vocab.get(code) for code in vocab.codes), key=lambda c: c.name(lang).lower())
    return [_option(c, lang) for c in found[:limit]]


def options(extra_codes: list[str], lang: str = "en") -> list[ConditionOption]:
    """Every vocabulary condition (or, without a vocabulary, ``extra_codes``) for the amend form."""
    vocab = _vocabulary()
    if vocab is None:
        return [ConditionOption(code=c, name=c.replace("_", " ")) for c in dict.fromkeys(extra_codes) if c]
    return search("", lang, limit=10_000)


def available() -> bool:
    return _vocabulary() is not None
