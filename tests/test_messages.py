"""The clinical message model (bot.render): every urgency x recommendation x condition x language.

A patient must never read two timeframes that disagree ("within 24 hours" beside "in the next
weeks") or a code ("dermatologist_within_days:7"), in the preliminary result, the signed result,
the "review requested" message, the FHIR conclusion or the PDF.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from bot.i18n import LANGUAGES, catalog
from bot.i18n import t
from bot.render import action_text, final_text, followup_text, result_text, review_requested_text
from clinic_db import review
from inference.followup import answer
from inference.vocabulary import load_vocabulary

URGENCIES = tuple(review.URGENCY_PRIORITY)
RECOMMENDATIONS = [*review.SIMPLE_RECOMMENDATIONS,
                   *(f"{review.WITHIN_DAYS_PREFIX}{n}" for n in range(1, review.MAX_WITHIN_DAYS + 1))]
SLA_HOURS = {u: review.URGENCY_SLA[u].total_seconds() / 3600 for u in URGENCIES}

# every way a timeframe is put in words, in both languages; vague ones ("in the next weeks") count
# as their own value, so they disagree with any other timeframe in the same message
_NUMBER = r"(\d+)(?:-\d+)?"
TIMEFRAMES = [
    (re.compile(rf"\bwithin {_NUMBER} hours?\b"), 1),
    (re.compile(rf"\bwithin {_NUMBER} days?\b"), 24),
    (re.compile(rf"\bwithin {_NUMBER} weeks?\b"), 24 * 7),
    (re.compile(rf"\binnerhalb von {_NUMBER} Stunden\b"), 1),
    (re.compile(rf"\binnerhalb von {_NUMBER} Tag(?:en)?\b"), 24),
    (re.compile(rf"\binnerhalb von {_NUMBER} Wochen\b"), 24 * 7),
]
VAGUE = re.compile(r"within (?:a few |the next |)(?:days|weeks|months)|in the next (?:few )?(?:days|weeks)|"
                   r"innerhalb (?:weniger|von) (?:Tage|Wochen|Monaten)|in den nächsten (?:Tagen|Wochen)", re.I)
CODE = re.compile(r"\b[a-z]+_[a-z_]+\b|:\d|[{}]")


def timeframes(text: str) -> set[float | str]:
    found: set[float | str] = {m.group(0).lower() for m in VAGUE.finditer(text)}
    for pattern, hours in TIMEFRAMES:
        found |= {float(m.group(1)) * hours for m in pattern.finditer(text)}
    return found


def expected(urgency: str, recommendation: str | None = None) -> set[float | str]:
    """The one timeframe the message may name: the recommendation's days, else the urgency's SLA."""
    days = review.within_days(recommendation)
    if days is not None:
        return {24.0 * days}
    if urgency in ("emergency", "routine") or recommendation == "self_care" or \
            (recommendation == "see_gp" and urgency == "routine"):
        return set()  # "now" / "not urgent": no duration at all
    return {SLA_HOURS[urgency]}


def no_code(text: str, *codes: str) -> None:
    leaks = CODE.findall(text) + [c for c in codes if c and c in text]
    assert not leaks, (leaks, text)


VOCAB = load_vocabulary()
CODES = VOCAB.codes


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_signed_decision_reads_as_one_timeframe_and_no_code(lang: str) -> None:
    rendered = 0
    for urgency in URGENCIES:
        for recommendation in RECOMMENDATIONS:
            if not review.recommendation_fits(urgency, recommendation):
                continue  # review.decide refuses it (tests/test_console_review.py)
            want = expected(urgency, recommendation)
            for code in CODES:
                text = final_text(lang, condition_code=code, urgency=urgency, recommendation=recommendation,
                                  note=None)
                assert timeframes(text) == want, (urgency, recommendation, code, text)
                no_code(text, recommendation)  # (snake_case codes are caught by CODE; "acne" is also a word)
                rendered += 1
    # "the list follows the urgency" never leaves a dermatologist without a choice
    assert {u: sum(review.recommendation_fits(u, r) for r in RECOMMENDATIONS) for u in URGENCIES} == \
        {"emergency": 1, "urgent": 3, "soon": 3, "routine": 2 + review.MAX_WITHIN_DAYS - 3}
    assert rendered == len(CODES) * (1 + 3 + 3 + 2 + review.MAX_WITHIN_DAYS - 3)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_preliminary_result_reads_as_one_timeframe_and_no_code(lang: str) -> None:
    for urgency in URGENCIES:
        for top in CODES:
            for second in CODES:
                if second == top:
                    continue
                differential = [{"code": top, "probability": 0.55}, {"code": second, "probability": 0.35}]
                for in_review in (False, True):
                    text = result_text(lang, differential, urgency, in_review=in_review)
                    assert timeframes(text) == expected(urgency), (urgency, top, second, text)
                    no_code(text)
        requested = review_requested_text(lang, urgency)
        # an emergency names no review time: "usually within 4 hours" reads as "wait for us"
        assert timeframes(requested) == (set() if urgency == "emergency" else {SLA_HOURS[urgency]}), requested
        no_code(requested)


NOW = {"en": "seek medical care now", "de": "sofort ärztliche Hilfe"}
ALSO_REVIEWED = {"en": ("will also look", "as a priority"), "de": ("zusätzlich an", "vorrangig")}


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_emergency_message_says_seek_care_now_first_and_never_to_wait(lang: str) -> None:
    """Issue 22: an emergency result said "seek care now" after "a dermatologist will also look at your
    case", and asking for a dermatologist then read "usually within 4 hours"."""
    now = t(lang, "urgency.emergency")
    wait = [t(lang, "result.in_review"), t(lang, "review.requested", sla=t(lang, "sla.emergency"))]
    follow_ups = {"en": ["What can I do?", "It bleeds a bit", "I have a fever and the rash spreads"],
                  "de": ["Was kann ich tun?", "Es blutet etwas", "Ich habe Fieber und der Ausschlag breitet sich aus"]}[lang]
    for top in CODES:
        differential = [{"code": top, "probability": 0.7}, {"code": "eczema" if top != "eczema" else "acne",
                                                           "probability": 0.2}]
        texts = [result_text(lang, differential, "emergency", in_review=in_review) for in_review in (False, True)]
        texts += [final_text(lang, condition_code=top, urgency="emergency", recommendation=r, note=None)
                  for r in ("urgent_in_person", "see_gp", None)]  # a stored pair that does not fit: the urgency
        for question in follow_ups:
            reply = answer(question, differential, lang, urgency="emergency")
            # the sender adds the urgency line to every answer but a red-flag one, which says it itself
            texts.append(followup_text(lang, reply, None if reply.needs_dermatologist else "emergency"))
        for text in texts:
            assert NOW[lang] in text, text
            for later in ALSO_REVIEWED[lang]:  # "a dermatologist will also look" only after "now"
                assert later not in text or text.index(NOW[lang]) < text.index(later), text
            assert not timeframes(text) and not any(w in text for w in wait), text
            assert "No treatment is needed" not in text and "Keine Behandlung nötig" not in text, text
            no_code(text)
    assert review_requested_text(lang, "emergency").startswith(now)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_a_follow_up_answer_gives_advice_only_for_the_urgency_it_was_written_for(lang: str) -> None:
    # "No treatment is needed" (seborrhoeic keratosis) under a result that said "see a doctor within 24 hours"
    for urgency in URGENCIES:
        for top in CODES:
            reply = answer("What can I do?", [{"code": top, "probability": 0.9}], lang, urgency=urgency)
            advice = VOCAB.get(top).advice(lang)
            assert (advice in reply) == (VOCAB.get(top).default_urgency == urgency), (urgency, top, reply)
            assert not timeframes(reply), reply


def test_contradicting_pairs_fall_back_to_the_urgency_never_to_both() -> None:
    # signed before the check existed: the urgency (the safety-relevant half) wins
    text = action_text("en", "urgent", f"{review.WITHIN_DAYS_PREFIX}7")
    assert timeframes(text) == {24.0}


def test_advice_is_about_the_condition_that_drives_the_urgency() -> None:
    # issue 22: a BCC photo whose top guess was "Other harmless skin growth" read "see a doctor within
    # the next few days" beside the harmless growth's "no treatment ... xanthoma ... blood fats"
    differential = [{"code": "benign_growth", "probability": 0.55}, {"code": "basal_cell_carcinoma", "probability": 0.35}]
    en = result_text("en", differential, "soon")
    assert "Please see a doctor within 3 days." in en
    assert "cannot rule out Basal cell carcinoma" in en and "In case it is Basal cell carcinoma:" in en
    assert "xanthoma" not in en and "No treatment" not in en
    de = result_text("de", differential, "soon")
    assert "innerhalb von 3 Tagen" in de and "Xanthome" not in de and "in den nächsten Wochen" not in de
    # a routine top guess keeps its own advice and no "reason" line
    routine = result_text("en", [{"code": "benign_growth", "probability": 0.9}], "routine")
    assert "xanthoma" in routine and "cannot rule out" not in routine
    # raised by something that is not a condition (e.g. a red flag): no self-care advice playing it down
    raised = result_text("en", [{"code": "seborrheic_keratosis", "probability": 0.9}], "urgent")
    assert "No treatment is needed" not in raised and "because of your answers" in raised
    # a cancer below its review threshold: no "needs treatment" advice beside "does not look urgent"
    low = result_text("en", [{"code": "basal_cell_carcinoma", "probability": 0.2}], "routine")
    assert "This does not look urgent" in low and "needs treatment" not in low and "because of" not in low
    # a signed self-care decision never comes with advice that sends the patient to a dermatologist
    signed = final_text("en", condition_code="melanoma", urgency="routine", recommendation="self_care", note=None)
    assert "You can look after this yourself" in signed and "A dermatologist should examine it" not in signed


def test_a_weak_top_guess_is_not_called_most_likely() -> None:
    # "Most likely: Lupus erythematosus – unlikely." read aloud contradicts itself
    weak = [{"code": "lupus_erythematosus", "probability": 0.12}, {"code": "eczema", "probability": 0.1}]
    en = result_text("en", weak, "soon")
    assert "Most likely" not in en
    assert "could not match this well to any condition. Its closest guess, Lupus erythematosus, is less likely." in en
    assert "In case it is Lupus erythematosus: " in en and "What you can do" not in en  # advice only if it is that
    de = result_text("de", weak, "soon")
    assert "Am wahrscheinlichsten" not in de and "nächstliegende Vermutung, Lupus" in de
    strong = result_text("en", [{"code": "psoriasis", "probability": 0.2}], "routine")
    assert "Most likely: Psoriasis – possible." in strong
    assert "What you can do: " in strong


def test_every_condition_advice_is_free_of_timeframes() -> None:
    # the timeframe comes from the urgency; advice in conditions.json must not name its own
    for condition in VOCAB:
        for lang in LANGUAGES:
            assert not timeframes(condition.advice(lang)), (condition.code, lang, condition.advice(lang))


def test_both_languages_have_the_same_templates_with_the_same_fields() -> None:
    en, de = catalog("en"), catalog("de")
    assert set(en) == set(de)
    for key in en:
        assert set(re.findall(r"{(\w+)}", en[key])) == set(re.findall(r"{(\w+)}", de[key])), key


def test_fhir_conclusion_and_pdf_name_no_code_and_a_signed_pdf_is_not_preliminary() -> None:
    from fhir import mapping, report_pdf

    signed_at = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    case = mapping.CaseData(
        case_id="00000000-0000-4000-8000-000000000001", patient_id="00000000-0000-4000-8000-000000000002",
        patient_name=None, patient_language="en", patient_active=True, status="final", urgency="urgent",
        created_at=signed_at, history={"body_site": "back", "bleeding": "yes", "duration": "weeks"},
        decisions=[mapping.DecisionData(
            task_id="t1", decision="amend", condition_code="melanoma", urgency="urgent",
            recommendation=f"{review.WITHIN_DAYS_PREFIX}1", note=None,
            clinician=mapping.ClinicianData(id="c1", username="ada", display_name="Dr. Ada"), decided_at=signed_at)],
    )
    text, _ = mapping.conclusion(case)
    assert "Please see a dermatologist within 24 hours." in text and "Urgency: urgent." in text
    no_code(text, review.WITHIN_DAYS_PREFIX)
    lines = pdf_text(report_pdf.render(case))
    words = "\n".join(lines)
    assert "Urgency: urgent" in words and "Bleeding: yes" in words and "Body site: back" in words
    assert "dermatologist_within_days" not in words and "Preliminary AI assessment" not in words
    assert lines[-1].startswith("Signed by a dermatologist")  # no longer ends calling itself preliminary

    preliminary = pdf_text(report_pdf.render(replace(case, status="preliminary", decisions=[])))
    assert preliminary[-1].startswith("Preliminary AI assessment - not a diagnosis")


def pdf_text(pdf: bytes) -> list[str]:
    """The text lines of an fpdf2 PDF (its page streams are zlib-compressed ``(text) Tj`` operators)."""
    lines = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, re.S):
        try:
            content = zlib.decompress(stream).decode("latin-1")
        except zlib.error:
            continue  # an image
        lines += [m.replace("\\(", "(").replace("\\)", ")") for m in re.findall(r"\((.*?)(?<!\\)\) ?Tj", content)]
    return lines
