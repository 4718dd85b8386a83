"""Model round-trips on SQLite and PostgreSQL, and the case state machine."""

from __future__ import annotations

import pytest

from clinic_db import cases, patients
from clinic_db.audit import Actor
from clinic_db.models import Case
from clinic_db.states import CaseStatus, IllegalTransition, TRANSITIONS, check_transition


def test_patient_case_roundtrip(any_clinic):
    with any_clinic.session() as s:
        p = patients.register(any_clinic, s, 5551234, language="de", consent_version="2026-11", name="Erika")
        case = cases.open_case(any_clinic, s, p)
        cases.set_history(any_clinic, s, case, body_site="back", duration="weeks", bleeding=True, fitzpatrick="III")
        s.commit()
        case_id = case.id
    with any_clinic.session() as s:
        p = patients.find_by_telegram(any_clinic, s, 5551234)
        assert p is not None and p.language == "de" and p.has_consent
        assert any_clinic.vault.get_text(s, p, "name") == "Erika"
        assert patients.telegram_id(any_clinic, s, p) == 5551234
        case = s.get(Case, case_id)
        assert case.status == CaseStatus.received.value
        assert cases.history(any_clinic, s, case)["fitzpatrick"] == "III"
        assert case.created_at.tzinfo is not None


def test_case_transitions_follow_the_state_machine(any_clinic):
    with any_clinic.session() as s:
        p = patients.register(any_clinic, s, 1, consent_version="v1")
        case = cases.open_case(any_clinic, s, p)
        bot = Actor.system("test")
        with pytest.raises(IllegalTransition):
            cases.transition(s, case, CaseStatus.final, bot)
        for target in ("queued", "analysing", "preliminary", "in_review", "final", "amended"):
            cases.transition(s, case, target, bot)
        s.commit()
        assert s.get(Case, case.id).status == "amended"
        with pytest.raises(IllegalTransition):
            cases.transition(s, case, CaseStatus.queued, bot)


def test_stale_transition_is_refused(any_clinic):
    with any_clinic.session() as s:
        p = patients.register(any_clinic, s, 2, consent_version="v1")
        case = cases.open_case(any_clinic, s, p)
        s.commit()
    with any_clinic.session() as a, any_clinic.session() as b:
        ca, cb = a.get(Case, case.id), b.get(Case, case.id)
        cases.transition(a, ca, "queued", Actor.system("a"))
        a.commit()
        with pytest.raises(cases.StaleCase):
            cases.transition(b, cb, "queued", Actor.system("b"))


def test_every_state_is_reachable_and_withdrawn_is_terminal():
    reachable = {CaseStatus.received}
    frontier = [CaseStatus.received]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                frontier.append(nxt)
    assert reachable == set(CaseStatus)
    assert TRANSITIONS[CaseStatus.withdrawn] == frozenset()
    with pytest.raises(IllegalTransition):
        check_transition("preliminary", "final")  # only a dermatologist's review makes a report final


def test_one_result_stands_for_the_case(any_clinic):
    """The VLM's result is preferred when usable; an unparseable VLM falls back to the classifier."""
    with any_clinic.session() as s:
        p = patients.register(any_clinic, s, 3, consent_version="v1")
        case = cases.open_case(any_clinic, s, p)
        common = dict(model_version="1", weights_sha256="0" * 64)
        cases.add_ai_result(any_clinic, s, case, engine="classifier", model_id="clf",
                            differential=[{"code": "nevus", "probability": 0.7}], **common)
        assert cases.preferred_result(s, case).engine == "classifier"
        vlm = cases.add_ai_result(any_clinic, s, case, engine="vlm", model_id="vlm", differential=[],
                                  flags=["vlm_unparseable"], **common)
        assert cases.preferred_result(s, case).engine == "classifier"
        vlm.top_condition_code, vlm.top_probability = "melanoma", 0.5
        assert cases.preferred_result(s, case).engine == "vlm"
