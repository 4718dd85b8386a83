"""The condition vocabulary: project codes, SNOMED CT concepts, patient texts (en/de), dataset grouping.

Everything clinical lives in data files under ``inference/data/`` so that a dermatologist can review
and change it without touching code:

- ``conditions.json``: one entry per condition (code, SNOMED CT id + display, category, malignant flag,
  default urgency, names / descriptions / self-care advice and synonyms in English and German);
- ``ham10000_grouping.csv`` (``dx,condition_code``) and ``dermnet_grouping.csv`` (``topic,condition_code``):
  which dataset labels train which condition. They are the single source of that mapping; each
  :class:`Condition` exposes it as ``dataset_labels``.
"""

from __future__ import annotations

import csv
import difflib
import functools
import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DATA_DIR = Path(__file__).resolve().parent / "data"
LANGUAGES = ("en", "de")
CATEGORIES = ("malignant", "premalignant", "benign_tumour", "inflammatory", "infectious", "other")
URGENCIES = ("routine", "soon", "urgent")
Lang = Literal["en", "de"]

# difflib ratio a misspelt word must reach to count as a match (e.g. "melanom" ~ "melanoma")
FUZZY_CUTOFF = 0.84


def fold(text: str) -> str:
    """Case- and diacritic-insensitive form used for matching ("Nävus" -> "naevus", "Ekzem" -> "ekzem")."""
    text = text.casefold().replace("ß", "ss")
    # German umlauts are written ae/oe/ue when the keyboard lacks them: fold both spellings together
    text = text.replace("ä", "ae").replace("ö", "oe").replace("ü", "ue")
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return " ".join(text.split())


@dataclass(frozen=True)
class Condition:
    code: str
    snomed: str
    snomed_display: str
    snomed_match: str  # exact | broader | representative
    snomed_checked: bool
    category: str
    malignant: bool
    default_urgency: str
    names: dict[str, str]
    descriptions: dict[str, str]
    advices: dict[str, str]
    synonyms: dict[str, tuple[str, ...]]
    dataset_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # {"ham10000": (...), "dermnet": (...)}

    def name(self, lang: str = "en") -> str:
        return self.names.get(lang) or self.names["en"]

    def description(self, lang: str = "en") -> str:
        return self.descriptions.get(lang) or self.descriptions["en"]

    def advice(self, lang: str = "en") -> str:
        return self.advices.get(lang) or self.advices["en"]

    @property
    def premalignant(self) -> bool:
        return self.category == "premalignant"

    @property
    def has_training_data(self) -> bool:
        return any(self.dataset_labels.values())

    def terms(self, lang: str | None = None) -> list[str]:
        """Every name and synonym (folded), in one language or all."""
        langs = LANGUAGES if lang is None else (lang,)
        out = [self.code.replace("_", " ")]
        for lg in langs:
            out.append(self.names.get(lg, ""))
            out.extend(self.synonyms.get(lg, ()))
        return [f for f in dict.fromkeys(fold(t) for t in out) if f]


class Vocabulary:
    def __init__(self, conditions: Iterable[Condition]):
        self._by_code: dict[str, Condition] = {}
        for c in conditions:
            if c.code in self._by_code:
                raise ValueError(f"duplicate condition code {c.code!r}")
            self._by_code[c.code] = c
        # folded term -> code. A condition's own code/name beats another's synonym; a term two
        # conditions claim at the same rank is ambiguous and left out of exact lookup.
        index: dict[str, tuple[int, str | None]] = {}
        for c in self._by_code.values():
            own = {fold(c.code.replace("_", " "))} | {fold(n) for n in c.names.values()}
            for term in c.terms():
                rank = 0 if term in own else 1
                prev = index.get(term)
                if prev is None or rank < prev[0]:
                    index[term] = (rank, c.code)
                elif rank == prev[0] and prev[1] != c.code:
                    index[term] = (rank, None)
        self._exact = {t: code for t, (_, code) in index.items() if code is not None}

    # --- lookup -----------------------------------------------------------------------------
    @property
    def codes(self) -> list[str]:
        return list(self._by_code)

    def get(self, code: str) -> Condition:
        """The condition with this code; ``KeyError`` for an unknown one."""
        return self._by_code[code]

    def __contains__(self, code: object) -> bool:
        return code in self._by_code

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._by_code.values())

    def __len__(self) -> int:
        return len(self._by_code)

    def by_snomed(self, sctid: str) -> list[Condition]:
        return [c for c in self._by_code.values() if c.snomed == sctid]

    def classifier_classes(self) -> list[str]:
        """The codes the image classifier is trained on (all with dataset labels), in vocabulary order."""
        return [c.code for c in self._by_code.values() if c.has_training_data]

    def dataset_grouping(self, dataset: str) -> dict[str, str]:
        """Dataset label -> condition code (``dataset`` is "ham10000" or "dermnet")."""
        return {label: c.code for c in self._by_code.values() for label in c.dataset_labels.get(dataset, ())}

    # --- free text ------------------------------------------------------------------------------
    def match(self, free_text: str) -> Condition | None:
        """Best condition for a free-text name ("mole", "BCC", "Muttermal", "melanom"), or None.

        Order: exact name/synonym (either language) -> a known term contained in the text as whole
        words (longest wins) -> fuzzy match of the text or its words against all terms (difflib).
        """
        q = fold(free_text)
        if not q:
            return None
        if q in self._exact:
            return self._by_code[self._exact[q]]
        padded = f" {q} "
        contained = [t for t in self._exact if f" {t} " in padded]
        if contained:
            return self._by_code[self._exact[max(contained, key=len)]]
        terms = list(self._exact)
        close = difflib.get_close_matches(q, terms, n=1, cutoff=FUZZY_CUTOFF)
        if not close:
            # one misspelt word in a short phrase ("my melanom") — only words long enough to be specific
            words = [w for w in q.split() if len(w) >= 5]
            scored = [(difflib.SequenceMatcher(None, w, t).ratio(), t) for w in words for t in terms if " " not in t]
            scored = [s for s in scored if s[0] >= FUZZY_CUTOFF]
            close = [max(scored)[1]] if scored else []
        return self._by_code[self._exact[close[0]]] if close else None

    def search(self, query: str, lang: str = "en") -> list[Condition]:
        """Conditions for a picker: ranked by how well ``query`` matches their names and synonyms.

        Names in ``lang`` rank above synonyms and names in the other language; prefix matches rank
        above substring matches, which rank above fuzzy ones. An empty query lists all by name.
        """
        q = fold(query)
        if not q:
            return sorted(self._by_code.values(), key=lambda c: fold(c.name(lang)))
        ranked: list[tuple[float, str, Condition]] = []
        for c in self._by_code.values():
            own_name = fold(c.name(lang))
            best = 0.0
            for term in c.terms():
                weight = 1.0 if term == own_name else 0.9
                if term == q:
                    score = 3.0
                elif term.startswith(q) or any(w.startswith(q) for w in term.split()):
                    score = 2.0
                elif q in term:
                    score = 1.5
                elif len(q) >= 4:
                    ratio = difflib.SequenceMatcher(None, q, term).ratio()
                    score = ratio if ratio >= 0.8 else 0.0
                else:
                    score = 0.0
                best = max(best, score * weight)
            if c.code == q.replace(" ", "_"):
                best = max(best, 3.0)
            if best > 0:
                ranked.append((-best, fold(c.name(lang)), c))
        ranked.sort(key=lambda r: (r[0], r[1]))
        return [r[2] for r in ranked]


# --- SNOMED CT identifiers -------------------------------------------------------------------------
# Verhoeff tables (dihedral group D5 multiplication, permutation): an SCTID ends in a Verhoeff check
# digit, which catches every single-digit typo and every swap of adjacent digits.
_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 2, 3, 4, 0, 6, 7, 8, 9, 5), (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7), (4, 0, 1, 2, 3, 9, 5, 6, 7, 8), (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2), (7, 6, 5, 9, 8, 2, 1, 0, 4, 3), (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (1, 5, 7, 6, 2, 8, 3, 0, 9, 4), (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7), (9, 4, 5, 3, 1, 2, 6, 8, 7, 0), (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5), (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def verhoeff_ok(number: str) -> bool:
    """True when the last digit of ``number`` is its Verhoeff check digit."""
    if not number.isdigit():
        return False
    check = 0
    for i, ch in enumerate(reversed(number)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][int(ch)]]
    return check == 0


def valid_concept_sctid(sctid: str) -> bool:
    """6-18 digits, no leading zero, partition identifier 00/10 (a concept), valid Verhoeff check digit."""
    return (sctid.isdigit() and 6 <= len(sctid) <= 18 and sctid[0] != "0"
            and sctid[-3:-1] in ("00", "10") and verhoeff_ok(sctid))


# --- loading ------------------------------------------------------------------------------------
def _read_grouping(path: Path, source_col: str) -> dict[str, list[str]]:
    """condition code -> dataset labels, from a ``<source_col>,condition_code`` CSV."""
    out: dict[str, list[str]] = {}
    if not path.exists():
        return out
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            label, code = row[source_col].strip(), row["condition_code"].strip()
            if label and code:
                out.setdefault(code, []).append(label)
    return out


def _condition(entry: dict, labels: dict[str, tuple[str, ...]]) -> Condition:
    for key in ("name", "description", "advice"):
        missing = [lg for lg in LANGUAGES if not entry[key].get(lg)]
        if missing:
            raise ValueError(f"{entry['code']}: {key} lacks {missing}")
    if entry["category"] not in CATEGORIES:
        raise ValueError(f"{entry['code']}: unknown category {entry['category']!r}")
    if entry["default_urgency"] not in URGENCIES:
        raise ValueError(f"{entry['code']}: unknown urgency {entry['default_urgency']!r}")
    return Condition(
        code=entry["code"], snomed=str(entry["snomed"]), snomed_display=entry["snomed_display"],
        snomed_match=entry.get("snomed_match", "exact"), snomed_checked=bool(entry.get("snomed_checked", False)),
        category=entry["category"], malignant=bool(entry["malignant"]), default_urgency=entry["default_urgency"],
        names=dict(entry["name"]), descriptions=dict(entry["description"]), advices=dict(entry["advice"]),
        synonyms={lg: tuple(v) for lg, v in entry.get("synonyms", {}).items()}, dataset_labels=labels,
    )


def load_from(data_dir: Path) -> Vocabulary:
    doc = json.loads((data_dir / "conditions.json").read_text(encoding="utf-8"))
    ham = _read_grouping(data_dir / "ham10000_grouping.csv", "dx")
    dermnet = _read_grouping(data_dir / "dermnet_grouping.csv", "topic")
    known = {e["code"] for e in doc["conditions"]}
    unknown = (set(ham) | set(dermnet)) - known
    if unknown:
        raise ValueError(f"grouping files name unknown condition codes: {sorted(unknown)}")
    return Vocabulary(
        _condition(e, {"ham10000": tuple(ham.get(e["code"], ())), "dermnet": tuple(dermnet.get(e["code"], ()))})
        for e in doc["conditions"]
    )


@functools.lru_cache(maxsize=1)
def load_vocabulary() -> Vocabulary:
    """The project's vocabulary (parsed once per process)."""
    return load_from(DATA_DIR)
