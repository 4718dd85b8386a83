"""Review on the move: linked dermatologists get urgent pushes and view, accept or amend in the bot.

The bot runs as a real process against the Telegram emulator and a real SQLite database. Review
tasks are created with the same clinic_db functions the pipeline uses (``console.demo.review_case``);
no worker is needed. Dermatologists are ordinary console accounts linked with
``console.telegram_review.link`` (what ``skinbridge clinician link-telegram`` does).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pyotp
import pytest
from sqlalchemy import func, select

from bot.emulator import create_app
from clinic_db import clinicians
from clinic_db.models import AuditEvent, Case, KeyValue, OutboxMessage, ReviewTask, utcnow
from console import telegram_review
from console.demo import review_case
from tests.e2e_support import CONTROL, BotProcess, Chat, bot_environment
from tests.support import serve_app, wait_for

PASSWORD = "correct horse battery staple"
ADA, BEN, STRANGER = 7001, 7002, 8001
PATIENT_TG = 900001
PATIENT_NAME = "Erika Mustermann"
DIFFERENTIAL = [{"code": "melanoma", "probability": 0.62}, {"code": "nevus", "probability": 0.31},
                {"code": "seborrheic_keratosis", "probability": 0.07}]


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[str]:
    with serve_app(create_app(tmp_path / "emulator-files")) as url:
        yield url


@pytest.fixture
def bot(clinic, emulator: str, tmp_path: Path) -> Iterator[BotProcess]:  # type: ignore[no-untyped-def]
    process = BotProcess(bot_environment(emulator), tmp_path / "bot.log")
    process.start(emulator)
    yield process
    process.stop()
    print(process.log()[-6000:])  # shown by pytest when the test failed


def dermatologist(clinic, username: str, name: str, telegram_id: int, *, totp: bool = False) -> str | None:  # type: ignore[no-untyped-def]
    """A linked dermatologist account; returns its TOTP secret when it has one."""
    with clinic.session() as session:
        account, _ = clinicians.create(clinic, session, username, display_name=name, role="dermatologist",
                                       password=PASSWORD, totp=totp)
        telegram_review.link(clinic, session, account, telegram_id)
        secret = clinicians.totp_secret(clinic, session, account)
        session.commit()
    return secret


def open_task(clinic, urgency: str, *, telegram_id: int = PATIENT_TG, seed: int = 2) -> tuple[uuid.UUID, uuid.UUID]:  # type: ignore[no-untyped-def]
    """A case the pipeline handed to review; returns (task id, case id)."""
    with clinic.session() as session:
        made = review_case(
            clinic, session, telegram_id=telegram_id, urgency=urgency,
            reasons=["malignancy_suspected"] if urgency == "urgent" else ["patient_requested"],
            differential=DIFFERENTIAL, history={"body_site": "back", "duration": "months", "growth": "yes"},
            description="Asymmetric pigmented lesion.", patient_name=PATIENT_NAME, seed=seed,
        )
        session.commit()
        return made.task.id, made.case.id


def clinician_chat(emulator: str, user_id: int) -> Chat:
    """A linked dermatologist who has started the bot (a bot can only message users who did)."""
    chat = Chat(emulator, user_id)
    chat.text("/start")
    chat.expect_text("Urgent review cases will be pushed here")
    return chat


def ref(task_id: uuid.UUID) -> str:
    return f"ref {task_id.hex[:8]}"


def push_for(chat: Chat, task_id: uuid.UUID) -> dict[str, Any]:
    return chat.expect(lambda m: "New case for review" in (m.get("text") or "") and ref(task_id) in m["text"],
                       f"push for {ref(task_id)}")


def count(clinic, model, *where) -> int:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def row(clinic, model, ident):  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return session.get(model, ident)


def audits(clinic, action: str) -> list[AuditEvent]:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def all_text(chat: Chat) -> str:
    return "\n".join((m.get("text") or m.get("caption") or "") for m in chat.messages())


# --- pushes and /queue ----------------------------------------------------------------------------------
def test_urgent_task_is_pushed_routine_is_not_and_queue_lists_it(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    dermatologist(clinic, "ada", "Dr. Ada Weber", ADA)
    ada = clinician_chat(emulator, ADA)
    routine, _ = open_task(clinic, "routine", telegram_id=900010, seed=1)
    urgent, urgent_case = open_task(clinic, "urgent", seed=2)

    push = push_for(ada, urgent)
    text = push["text"]
    assert "URGENT" in text and "malignancy suspected" in text
    assert "Melanoma 62%" in text and "preliminary" in text
    # no patient identity: no name, no Telegram id, no case id
    assert PATIENT_NAME not in text and str(PATIENT_TG) not in text and str(urgent_case) not in text
    buttons = [b for r in push["reply_markup"]["inline_keyboard"] for b in r]
    assert {b.get("callback_data") for b in buttons} >= {f"cr:view:{urgent.hex}", f"cr:accept:{urgent.hex}",
                                                         f"cr:amend:{urgent.hex}"}
    assert any(b.get("url") == f"http://127.0.0.1:8000/console/tasks/{urgent}" for b in buttons)

    time.sleep(3)  # three more pusher rounds: the routine task must still not be pushed
    assert ref(routine) not in all_text(ada)
    pushed = {k.key for k in _kv(clinic, "clin_push")}
    assert pushed == {str(urgent)}
    assert sum(ref(urgent) in (m.get("text") or "") for m in ada.messages()) == 1  # pushed once

    ada.text("/queue")
    digest = ada.expect_text("Review queue: 2 open")
    assert "urgent: 1" in digest["text"] and "/console/queue" in digest["text"]
    listed = ada.expect(lambda m: ref(urgent) in (m.get("text") or "") and "New case" not in m["text"], "queue entry")
    assert ada.button(listed, "cr:view:") == f"cr:view:{urgent.hex}"


def _kv(clinic, namespace: str) -> list[KeyValue]:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return list(session.scalars(select(KeyValue).where(KeyValue.namespace == namespace)))


# --- view, claim, photos, accept ------------------------------------------------------------------------
def test_view_claims_colleague_is_told_photos_and_accept_signs(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    dermatologist(clinic, "ada", "Dr. Ada Weber", ADA)
    dermatologist(clinic, "ben", "Dr. Ben Okafor", BEN)
    ada, ben = clinician_chat(emulator, ADA), clinician_chat(emulator, BEN)
    patient = Chat(emulator, PATIENT_TG)
    task_id, case_id = open_task(clinic, "urgent")
    patient.text("hello")  # the patient has a chat with the bot, so the final message can reach them
    ada_push, ben_push = push_for(ada, task_id), push_for(ben, task_id)

    ada.tap(ada_push, "cr:view:")
    shown = ada.expect_text("You hold this case now")
    assert "Melanoma — 62%" in shown["text"] and "Mole (melanocytic naevus) — 31%" in shown["text"]
    assert "Body site: back" in shown["text"] and "Growth: yes" in shown["text"]
    assert PATIENT_NAME not in shown["text"]
    ada_id = _clinician_id(clinic, "ada")
    assert row(clinic, ReviewTask, task_id).claimed_by == ada_id
    views = audits(clinic, "case.view")
    assert [(e.actor_id, e.entity_id, e.purpose, e.detail["channel"]) for e in views] == \
        [(str(ada_id), str(case_id), "treatment", "telegram")]

    ben.tap(ben_push, "cr:view:")
    told = ben.expect_text("is being reviewed by Dr. Ada Weber")
    assert "Melanoma" not in told["text"]
    assert row(clinic, ReviewTask, task_id).claimed_by == ada_id  # still Ada's

    ada.tap(shown, "cr:photos:")
    photo = ada.expect(lambda m: m.get("kind") == "photo", "a case photo")
    assert "photo 1/1" in photo["caption"] and (photo["width"], photo["height"]) == (384, 384)  # the stored one
    reads = audits(clinic, "image.read")
    assert [(e.actor_type, e.actor_id, e.purpose) for e in reads] == [("clinician", str(ada_id), "treatment")]

    ada.tap(shown, "cr:accept:")
    ask = ada.expect_text("Recommendation for the patient?")
    assert "Accept: Melanoma, urgency urgent" in ask["text"]
    ada.tap(ask, f"cr:rec:{task_id.hex}:uip")
    confirm = ada.expect_text("Signing makes this the final result")
    assert "Urgent in-person assessment" in confirm["text"]
    ada.tap(confirm, "cr:sign:")
    ada.expect_text(f"Signed {ref(task_id)}")

    case, task = row(clinic, Case, case_id), row(clinic, ReviewTask, task_id)
    assert case.status == "final" and case.condition_code == "melanoma"
    assert (task.status, task.decision, task.decided_by, task.recommendation) == \
        ("decided", "accept", ada_id, "urgent_in_person")
    assert count(clinic, OutboxMessage, OutboxMessage.case_id == case_id, OutboxMessage.kind == "final") == 1
    final = patient.expect_text("A dermatologist has reviewed your case")
    assert "Melanoma" in final["text"]


def _clinician_id(clinic, username: str) -> uuid.UUID:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return clinicians.by_username(session, username).id  # type: ignore[union-attr]


# --- amend to a typed condition -----------------------------------------------------------------------
def test_amend_to_a_typed_condition(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    dermatologist(clinic, "ada", "Dr. Ada Weber", ADA)
    ada = clinician_chat(emulator, ADA)
    task_id, case_id = open_task(clinic, "urgent")
    push = push_for(ada, task_id)

    ada.tap(push, "cr:amend:")  # straight from the push: claims, shows the case, then asks
    ada.expect_text("You hold this case now")
    choose = ada.expect_text("Amend: choose the condition.")
    labels = [b["text"] for r in choose["reply_markup"]["inline_keyboard"] for b in r]
    assert labels[:3] == ["Melanoma (62%)", "Mole (melanocytic naevus) (31%)",
                          "Seborrhoeic keratosis (benign keratosis) (7%)"]
    ada.tap(choose, f"cr:other:{task_id.hex}")
    ada.expect_text("Type the condition's name")
    ada.text("psoriasis")
    found = ada.expect_text("Choose the condition:")
    assert [b["text"] for r in found["reply_markup"]["inline_keyboard"] for b in r][0] == "Psoriasis"
    ada.tap(found, f"cr:cond:{task_id.hex}:0")
    urgency = ada.expect_text("Condition: Psoriasis. Urgency?")
    ada.tap(urgency, f"cr:urg:{task_id.hex}:routine")
    rec = ada.expect_text("Recommendation for the patient?")
    offered = [b["text"] for r in rec["reply_markup"]["inline_keyboard"] for b in r]
    assert offered == ["Self-care (advice only)", "See a general practitioner", "Dermatologist within 7 days",
                       "Dermatologist within 14 days", "Dermatologist within 30 days", "Cancel"]  # what fits routine
    ada.tap(rec, f"cr:rec:{task_id.hex}:d14")
    confirm = ada.expect_text("Amend the assessment")
    assert "Psoriasis" in confirm["text"] and "within 14 days" in confirm["text"]
    ada.tap(confirm, "cr:sign:")
    ada.expect_text(f"Signed {ref(task_id)}: Psoriasis, routine")

    case, task = row(clinic, Case, case_id), row(clinic, ReviewTask, task_id)
    assert (case.status, case.condition_code, case.urgency) == ("final", "psoriasis", "routine")
    assert (task.decision, task.decision_condition_code, task.recommendation) == \
        ("amend", "psoriasis", "dermatologist_within_days:14")
    assert count(clinic, OutboxMessage, OutboxMessage.case_id == case_id, OutboxMessage.kind == "final") == 1


# --- forged buttons ---------------------------------------------------------------------------------------
def test_forged_callback_from_unlinked_user_gets_nothing(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    dermatologist(clinic, "ada", "Dr. Ada Weber", ADA)
    task_id, case_id = open_task(clinic, "urgent")
    stranger = Chat(emulator, STRANGER)
    stranger.text("/start")
    intro = stranger.expect_text("Do you agree?")  # a real bot message in the stranger's chat to attach to
    before = len(stranger.messages())

    for action in ("view", "accept", "photos"):
        _forge_press(emulator, STRANGER, intro, f"cr:{action}:{task_id.hex}")
    wait_for(lambda: len([e for e in audits(clinic, "review.telegram") if e.outcome == "denied"]) == 3,
             timeout=30, message="the bot to drop the three forged presses")
    time.sleep(1)
    assert len(stranger.messages()) == before  # no answer, no photo, no case text
    task = row(clinic, ReviewTask, task_id)
    assert task.claimed_by is None and task.status == "open"
    assert audits(clinic, "image.read") == [] and audits(clinic, "case.view") == []

    # the same forged update from the linked dermatologist does claim: the refusal above is the link check
    ada = Chat(emulator, ADA)
    ada.text("/start")
    ada.expect_text("Urgent review cases will be pushed here")
    welcome = ada.messages()[-1]
    _forge_press(emulator, ADA, welcome, f"cr:view:{task_id.hex}")
    ada.expect_text("You hold this case now")
    assert row(clinic, ReviewTask, task_id).claimed_by == _clinician_id(clinic, "ada")


def _forge_press(emulator: str, user_id: int, message: dict[str, Any], data: str) -> None:
    """A callback_query the client never offered (raw update: the emulator's press only allows real buttons)."""
    update = {"callback_query": {
        "id": str(uuid.uuid4().int % 10**18), "from": {"id": user_id, "is_bot": False, "first_name": "X"},
        "message": {"message_id": message["message_id"], "date": message["date"], "text": message.get("text") or "",
                    "chat": {"id": user_id, "type": "private", "first_name": "X"},
                    "from": {"id": 1, "is_bot": True, "first_name": "bot"}},
        "chat_instance": "1", "data": data,
    }}
    httpx.post(f"{emulator}/_emulator/updates", json=update, headers=CONTROL, timeout=10).raise_for_status()


# --- TOTP before signing ------------------------------------------------------------------------------------
def test_totp_wrong_code_refuses_right_code_signs(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    secret = dermatologist(clinic, "ada", "Dr. Ada Weber", ADA, totp=True)
    assert secret
    ada = clinician_chat(emulator, ADA)
    task_id, case_id = open_task(clinic, "urgent")
    push = push_for(ada, task_id)
    ada.tap(push, "cr:accept:")
    rec = ada.expect_text("Recommendation for the patient?")
    offered = [b["text"] for r in rec["reply_markup"]["inline_keyboard"] for b in r]
    # what fits urgent: a dermatologist within a day is among them, nothing later than the urgency allows
    assert offered == ["See a general practitioner", "Dermatologist within 1 day", "Urgent in-person assessment",
                       "Cancel"]
    ada.tap(rec, f"cr:rec:{task_id.hex}:gp")
    confirm = ada.expect_text("Signing makes this the final result")
    ada.tap(confirm, "cr:sign:")
    ada.expect_text("6-digit code")

    totp = pyotp.TOTP(secret)
    valid = {totp.at(time.time() + step * 30) for step in (-1, 0, 1)}
    wrong = next(code for code in (f"{n:06d}" for n in range(1000)) if code not in valid)
    ada.text(wrong)
    ada.expect_text("Wrong or expired code; not signed")
    assert row(clinic, Case, case_id).status == "in_review"
    assert row(clinic, ReviewTask, task_id).status == "open"
    assert count(clinic, OutboxMessage, OutboxMessage.kind == "final") == 0
    assert [e.outcome for e in audits(clinic, "auth.totp")] == ["denied"]

    ada.text(totp.now())
    ada.expect_text(f"Signed {ref(task_id)}")
    assert row(clinic, Case, case_id).status == "final"
    assert row(clinic, ReviewTask, task_id).recommendation == "see_gp"
    assert count(clinic, OutboxMessage, OutboxMessage.kind == "final") == 1


# --- the data side, without the bot -----------------------------------------------------------------------
def test_pushes_reach_only_the_linked_account_and_skip_claimed_tasks(clinic) -> None:  # type: ignore[no-untyped-def]
    dermatologist(clinic, "ada", "Dr. Ada Weber", ADA)
    task_id, _ = open_task(clinic, "emergency")
    with clinic.session() as session:
        ada = clinicians.by_username(session, "ada")
        assert telegram_review.reachable(clinic, session) == []  # she never wrote to the bot
        telegram_review.remember_chat(clinic, session, ada, ADA)
        assert telegram_review.reachable(clinic, session) == [(ada, ADA)]
        telegram_review.link(clinic, session, ada, 7005)  # relinked to another account: the old chat is stale
        assert telegram_review.reachable(clinic, session) == []
        telegram_review.remember_chat(clinic, session, ada, 7005)
        clinicians.lock(session, ada)  # deactivated: no more pushes
        assert telegram_review.reachable(clinic, session) == []
        session.commit()

        assert [t.id for t in telegram_review.pending_pushes(session)] == [task_id]
        review_task = session.get(ReviewTask, task_id)
        review_task.claimed_by, review_task.claim_expires_at = ada.id, utcnow() + timedelta(minutes=5)
        assert telegram_review.pending_pushes(session) == []  # someone is on it
        review_task.claim_expires_at = utcnow() - timedelta(minutes=1)
        assert [t.id for t in telegram_review.pending_pushes(session)] == [task_id]  # claim lapsed
        telegram_review.mark_pushed(session, review_task, 1)
        assert telegram_review.pending_pushes(session) == []


def test_wrong_codes_lock_signing_like_the_console_login(clinic) -> None:  # type: ignore[no-untyped-def]
    secret = dermatologist(clinic, "ada", "Dr. Ada Weber", ADA, totp=True)
    totp = pyotp.TOTP(secret)
    valid = {totp.at(time.time() + step * 30) for step in (-1, 0, 1)}
    wrong = next(code for code in (f"{n:06d}" for n in range(1000)) if code not in valid)
    with clinic.session() as session:
        ada = clinicians.by_username(session, "ada")
        outcomes = [telegram_review.check_code(clinic, session, ada, wrong) for _ in range(clinicians.MAX_FAILURES)]
        assert outcomes == ["bad_totp"] * (clinicians.MAX_FAILURES - 1) + ["locked"]
        assert telegram_review.check_code(clinic, session, ada, totp.now()) == "locked"  # even the right code
        ada.locked_until = None
        assert telegram_review.check_code(clinic, session, ada, totp.now()) == "ok"
