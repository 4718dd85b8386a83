"""Accounts and the decision service behind the review console (SQLite and PostgreSQL)."""

from __future__ import annotations

import importlib.util
from datetime import timedelta

import pyotp
import pytest
from click.testing import CliRunner
from sqlalchemy import select

from clinic_db import clinicians, outbox, review
from clinic_db.models import AuditEvent, Case, CaseMessage, Clinician, FhirResource, OutboxMessage, ReviewTask, utcnow
from console import demo
from console.cli import clinician_command

PASSWORD = "correct horse battery"


def _derm(clinic, session, username: str = "ada") -> Clinician:  # type: ignore[no-untyped-def]
    c, _ = clinicians.create(clinic, session, username, display_name=f"Dr. {username}", role="dermatologist",
                             password=PASSWORD)
    return c


def _melanoma_case(clinic, session, telegram_id: int = 7001) -> demo.ReviewCase:  # type: ignore[no-untyped-def]
    return demo.review_case(
        clinic, session, telegram_id=telegram_id, urgency="urgent", reasons=["malignancy_suspected"],
        differential=[{"code": "nevus", "probability": 0.3}, {"code": "melanoma", "probability": 0.7}],
        history={"body_site": "back"},
    )


# --- accounts --------------------------------------------------------------------------------

def test_password_is_argon2_hashed_and_verified(clinic) -> None:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        c = _derm(clinic, s)
        s.commit()
        assert c.password_hash.startswith("$argon2id$") and PASSWORD not in c.password_hash
        assert clinicians.verify(clinic, s, "ADA", PASSWORD).ok  # usernames are case-insensitive
        assert clinicians.verify(clinic, s, "ada", "wrong password!").reason == "bad_credentials"
        assert clinicians.verify(clinic, s, "nobody", PASSWORD).reason == "bad_credentials"


def test_weak_password_and_bad_role_are_refused(clinic) -> None:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        with pytest.raises(clinicians.AccountError, match="at least 12"):
            clinicians.create(clinic, s, "bob", display_name="Bob", role="dermatologist", password="short")
        with pytest.raises(clinicians.AccountError, match="role"):
            clinicians.create(clinic, s, "bob", display_name="Bob", role="nurse", password=PASSWORD)


def test_five_failures_lock_the_account_for_fifteen_minutes(clinic) -> None:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        _derm(clinic, s)
        for _ in range(4):
            assert clinicians.verify(clinic, s, "ada", "not the password").reason == "bad_credentials"
        fifth = clinicians.verify(clinic, s, "ada", "not the password")
        assert fifth.reason == "locked"
        assert timedelta(minutes=14) < fifth.locked_until - utcnow() <= timedelta(minutes=15)
        # even the right password is refused while locked
        assert clinicians.verify(clinic, s, "ada", PASSWORD).reason == "locked"
        # after the lock runs out, the right password works again
        c = clinicians.by_username(s, "ada")
        c.locked_until = utcnow() - timedelta(seconds=1)
        assert clinicians.verify(clinic, s, "ada", PASSWORD).ok
        s.commit()
        denied = s.scalars(select(AuditEvent).where(AuditEvent.action == "auth.lockout")).all()
        assert len(denied) == 1


def test_totp_second_factor(clinic) -> None:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        c, uri = clinicians.create(clinic, s, "eve", display_name="Dr. Eve", role="dermatologist",
                                   password=PASSWORD, totp=True)
        s.commit()
        assert uri and uri.startswith("otpauth://totp/")
        secret = pyotp.parse_uri(uri).secret
        assert secret not in c.totp_secret  # stored sealed, not in clear
        assert clinicians.verify(clinic, s, "eve", PASSWORD).reason == "totp_required"
        assert clinicians.verify(clinic, s, "eve", PASSWORD, "000000" if pyotp.TOTP(secret).now() != "000000"
                                 else "111111").reason == "bad_totp"
        assert clinicians.verify(clinic, s, "eve", PASSWORD, pyotp.TOTP(secret).now()).ok


def test_cli_adds_and_lists_clinicians(clinic) -> None:  # type: ignore[no-untyped-def]
    runner = CliRunner()
    result = runner.invoke(clinician_command, ["add", "ada", "--name", "Dr. Ada Weber", "--password-stdin"],
                           input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(clinician_command, ["add", "root", "--name", "Ops", "--role", "admin",
                                               "--password-stdin", "--totp"], input=PASSWORD + "\n")
    assert result.exit_code == 0 and "otpauth://totp/" in result.output
    dup = runner.invoke(clinician_command, ["add", "ada", "--name", "x", "--password-stdin"], input=PASSWORD + "\n")
    assert dup.exit_code != 0 and "taken" in dup.output
    listing = runner.invoke(clinician_command, ["list"])
    assert "ada\tdermatologist\tactive\tpassword\tDr. Ada Weber" in listing.output
    assert "root\tadmin\tactive\ttotp" in listing.output
    assert runner.invoke(clinician_command, ["lock", "ada"]).exit_code == 0
    assert "ada\tdermatologist\tinactive" in runner.invoke(clinician_command, ["list"]).output
    with clinic.session() as s:
        assert not clinicians.verify(clinic, s, "ada", PASSWORD).ok


# --- decisions -------------------------------------------------------------------------------

def test_accept_signs_the_case_and_writes_the_final_message(any_clinic) -> None:  # type: ignore[no-untyped-def]
    clinic = any_clinic
    with clinic.session() as s:
        ada = _derm(clinic, s)
        rc = _melanoma_case(clinic, s)
        s.commit()
        assert review.claim(s, rc.task.id, ada.id)
        s.refresh(rc.task)
        review.decide(clinic, s, rc.task, ada, "accept", urgency="urgent", recommendation="urgent_in_person",
                      note="Please book an appointment this week.")
        s.commit()
    with clinic.session() as s:
        task = s.get(ReviewTask, rc.task.id)
        case = s.get(Case, rc.case.id)
        assert (case.status, case.condition_code, case.urgency) == ("final", "melanoma", "urgent")
        assert (task.status, task.decision, task.decided_by) == ("decided", "accept", ada.id)
        assert task.decision_condition_code == "melanoma" and task.recommendation == "urgent_in_person"
        assert b"appointment" not in task.note_enc  # encrypted at rest
        assert clinic.vault.get_text(s, task, "note", owner=case.patient_id) == "Please book an appointment this week."
        finals = s.scalars(select(OutboxMessage).where(OutboxMessage.kind == "final")).all()
        assert len(finals) == 1
        assert outbox.payload(clinic, s, finals[0]) == {"case_id": str(case.id), "task_id": str(task.id)}
        assert s.scalar(select(AuditEvent).where(AuditEvent.action == "review.decide")).detail["decision"] == "accept"
        if importlib.util.find_spec("fhir.publish") is not None:  # published in the same transaction
            assert s.scalar(select(FhirResource).where(FhirResource.case_id == case.id)) is not None


def test_amend_needs_a_vocabulary_condition_and_a_recommendation(any_clinic) -> None:  # type: ignore[no-untyped-def]
    clinic = any_clinic
    with clinic.session() as s:
        ada = _derm(clinic, s)
        rc = _melanoma_case(clinic, s)
        s.commit()
        review.claim(s, rc.task.id, ada.id)
        s.refresh(rc.task)
        with pytest.raises(review.DecisionError) as bad:
            review.decide(clinic, s, rc.task, ada, "amend", condition_code="<script>", urgency="soon",
                          recommendation="see_gp")
        assert bad.value.code == "bad_condition"
        with pytest.raises(review.DecisionError) as bad:
            review.decide(clinic, s, rc.task, ada, "amend", condition_code="nevus", urgency="soon",
                          recommendation="dermatologist_within_days:365")
        assert bad.value.code == "bad_recommendation"
        review.decide(clinic, s, rc.task, ada, "amend", condition_code="nevus", urgency="routine",
                      recommendation="dermatologist_within_days:30")
        s.commit()
        case = s.get(Case, rc.case.id)
        # the first signature is final even when it amends the AI (FHIR: amended only follows a final)
        assert (case.status, case.condition_code, case.urgency) == ("final", "nevus", "routine")
        assert s.get(ReviewTask, rc.task.id).recommendation == "dermatologist_within_days:30"
        # a later decision on the signed case (e.g. after a red-flag follow-up) amends it
        again = review.open_task(s, case, urgency="soon", reasons=["red_flag"])
        s.commit()
        assert review.claim(s, again.id, ada.id)
        s.refresh(again)
        review.decide(clinic, s, again, ada, "amend", condition_code="melanoma", urgency="soon",
                      recommendation="dermatologist_within_days:3")
        s.commit()
        assert s.get(Case, rc.case.id).status == "amended"


def test_a_recommendation_that_contradicts_the_urgency_is_refused(any_clinic) -> None:  # type: ignore[no-untyped-def]
    clinic = any_clinic
    with clinic.session() as s:
        ada = _derm(clinic, s)
        rc = _melanoma_case(clinic, s)
        s.commit()
        review.claim(s, rc.task.id, ada.id)
        s.refresh(rc.task)
        for urgency, recommendation in (("urgent", "dermatologist_within_days:7"), ("soon", "self_care"),
                                        ("routine", "urgent_in_person"), ("emergency", "see_gp"),
                                        ("soon", "dermatologist_within_days:14")):
            with pytest.raises(review.DecisionError) as bad:
                review.decide(clinic, s, rc.task, ada, "accept", urgency=urgency, recommendation=recommendation)
            assert bad.value.code == "recommendation_conflict", (urgency, recommendation)
            assert urgency in str(bad.value)
        assert s.get(ReviewTask, rc.task.id).status == "open"  # nothing was signed
        review.decide(clinic, s, rc.task, ada, "accept", urgency="urgent", recommendation="dermatologist_within_days:1")
        s.commit()
        assert s.get(Case, rc.case.id).status == "final"


def test_deciding_needs_a_live_claim(any_clinic) -> None:  # type: ignore[no-untyped-def]
    clinic = any_clinic
    with clinic.session() as s:
        ada, bob = _derm(clinic, s, "ada"), _derm(clinic, s, "bob")
        rc = _melanoma_case(clinic, s)
        s.commit()
        with pytest.raises(review.DecisionError, match="claim"):
            review.decide(clinic, s, rc.task, ada, "accept", recommendation="see_gp")
        assert review.claim(s, rc.task.id, ada.id)
        assert not review.claim(s, rc.task.id, bob.id)  # one winner
        s.refresh(rc.task)
        with pytest.raises(review.DecisionError, match="claim"):
            review.decide(clinic, s, rc.task, bob, "accept", recommendation="see_gp")
        s.rollback()
        assert s.get(Case, rc.case.id).status == "in_review"
        assert s.scalar(select(OutboxMessage).where(OutboxMessage.kind == "final")) is None


def test_request_info_parks_the_task_and_it_returns_to_the_same_dermatologist(any_clinic) -> None:  # type: ignore[no-untyped-def]
    clinic = any_clinic
    with clinic.session() as s:
        ada, bob = _derm(clinic, s, "ada"), _derm(clinic, s, "bob")
        rc = _melanoma_case(clinic, s)
        s.commit()
        review.claim(s, rc.task.id, ada.id)
        s.refresh(rc.task)
        with pytest.raises(review.DecisionError, match="patient should send"):
            review.decide(clinic, s, rc.task, ada, "request_info")
        review.decide(clinic, s, rc.task, ada, "request_info", note="Please send a close-up with a ruler.")
        s.commit()
        task = s.get(ReviewTask, rc.task.id)
        assert task.status == "waiting_patient" and task.claimed_by == ada.id
        assert s.get(Case, rc.case.id).status == "in_review"
        msg = s.scalar(select(OutboxMessage).where(OutboxMessage.kind == "request_info"))
        assert outbox.payload(clinic, s, msg) == {"case_id": str(rc.case.id), "task_id": str(task.id)}
        assert not review.claim(s, task.id, bob.id)  # nobody can take it while the patient is away

        assert review.patient_replied(s, rc.case.id) is not None
        s.commit()
        assert not review.claim(s, task.id, bob.id)  # reserved for the asking dermatologist
        assert review.claim(s, task.id, ada.id)
        s.refresh(task)
        review.decide(clinic, s, task, ada, "amend", condition_code="nevus", urgency="routine",
                      recommendation="see_gp")
        s.commit()
        assert s.get(Case, rc.case.id).status == "final"
        # the request is in the case's conversation, in the asker's words
        conversation = s.scalars(select(CaseMessage).where(CaseMessage.case_id == rc.case.id)).all()
        assert [(m.role, m.flags) for m in conversation] == [("clinician", ["request_info"])]
        assert clinic.vault.get_text(s, conversation[0], "text", owner=rc.case.patient_id) == \
            "Please send a close-up with a ruler."


def test_service_figures(clinic) -> None:  # type: ignore[no-untyped-def]
    from console import stats

    now = utcnow()
    with clinic.session() as s:
        ada = _derm(clinic, s)
        waiting = [_melanoma_case(clinic, s, 8000 + i) for i in range(3)]
        for rc, hours in zip(waiting, (1, 2, 30)):
            rc.task.created_at = now - timedelta(hours=hours)
            rc.task.due_at = rc.task.created_at + review.URGENCY_SLA["urgent"]
        for i, decision in enumerate(("accept", "accept", "amend")):
            rc = _melanoma_case(clinic, s, 9000 + i)
            s.commit()
            review.claim(s, rc.task.id, ada.id)
            s.refresh(rc.task)
            review.decide(clinic, s, rc.task, ada, decision, condition_code="nevus", urgency="routine",
                          recommendation="see_gp")
        s.commit()
        figures = stats.compute(s, now=now)
    assert figures.waiting_total == 3 and figures.waiting_by_urgency["urgent"] == 3
    assert figures.overdue == 1  # the one opened 30 h ago with a 24 h SLA
    assert figures.wait_median_h == 2.0 and figures.wait_p90_h == pytest.approx(24.4, abs=0.1)
    assert figures.decided_in_window == 3
    [model] = figures.agreement
    assert (model.model_id, model.accepted, model.amended) == ("skinbridge-classifier", 2, 1)
    assert model.rate == pytest.approx(2 / 3)
    [bar] = stats.agreement_bars(figures.agreement, width=300)
    assert (bar.accepted_w, bar.amended_w, bar.text) == (200.0, 100.0, "67% agreed (2/3)")


def test_telegram_digest_is_phi_free_and_only_for_linked_dermatologists(clinic) -> None:  # type: ignore[no-untyped-def]
    from console import telegram_review

    runner = CliRunner()
    with clinic.session() as s:
        _derm(clinic, s)
        made = demo.seed_queue(clinic, s)
        s.commit()
    assert runner.invoke(clinician_command, ["link-telegram", "ada", "4242"]).exit_code == 0
    with clinic.session() as s:
        assert telegram_review.find(clinic, s, 9999) is None
        ada = telegram_review.find(clinic, s, 4242)
        assert ada is not None and ada.telegram_index and "4242" not in ada.telegram_index
        review.claim(s, made[1].task.id, ada.id)
        text = telegram_review.digest(s, ada, "https://clinic.example/console/")
    assert text.splitlines() == [
        "Review queue: 3 open, 0 waiting for patients.",
        "- urgent: 1 (1 overdue), oldest waiting 30 h",
        "- soon: 1, oldest waiting 5 h",
        "- routine: 1, oldest waiting 2 h",
        "You hold 1 case(s).",
        "Open the console to review: https://clinic.example/console/queue",
    ]
    for rc in made:  # nothing identifying or clinical leaves for Telegram
        assert str(rc.case.id)[:8] not in text and str(rc.task.id)[:8] not in text
    assert "melanoma" not in text.lower() and "acne" not in text.lower()


def test_a_red_flag_after_signing_reaches_the_queue_and_amends(any_clinic) -> None:  # type: ignore[no-untyped-def]
    """A follow-up with a red flag on a signed case opens a new urgent task; deciding it amends the report."""
    from inference.pipeline import request_review
    from inference.triage import RED_FLAG

    clinic = any_clinic
    with clinic.session() as s:
        ada = _derm(clinic, s)
        rc = _melanoma_case(clinic, s)
        s.commit()
        assert review.claim(s, rc.task.id, ada.id)
        s.refresh(rc.task)
        review.decide(clinic, s, rc.task, ada, "accept", urgency="urgent", recommendation="urgent_in_person")
        s.commit()
    request_review(rc.case.id, RED_FLAG, urgency="emergency")
    with clinic.session() as s:
        task = s.scalar(select(ReviewTask).where(ReviewTask.case_id == rc.case.id, ReviewTask.status != "decided"))
        assert task is not None and task.urgency == "emergency" and RED_FLAG in task.reasons
        assert s.scalar(select(OutboxMessage).where(OutboxMessage.kind == "review_requested")) is not None
        assert review.claim(s, task.id, ada.id)
        s.refresh(task)
        review.decide(clinic, s, task, ada, "accept", urgency="emergency", recommendation="urgent_in_person")
        s.commit()
        assert s.get(Case, rc.case.id).status == "amended"


def _follow_up(clinic, case, text: str) -> tuple[str, list[str]]:  # type: ignore[no-untyped-def]
    """Run the real follow-up task on ``text`` (no VLM configured: guard rails and vocabulary answer)."""
    from inference import tasks

    with clinic.session() as s:
        row = CaseMessage(case_id=case.id, patient_id=case.patient_id, role="patient", flags=[])
        row.ensure_id()
        clinic.vault.set_text(s, row, "text", text, owner=case.patient_id)
        s.add(row)
        s.commit()
        question_id = str(row.id)
    tasks.answer_followup.apply(args=[str(case.id), question_id], routing_key="cpu").get()
    with clinic.session() as s:
        reply = s.scalars(select(CaseMessage).where(CaseMessage.case_id == case.id, CaseMessage.role == "assistant")
                          .order_by(CaseMessage.created_at.desc()).limit(1)).one()
        return clinic.vault.get_text(s, reply, "text", owner=case.patient_id), list(reply.flags)


@pytest.mark.parametrize("signed_as", ["urgent", "emergency"])
def test_a_follow_up_never_lowers_an_emergency_and_an_emergency_sign_raises_the_review(any_clinic, signed_as) -> None:  # type: ignore[no-untyped-def]
    """Issue 22: "I have a fever and the rash is spreading" makes a history an emergency, but in a follow-up
    it opened an urgent task ("usually within 24 hours"); and a red flag on a case signed as an emergency
    opened an urgent one below it."""
    from bot.render import review_requested_text

    clinic = any_clinic
    with clinic.session() as s:
        ada = _derm(clinic, s)
        rc = _melanoma_case(clinic, s)
        s.commit()
        assert review.claim(s, rc.task.id, ada.id)
        s.refresh(rc.task)
        review.decide(clinic, s, rc.task, ada, "accept", urgency=signed_as, recommendation="urgent_in_person")
        s.commit()
    question = "It bleeds a bit" if signed_as == "emergency" else "I have a fever and the rash is spreading"
    text, flags = _follow_up(clinic, rc.case, question)
    assert "red_flag" in flags and text.startswith("What you describe can be a sign of an emergency: please seek "
                                                   "medical care now")
    with clinic.session() as s:
        task = s.scalar(select(ReviewTask).where(ReviewTask.case_id == rc.case.id, ReviewTask.status != "decided"))
        assert task is not None and task.urgency == "emergency"
        told = review_requested_text("en", review.urgency_now(s, s.get(Case, rc.case.id)))
    assert told.startswith("Please seek medical care now") and "hours" not in told
