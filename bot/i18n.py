"""Patient-facing texts in English and German, loaded from bot/locales/<lang>.json (one key set)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

LANGUAGES = ("en", "de")
DEFAULT_LANGUAGE = "en"
LOCALE_DIR = Path(__file__).resolve().parent / "locales"


@functools.lru_cache(maxsize=None)
def catalog(lang: str) -> dict[str, str]:
    with open(LOCALE_DIR / f"{lang}.json", encoding="utf-8") as fh:
        return json.load(fh)


def pick_language(code: str | None) -> str:
    """Map a Telegram client language code ("de-AT", "en-US", None) to a supported language."""
    base = (code or "").split("-")[0].lower()
    return base if base in LANGUAGES else DEFAULT_LANGUAGE


def t(lang: str, key: str, **fields: object) -> str:
    """The text for ``key`` in ``lang`` (English when the language is unknown), formatted with ``fields``."""
    texts = catalog(lang if lang in LANGUAGES else DEFAULT_LANGUAGE)
    text = texts.get(key)
    if text is None:  # a missing key is a bug; fall back to English rather than crash a patient chat
        text = catalog(DEFAULT_LANGUAGE)[key]
    return text.format(**fields) if fields else text


def has(key: str) -> bool:
    return key in catalog(DEFAULT_LANGUAGE)
