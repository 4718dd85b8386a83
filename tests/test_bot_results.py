"""What the patient receives through the outbox: progress edits, the preliminary result with AI example
images, follow-up questions, asking for a dermatologist, and the dermatologist's messages.

The bot runs as a real process against the emulator. The database rows the AI workers and the
review console write (AI result, explanation images, outbox messages, review decisions) are
written here with the same clinic_db functions those components use, so this covers the bot's side
without a GPU worker; the full chain with a worker is exercised by the pipeline's own tests.
"""

from __future__ import annotations

import io
import time
import uuid

import pytest
from PIL import Image
from sqlalchemy import select

from clinic_db import cases, outbox
from clinic_db.audit import Actor
from clinic_db.models import Case, CaseMessage, ReviewTask, utcnow
from clinic_db.states import CaseStatus
from tests.support import wait_for
from tests.test_bot_conversation import (  # noqa: F401 - fixtures used by name
    HISTORY,
    BotProcess,
    Chat,
    answer_history,
    bot,
    bot_env,
    consent,
    emulator,
    lesion_photo,
    only_case,
)

DIFFERENTIAL = [{"code": "melanoma", "probability": 0.62}, {"code": "nevus", "probability": 0.30},
                {"code": "seborrheic_keratosis", "probability": 0.08}]


def _png(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (256, 256), color).save(out, "PNG")
    return out.getvalue()


def submitted_case(chat: Chat) -> None:
    consent(chat)
    chat.photo(lesion_photo(11))
    saved = chat.expect_text("Photo saved")
    chat.tap(saved, "photos:done")
    answer_history(chat, HISTORY)
    chat.expect_text("submitted")


def publish_ai_result(clinic, case_id: uuid.UUID) -> None:  # type: ignore[no-untyped-def]
    """What the worker chain leaves behind: status, AI result, example images, outbox messages."""
    system = Actor.system("inference")
    with clinic.session() as session:
        case = session.get(Case, case_id)
        cases.transition(session, case, CaseStatus.analysing, system)
        outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="progress",
                       dedup_key=f"progress:{case.id}:analysing", payload={"case_id": str(case.id), "stage": "analysing"})
        session.commit()
    with clinic.session() as session:
        case = session.get(Case, case_id)
        cases.add_ai_result(clinic, session, case, engine="classifier", model_id="test-classifier", model_version="1",
                            weights_sha256="0" * 64, differential=DIFFERENTIAL)
        for seed, color in ((1, (120, 70, 50)), (2, (90, 50, 40))):
            cases.add_explanation_image(clinic, session, case, condition_code="melanoma", png=_png(color),
                                        model_id="test-generator", seed=seed)
        case.urgency = "urgent"
        case.condition_code = "melanoma"
        cases.transition(session, case, CaseStatus.preliminary, system)
        payload = {"case_id": str(case.id)}
        outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="progress",
                       dedup_key=f"progress:{case.id}:ready", payload=payload | {"stage": "ready"})
        outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="result",
                       dedup_key=f"result:{case.id}", payload=payload)
        outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case.id, kind="pictures",
                       dedup_key=f"pictures:{case.id}", payload=payload)
        session.commit()


def publish_followup_answer(clinic, case_id: uuid.UUID, text: str) -> None:  # type: ignore[no-untyped-def]
    """What the follow-up path leaves behind: the assistant's answer and its outbox message."""
    with clinic.session() as session:
        case = session.get(Case, case_id)
        answer = CaseMessage(case_id=case_id, patient_id=case.patient_id, role="assistant", flags=[])
        answer.ensure_id()
        clinic.vault.set_text(session, answer, "text", text, owner=case.patient_id)
        session.add(answer)
        outbox.enqueue(clinic, session, patient_id=case.patient_id, case_id=case_id, kind="followup_answer",
                       dedup_key=f"followup:{answer.id}",
                       payload={"case_id": str(case_id), "message_id": str(answer.id)})
        session.commit()


def dermatologist_asks(clinic, task_id: uuid.UUID, question: str) -> None:  # type: ignore[no-untyped-def]
    """What the console leaves behind when a dermatologist asks the patient for more information."""
    with clinic.session() as session:
        task = session.get(ReviewTask, task_id)
        task.status = "waiting_patient"
        clinic.vault.set_text(session, task, "note", question, owner=task.case.patient_id)
        outbox.enqueue(clinic, session, patient_id=task.case.patient_id, case_id=task.case_id, kind="request_info",
                       dedup_key=f"request_info:{task.id}:1",
                       payload={"case_id": str(task.case_id), "task_id": str(task.id)})
        session.commit()


def test_result_followup_and_dermatologist(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 2001)
    submitted_case(chat)
    progress = chat.expect_text("received and is waiting")
    case_id = only_case(clinic).id

    publish_ai_result(clinic, case_id)
    ready = chat.expect_text("assessment is ready")
    assert ready["message_id"] == progress["message_id"] and ready["edited"]  # ONE progress message, edited
    album = chat.expect(lambda m: m["kind"] == "media_group", "the example images")
    assert len(album["files"]) == 2
    assert all(c and c.startswith("AI-generated example of Melanoma") for c in album["captions"])
    result = chat.expect_text("Most likely: Melanoma – likely.")
    text = result["text"]
    assert "Other possibilities: Mole (melanocytic naevus) – possible; " in text and "less likely" in text
    assert "within 24 hours" in text  # the urgency triage decided
    assert "Do not scratch or remove it yourself" in text  # the vocabulary's advice
    assert "NOT a diagnosis" in text and "until a dermatologist reviews it" in text
    bot_texts = [m.get("text") or "" for m in chat.messages()]
    assert sum("received and is waiting" in t or "assessment is ready" in t or "analysing" in t for t in bot_texts) == 1

    # a follow-up question is stored on the case and handed to the pipeline
    chat.tap(result, "c:ask:")
    chat.expect_text("Type your question")
    chat.text("Is it dangerous if it itches?")
    chat.expect_text("question was received")
    with clinic.session() as session:
        question = session.scalars(select(CaseMessage).where(CaseMessage.case_id == case_id)).one()
        assert question.role == "patient"
        assert clinic.vault.get_text(session, question, "text", owner=question.patient_id) == "Is it dangerous if it itches?"
    publish_followup_answer(clinic, case_id, "Itching alone does not tell.")
    reply = chat.expect_text("Itching alone does not tell.")
    assert "not a diagnosis" in reply["text"]

    # asking for a dermatologist opens a review task, and the patient hears when to expect it
    chat.tap(reply, "c:doc:")
    chat.expect_text("A dermatologist will review your case (usually within 24 hours)")
    with clinic.session() as session:
        task = session.scalars(select(ReviewTask).where(ReviewTask.case_id == case_id)).one()
        assert "patient_requested" in task.reasons
        assert session.get(Case, case_id).status == CaseStatus.in_review.value
        task_id = task.id

    # the dermatologist asks for more information; the patient's reply goes back to the queue
    dermatologist_asks(clinic, task_id, "Has it changed colour?")
    chat.expect_text("Has it changed colour?")
    chat.text("Yes, darker at the edge.")
    chat.expect_text("answer was added to the case")
    with clinic.session() as session:
        assert session.get(ReviewTask, task_id).status == "open"
        texts = [clinic.vault.get_text(session, m, "text", owner=m.patient_id)
                 for m in session.scalars(select(CaseMessage).where(CaseMessage.case_id == case_id))]
        assert "Yes, darker at the edge." in texts

    # the signed decision
    with clinic.session() as session:
        task = session.get(ReviewTask, task_id)
        task.status, task.decision, task.decided_at = "decided", "accept", utcnow()
        task.decision_condition_code, task.decision_urgency = "melanoma", "urgent"
        clinic.vault.set_text(session, task, "note", "Please book an excision this week.", owner=task.case.patient_id)
        outbox.enqueue(clinic, session, patient_id=task.case.patient_id, case_id=case_id, kind="final",
                       dedup_key=f"final:{task.id}", payload={"case_id": str(case_id), "task_id": str(task.id)})
        session.commit()
    final = chat.expect_text("A dermatologist has reviewed your case.")
    assert "Assessment: Melanoma." in final["text"] and "Please book an excision this week." in final["text"]
    deadline = time.monotonic() + 10  # marked sent right after Telegram accepted it
    while True:
        with clinic.session() as session:
            pending = session.scalars(select(outbox.OutboxMessage.kind).where(outbox.OutboxMessage.status != "sent")).all()
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert pending == []  # every message was delivered and marked sent


def test_german_patient_gets_a_german_result(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 2002, language_code="de")
    chat.text("/start")
    intro = chat.expect_text("Sind Sie einverstanden?")
    chat.tap(intro, "consent:yes")
    chat.expect_text("/new")
    chat.photo(lesion_photo(12))
    saved = chat.expect_text("Foto gespeichert")
    chat.tap(saved, "photos:done")
    answer_history(chat, HISTORY)
    chat.expect_text("übermittelt")
    chat.expect_text("eingegangen")  # the progress message
    publish_ai_result(clinic, only_case(clinic).id)
    album = chat.expect(lambda m: m["kind"] == "media_group", "the example images")
    assert album["captions"][0].startswith("KI-generiertes Beispiel für Melanom")
    result = chat.expect_text("Am wahrscheinlichsten: Melanom")
    assert "KEINE Diagnose" in result["text"] and "24 Stunden" in result["text"]


# Telegram's retry_after for A's message: ample time for B's answer to be stored on a loaded machine, and
# well under the 30 s SQLite waits for a lock (clinic_db.db)
FLOOD_WAIT_S = 8


def pending_outbox(clinic) -> list[str]:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return list(session.scalars(select(outbox.OutboxMessage.kind).where(outbox.OutboxMessage.status != "sent")))


# both kinds write a read audit before the send; the follow-up answer also runs a query after it, which
# would flush that write (and take SQLite's write lock) without the sender's no_autoflush
@pytest.mark.parametrize("kind", ["result", "followup_answer"])
def test_a_message_waiting_out_a_429_holds_up_no_other_patient(  # type: ignore[no-untyped-def]
        clinic, emulator: str, bot: BotProcess, kind: str) -> None:
    """Issue 24, problem 3: the sender waited out Telegram's 429 for one patient's result with a write
    transaction open; on SQLite another patient's answer hung 30 s on the lock, then failed with
    'database is locked', the patient got an error reference and the answer was lost. The sender must
    hold nothing while Telegram makes it wait: B's answer is stored during A's wait, not after it."""
    a = Chat(emulator, 2101)
    submitted_case(a)
    a.expect_text("received and is waiting")
    a_case = only_case(clinic).id
    if kind == "followup_answer":  # A has had the result; the answer to a question about it waits
        publish_ai_result(clinic, a_case)
        a.expect_text("Most likely: Melanoma")
        wait_for(lambda: not pending_outbox(clinic), timeout=30, message="A's result delivered")

    b = Chat(emulator, 2102)
    consent(b)
    b.photo(lesion_photo(12))
    b.tap(b.expect_text("Photo saved"), "photos:done")
    answer_history(b, {"body_site": "arm"})
    question = b.expect(lambda m: "h:duration:" in str(m.get("reply_markup")), "B's second question")
    with clinic.session() as session:
        b_case = session.scalars(select(Case).where(Case.id != a_case)).one().id

    def sent_to_a() -> list[dict]:
        calls = a.http.get("/_emulator/calls", params={"method": "sendMessage"}).json()
        return [c for c in calls if str(c["params"].get("chat_id")) == "2101"]

    # nobody else is sending now: the next sendMessage, A's message, is refused with 429 and waited out
    a.http.delete("/_emulator/calls").raise_for_status()
    a.http.post("/_emulator/fail", json={"method": "sendMessage", "times": 1, "retry_after": FLOOD_WAIT_S}
                ).raise_for_status()
    if kind == "result":
        publish_ai_result(clinic, a_case)
        fragment = "Most likely: Melanoma"
    else:
        fragment = "Itching alone does not tell."
        publish_followup_answer(clinic, a_case, fragment)
    wait_for(sent_to_a, timeout=60, message="A's message to meet the 429")

    b.press(question["message_id"], "h:duration:months")

    def b_answer() -> str | None:
        with clinic.session() as session:
            return cases.history(clinic, session, session.get(Case, b_case)).get("duration")

    def delivered_to_a() -> list[dict]:
        return [m for m in a.messages() if fragment in (m.get("text") or "")]

    assert wait_for(b_answer, timeout=60, message="B's answer in the database") == "months"
    # stored while A's message still waits for Telegram (the old sender let B in only after A's send)
    assert not delivered_to_a(), "B's answer was stored only after A's message was sent: the sender held " \
                                 "the database through the 429"
    # acknowledged once the rate limiter lets the bot talk again, well before SQLite's 30 s lock timeout
    b.expect(lambda m: m["edited"] and "How long have you had it? Months" in (m.get("text") or ""),
             "B's answer acknowledged", timeout=25)
    b.expect(lambda m: "h:itch:" in str(m.get("reply_markup")), "B's next question")

    a.expect_text(fragment)
    wait_for(lambda: not pending_outbox(clinic), timeout=30, message="A's messages marked sent")
    assert len(delivered_to_a()) == 1  # delivered once
    attempts = sent_to_a()
    assert len(attempts) == 2 and all(fragment in c["params"]["text"] for c in attempts)  # 429, then sent
    assert not [m for m in a.messages() + b.messages() if "went wrong" in (m.get("text") or "")]  # no error reference
    assert "database is locked" not in bot.log()


def test_a_message_that_breaks_the_sender_is_tried_later_and_holds_up_no_one(  # type: ignore[no-untyped-def]
        clinic, emulator: str, bot: BotProcess) -> None:
    """An outbox message the sender cannot render (here: a result for a case that is gone) used to be read
    again first in every round, ahead of every patient's messages. It is now counted as a failed try and
    backed off (given up after clinic_db.outbox.MAX_ATTEMPTS), and the other patients' messages go out."""
    a = Chat(emulator, 2201)
    submitted_case(a)
    a.expect_text("received and is waiting")
    a_case = only_case(clinic)
    with clinic.session() as session:
        broken = outbox.enqueue(clinic, session, patient_id=a_case.patient_id, case_id=None, kind="result",
                                dedup_key="result:gone", payload={"case_id": str(uuid.uuid4())})
        broken_id = broken.id
        session.commit()

    def tried() -> outbox.OutboxMessage | None:
        with clinic.session() as session:
            msg = session.get(outbox.OutboxMessage, broken_id)
            return msg if msg.attempts else None

    msg = wait_for(tried, timeout=30, message="the broken message's first try")
    assert msg.status == "pending" and msg.last_error == "LookupError"  # the type only: no patient data
    assert msg.next_attempt_at > utcnow()  # backed off, not read again at once
    publish_ai_result(clinic, a_case.id)  # the same patient's next messages are not held up either
    a.expect_text("Most likely: Melanoma")
    b = Chat(emulator, 2202)
    consent(b)  # another patient's conversation goes on
    assert "outbox " in bot.log() and "delivery failed" in bot.log()
