"""Triage rules: each rule fires with its reason code and urgency; no rule means routine, no review."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from clinic_db import cases, patients, review
from clinic_db.models import utcnow
from clinic_db.review import URGENCY_SLA
from inference.engines.base import Prediction
from inference.triage import RULES_PATH, decide, load_rules, red_flags

CALM = {"body_site": "arm", "duration": "years", "itch": "no", "bleeding": "no", "growth": "no", "pain": "no"}


def pred(engine: str, *diff: tuple[str, float], flags=(), hints=()) -> Prediction:
    return Prediction(engine=engine, model_id=f"{engine}-test", model_version="1", weights_sha256="0" * 64,
                      differential=[{"code": c, "probability": p} for c, p in diff],
                      flags=list(flags), urgency_hints=list(hints))


def run(predictions, history=None, *, photo_quality_failed=False, patient_requested=False):
    return decide(predictions, CALM if history is None else history,
                  photo_quality_failed=photo_quality_failed, patient_requested=patient_requested)


def test_confident_benign_result_without_red_flags_is_routine_without_review():
    d = run([pred("classifier", ("acne", 0.82), ("rosacea", 0.1))])
    assert (d.review, d.urgency, d.reasons, d.details) == (False, "routine", [], [])


def test_both_engines_agreeing_on_a_benign_condition_needs_no_review():
    d = run([pred("classifier", ("psoriasis", 0.7), ("eczema", 0.2)), pred("vlm", ("psoriasis", 0.8))])
    assert not d.review and d.urgency == "routine"


@pytest.mark.parametrize("prob,review_expected", [(0.15, True), (0.149, False)])
def test_melanoma_threshold_is_015_and_urgent(prob, review_expected):
    d = run([pred("classifier", ("nevus", 1 - prob), ("melanoma", prob))])
    assert d.review is review_expected
    if review_expected:
        assert d.reasons == ["malignancy_suspected"] and d.urgency == "urgent"
        assert d.details[0].rule == "classifier:melanoma>=0.15" and "Melanoma" in d.details[0].text
        assert d.sla == URGENCY_SLA["urgent"] == timedelta(hours=24)


def test_other_cancers_use_their_own_thresholds_and_urgency():
    d = run([pred("classifier", ("seborrheic_keratosis", 0.7), ("basal_cell_carcinoma", 0.26))])
    assert (d.reasons, d.urgency) == (["malignancy_suspected"], "soon")
    assert not run([pred("classifier", ("seborrheic_keratosis", 0.76), ("basal_cell_carcinoma", 0.24))]).review
    ak = run([pred("classifier", ("actinic_keratosis", 0.55), ("seborrheic_keratosis", 0.4))])
    assert (ak.reasons, ak.urgency) == (["malignancy_suspected"], "routine")


def test_suspicion_in_the_vlm_differential_counts_too():
    d = run([pred("classifier", ("nevus", 0.9)), pred("vlm", ("nevus", 0.7), ("melanoma", 0.2))])
    assert "malignancy_suspected" in d.reasons and d.urgency == "urgent"
    assert any(x.rule == "vlm:melanoma>=0.15" for x in d.details)


def test_low_top_probability_routes_to_review():
    d = run([pred("classifier", ("eczema", 0.35), ("psoriasis", 0.33), ("fungal_infection", 0.32))])
    assert (d.review, d.reasons, d.urgency) == (True, ["low_confidence"], "routine")


def test_engines_disagreeing_routes_to_review():
    d = run([pred("classifier", ("acne", 0.8)), pred("vlm", ("rosacea", 0.75))])
    assert (d.review, d.reasons, d.urgency) == (True, ["engines_disagree"], "routine")
    assert "acne" in d.details[0].text and "rosacea" in d.details[0].text


def test_serious_non_cancer_condition_is_an_emergency():
    d = run([pred("classifier", ("bacterial_infection", 0.7), ("necrotising_fasciitis", 0.2))])
    assert (d.reasons, d.urgency) == (["urgent_condition"], "emergency")


@pytest.mark.parametrize("history,urgency,rule", [
    ({**CALM, "bleeding": "yes"}, "soon", "red_flag:bleeding"),
    ({**CALM, "bleeding": True}, "soon", "red_flag:bleeding"),
    ({**CALM, "growth": "yes"}, "soon", "red_flag:growing_or_changing"),
    ({**CALM, "growth": "yes", "duration": "weeks"}, "urgent", "red_flag:rapid_growth"),
    ({**CALM, "growth": "yes", "bleeding": "yes"}, "urgent", "red_flag:bleeding_changing_lesion"),
    ({**CALM, "free_text": "My mole got bigger and darker"}, "soon", "red_flag:changing_mole"),
    ({**CALM, "free_text": "Das Muttermal hat sich verändert"}, "soon", "red_flag:changing_mole"),
    ({**CALM, "free_text": "I have a fever and the rash is spreading"}, "emergency", "red_flag:fever_spreading_rash"),
    ({**CALM, "free_text": "Ich habe Fieber und der Ausschlag breitet sich aus"}, "emergency", "red_flag:fever_spreading_rash"),
    ({**CALM, "free_text": "blisters in my mouth and eyes, skin peeling"}, "emergency", "red_flag:mucosal_blisters_or_peeling"),
    ({**CALM, "free_text": "my tongue swelled up and I have trouble breathing"}, "emergency", "red_flag:throat_swelling"),
])
def test_red_flag_history_answers(history, urgency, rule):
    d = run([pred("classifier", ("eczema", 0.9))], history)
    assert d.review and d.reasons == ["red_flag"] and d.urgency == urgency
    assert d.details[0].rule == rule


def test_harmless_answers_and_text_raise_no_red_flag():
    assert red_flags(CALM) == []
    assert red_flags({**CALM, "growth": "unsure", "free_text": "It itches a bit after showering"}) == []
    assert red_flags({}) == []


def test_poor_photo_and_patient_wish_route_to_review():
    d = run([pred("classifier", ("acne", 0.9))], photo_quality_failed=True)
    assert (d.review, d.reasons, d.urgency) == (True, ["photo_quality"], "routine")
    d = run([pred("classifier", ("acne", 0.9))], patient_requested=True)
    assert (d.review, d.reasons) == (True, ["patient_requested"])


def test_unusable_ai_output_routes_to_review():
    d = run([pred("classifier", ("acne", 0.9)), pred("vlm", flags=["vlm_unparseable"])])
    assert d.review and d.reasons == ["ai_unusable"]
    assert {x.rule for x in d.details} == {"flag:vlm_unparseable", "vlm:empty"}
    assert run([]).reasons == ["ai_unusable"]
    assert run([pred("vlm", ("made_up_disease", 0.9))]).reasons == ["ai_unusable"]


def test_urgency_hints_at_or_above_soon_route_to_review():
    d = run([pred("vlm", ("eczema", 0.9), hints=["urgent"])])
    assert (d.reasons, d.urgency) == (["ai_urgency_hint"], "urgent")
    assert not run([pred("vlm", ("eczema", 0.9), hints=["routine"])]).review


def test_warning_signs_seen_by_the_vlm_route_to_review():
    from inference.engines.guardrails import load_guardrails

    signs = set(load_guardrails().urgency_words)  # the words the VLM prompt allows
    rules = load_rules().raw["urgency_hints"]["signs"]
    assert set(rules) <= signs and signs - set(rules) == {"pain"}  # every sign but pain has a level
    d = run([pred("vlm", ("seborrheic_keratosis", 0.9), hints=["rapid_growth"])])
    assert (d.reasons, d.urgency) == (["ai_urgency_hint"], "urgent")
    assert d.details[0].rule == "vlm:sign:rapid_growth"
    assert run([pred("vlm", ("eczema", 0.9), hints=["bleeding"])]).urgency == "soon"
    assert run([pred("vlm", ("reactive_erythema", 0.9), hints=["fever", "spreading"])]).urgency == "emergency"
    assert not run([pred("vlm", ("eczema", 0.9), hints=["pain"])]).review


def test_most_urgent_reason_wins_and_comes_first():
    d = run([pred("classifier", ("nevus", 0.4), ("melanoma", 0.35)), pred("vlm", ("seborrheic_keratosis", 0.6))],
            {**CALM, "bleeding": "yes"}, patient_requested=True)
    assert d.urgency == "urgent"
    assert d.reasons[0] == "malignancy_suspected"
    assert set(d.reasons) == {"malignancy_suspected", "low_confidence", "engines_disagree", "red_flag", "patient_requested"}
    assert len(d.explain()) == len(d.details) and d.explain()[0].startswith("[urgent]")


def test_rule_urgencies_all_have_an_sla(tmp_path):
    rules = load_rules()
    assert rules.min_top_probability == 0.5
    raw = json.loads(RULES_PATH.read_text())
    raw["suspicion"]["per_condition"]["melanoma"]["urgency"] = "asap"
    bad = tmp_path / "rules.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="asap"):
        load_rules(bad)


def test_decision_opens_a_review_task_due_within_the_sla(clinic):
    d = run([pred("classifier", ("nevus", 0.6), ("melanoma", 0.3))], {**CALM, "bleeding": "yes"})
    with clinic.session() as s:
        patient = patients.register(clinic, s, 4242, consent_version="v1")
        case = cases.open_case(clinic, s, patient)
        before = utcnow()
        task = review.open_task(s, case, urgency=d.urgency, reasons=d.reasons)
        s.commit()
        assert task.urgency == "urgent" and set(task.reasons) == {"malignancy_suspected", "red_flag"}
        assert before + timedelta(hours=23) < task.due_at <= utcnow() + URGENCY_SLA["urgent"]


def test_model_operating_point_flag_sends_melanoma_to_review_even_at_low_probability():
    """The shipped classifier flags melanoma at its validated >= 90 % sensitivity threshold, which
    lies far below the generic rule's probability: the flag alone is enough."""
    d = run([pred("classifier", ("nevus", 0.9), ("melanoma", 0.01), flags=["suspect:melanoma"])])
    assert d.review and "malignancy_suspected" in d.reasons
    assert d.urgency == load_rules().suspicion("melanoma", "malignant")[1]
    calm = run([pred("classifier", ("nevus", 0.9), ("melanoma", 0.01))])
    assert not calm.review
