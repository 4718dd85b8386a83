"""Guard rails for patient follow-up questions, driven by ``prompts/guardrails.json``.

Checked before the model is asked (a red flag or a dosing question never reaches the model) and
again on the model's answer (inference.engines.checks.check_reply).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "prompts"


@dataclass(frozen=True)
class GuardRails:
    red_flags: dict[str, list[re.Pattern[str]]]
    dosing: list[re.Pattern[str]]
    answer_dosing: list[re.Pattern[str]]
    texts: dict[str, dict[str, str]]
    urgency_words: list[str]
    cancer_question: list[re.Pattern[str]]
    answer_checks: dict[str, list[re.Pattern[str]]]  # kind of problem -> patterns a reply must not match
    off_case_ignore: frozenset[str] = frozenset()

    @classmethod
    def from_file(cls, path: str | Path) -> "GuardRails":
        data = json.loads(Path(path).read_text(encoding="utf-8"))

        def compile_all(patterns: list[str]) -> list[re.Pattern[str]]:
            return [re.compile(p, re.IGNORECASE | re.DOTALL) for p in patterns]

        return cls(
            red_flags={name: compile_all(p) for name, p in data["red_flag_patterns"].items()},
            dosing=compile_all(data["dosing_patterns"]),
            answer_dosing=compile_all(data["answer_dosing_patterns"]),
            texts=data["texts"],
            urgency_words=list(data["urgency_words"]),
            cancer_question=compile_all(data["cancer_question_patterns"]),
            answer_checks={kind: compile_all(p) for kind, p in data["answer_check_patterns"].items()},
            off_case_ignore=frozenset(t.casefold() for t in data.get("off_case_ignore_terms", [])),
        )

    def red_flags_in(self, text: str) -> list[str]:
        return [name for name, pats in self.red_flags.items() if any(p.search(text) for p in pats)]

    def asks_for_dosing(self, question: str) -> bool:
        return any(p.search(question) for p in self.dosing)

    def asks_about_cancer(self, question: str) -> bool:
        return any(p.search(question) for p in self.cancer_question)

    def answer_gives_dosing(self, answer: str) -> bool:
        return any(p.search(answer) for p in self.answer_dosing)

    def text(self, key: str, lang: str) -> str:
        return self.texts.get(lang, self.texts["en"])[key]


@functools.lru_cache(maxsize=4)
def load_guardrails(path: str | None = None) -> GuardRails:
    return GuardRails.from_file(path or PROMPTS_DIR / "guardrails.json")
