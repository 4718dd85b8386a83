"""Nothing the patient types is lost, and what the bot says is true (issue 22, items 3, 5, 6; issue 24, item 8).

The bot runs as a real process against the Telegram emulator and a real database, as in
tests/test_bot_conversation.py; review tasks and results are written with the clinic_db functions
the pipeline and the console use.
"""

from __future__ import annotations

import io
import time
import uuid

from PIL import Image
from sqlalchemy import select

from clinic_db import clinicians, review
from clinic_db.models import AuditEvent, Case, CaseMessage, Clinician, ReviewTask
from clinic_db.models import Image as ImageRow
from console import demo
from inference import pipeline
from inference.triage import RED_FLAG
from tests.support import wait_for
from tests.test_bot_conversation import (  # noqa: F401 - fixtures used by name
    HISTORY,
    BotProcess,
    Chat,
    answer_history,
    bot,
    bot_env,
    consent,
    count,
    emulator,
    lesion_photo,
    only_case,
)
from tests.test_bot_results import dermatologist_asks, publish_ai_result


def notes(clinic, case_id: uuid.UUID) -> list[tuple[str, list[str], str]]:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        rows = session.scalars(select(CaseMessage).where(CaseMessage.case_id == case_id)
                               .order_by(CaseMessage.created_at)).all()
        return [(m.role, list(m.flags), clinic.vault.get_text(session, m, "text", owner=m.patient_id)) for m in rows]


def test_free_text_while_collecting_and_waiting_is_kept_on_the_case(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 3001)
    consent(chat)
    chat.text("hello")  # no case at all: only now does the bot suggest /new
    chat.expect_text("no open case")
    assert count(clinic, Case) == 0

    chat.photo(lesion_photo(21))
    saved = chat.expect_text("Photo saved (1 in this case)")
    chat.text("it is on my left arm")
    ack = chat.expect_text("added your note to this case")
    assert "press Continue" in ack["text"] and "photos:done" in str(ack["reply_markup"])
    chat.tap(saved, "photos:done")
    first = chat.expect(lambda m: "h:body_site:" in str(m.get("reply_markup")), "the first question")
    chat.text("it itches mostly at night")
    chat.expect_text("Please answer this question with the buttons")
    # the open question comes again with its buttons (a patient whose copy never arrived can go on)
    again = chat.expect(lambda m: "h:body_site:" in str(m.get("reply_markup")), "the first question again")
    assert again["message_id"] != first["message_id"]
    chat.press(again["message_id"], f"h:body_site:{HISTORY['body_site']}")
    answer_history(chat, {k: v for k, v in HISTORY.items() if k != "body_site"})
    chat.expect_text("submitted")
    chat.text("I forgot: it is about 5 mm wide")  # queued for the AI
    chat.expect_text("Your assessment will follow here")

    case_id = only_case(clinic).id
    assert notes(clinic, case_id) == [
        ("patient", ["note"], "it is on my left arm"),
        ("patient", ["note"], "it itches mostly at night"),
        ("patient", ["note"], "I forgot: it is about 5 mm wide"),
    ]
    with clinic.session() as session:  # encrypted at rest, and every note audited
        assert all(b"left arm" not in row.text_enc for row in session.scalars(select(CaseMessage)))
        audited = session.scalars(select(AuditEvent).where(AuditEvent.action == "case_message.create")).all()
        assert [e.detail.get("reason") for e in audited] == ["note"] * 3
    assert "did not understand" not in str([m.get("text") for m in chat.messages()])


def test_waiting_for_review_the_text_goes_to_the_dermatologist_after_a_result_to_follow_up(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        rc = demo.review_case(clinic, session, telegram_id=3002, urgency="soon", reasons=["malignancy_suspected"],
                              differential=[{"code": "basal_cell_carcinoma", "probability": 0.6},
                                            {"code": "nevus", "probability": 0.4}])
        derm, _ = clinicians.create(clinic, session, "ada", display_name="Dr. Ada", role="dermatologist",
                                    password="correct horse battery")
        session.commit()
        case_id, task_id, derm_id = rc.case.id, rc.task.id, derm.id
    chat = Chat(emulator, 3002)
    whole = "It started after a sunburn. " * 151 + "The end."  # 4,236 characters: over Telegram's limit
    chat.text(whole[:4096])  # the most one Telegram message holds: kept whole, not cut to 4,000
    chat.expect_text("the dermatologist reviewing it will read it")
    assert notes(clinic, case_id) == [("patient", ["note"], whole[:4096])]

    # signed: a question now goes to the follow-up path (the AI answers it, the case stays signed)
    with clinic.session() as session:
        derm = session.get(Clinician, derm_id)
        task = session.get(ReviewTask, task_id)
        assert review.claim(session, task.id, derm.id)
        session.refresh(task)
        review.decide(clinic, session, task, derm, "accept", urgency="soon", recommendation="see_gp")
        session.commit()
    final = chat.expect_text("A dermatologist has reviewed your case.")
    assert "Please see your family doctor (GP) within 3 days." in final["text"]
    assert "see_gp" not in final["text"] and "within 7 days" not in final["text"]
    chat.text("Can I go swimming until then?")
    chat.expect_text("your question was received")
    assert notes(clinic, case_id)[-1] == ("patient", [], "Can I go swimming until then?")


def test_review_requested_reads_the_task_urgency(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 3003)
    consent(chat)
    chat.photo(lesion_photo(22))
    chat.tap(chat.expect_text("Photo saved"), "photos:done")
    answer_history(chat, HISTORY)
    chat.expect_text("submitted")
    case_id = only_case(clinic).id
    publish_ai_result(clinic, case_id)
    chat.expect_text("Most likely: Melanoma")
    with clinic.session() as session:
        session.get(Case, case_id).urgency = "routine"  # the case itself is routine ...
        session.commit()
    pipeline.request_review(case_id, RED_FLAG, urgency="emergency")  # ... a red-flag follow-up is not
    # an emergency: "seek care now" first, no review time that reads as "wait for us" (issue 22)
    told = chat.expect_text("Please seek medical care now")["text"]
    assert "do not wait for that message" in told and "hours" not in told


def _tiny_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 150, 120)).save(out, "PNG")
    return out.getvalue()


def test_refused_uploads_open_no_case_and_after_delete_the_bot_tells_the_truth(clinic, emulator: str, bot: BotProcess, shared_data) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 3004)
    consent(chat)
    chat.document(b"just some notes\n", "text/plain", "notes.txt")
    refused = chat.expect_text("not a photo")
    assert "WebP" in refused["text"]  # WebP is accepted, so the text names it
    chat.document(_tiny_png(), "image/png", "tiny.png")
    chat.expect_text("too small")
    assert count(clinic, Case) == 0  # nothing stored: no empty case either
    chat.text("/history")
    chat.expect_text("You have no cases yet")

    # a 200x150 dermoscopic export (every HAM10000 photo) is stored, with advice to retake
    ham = sorted((shared_data / "ham10000" / "images").glob("*.jpg"))[0]
    chat.document(ham.read_bytes(), "image/jpeg", ham.name)
    saved = chat.expect_text("Photo saved (1 in this case)")
    assert "small" in saved["text"]
    assert count(clinic, ImageRow) == 1 and count(clinic, Case) == 1

    chat.text("/delete")
    chat.tap(chat.expect_text("cannot be undone"), "del:yes")
    chat.expect_text("All your data has been deleted")
    chat.text("/history")
    chat.expect_text("No cases are stored for you. Send /start")
    chat.text("hello")
    chat.expect_text("I keep nothing you send before you agree")
    assert "Before I can look at photos" not in str([m.get("text") for m in chat.messages()])
    wait_for(lambda: count(clinic, Case) == 0, 5, message="erasure")


def _typed_twice(chat: Chat, message_id: int, text: str) -> None:
    """One message the patient typed, delivered as two updates: what a restarted bot meets when it was
    killed after handling the message but before marking it handled (the inbox replays it)."""
    user = {"id": chat.user_id, "is_bot": False, "first_name": "Patient", "language_code": "en"}
    message = {"message_id": message_id, "date": int(time.time()), "from": user, "text": text,
               "chat": {"id": chat.user_id, "type": "private", "first_name": "Patient"}}
    for _ in range(2):
        chat.http.post("/_emulator/updates", json={"message": message}).raise_for_status()  # each its own update_id


def _answered_twice(chat: Chat, fragment: str) -> None:
    """Both deliveries handled: an acknowledgement is sent again (the first may never have gone out)."""
    wait_for(lambda: sum(fragment in (m.get("text") or "") for m in chat.messages()) == 2, timeout=30,
             message=f"two answers {fragment!r}: {[m.get('text') for m in chat.messages()]}")


def test_a_replayed_message_is_kept_once_as_note_question_and_answer(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 3005)
    consent(chat)
    chat.photo(lesion_photo(23))
    saved = chat.expect_text("Photo saved (1 in this case)")
    case_id = only_case(clinic).id
    _typed_twice(chat, 700_001, "it is on my left arm")
    _answered_twice(chat, "added your note to this case")
    assert notes(clinic, case_id) == [("patient", ["note"], "it is on my left arm")]

    chat.tap(saved, "photos:done")
    answer_history(chat, HISTORY)
    chat.expect_text("submitted")
    publish_ai_result(clinic, case_id)
    chat.tap(chat.expect_text("Most likely: Melanoma"), "c:ask:")
    chat.expect_text("Type your question")
    _typed_twice(chat, 700_002, "Is it dangerous?")  # one question row: its answer is deduplicated by it
    _answered_twice(chat, "question was received")
    assert [n for n in notes(clinic, case_id) if n[2] == "Is it dangerous?"] == [("patient", [], "Is it dangerous?")]

    pipeline.request_review(case_id)
    with clinic.session() as session:
        task_id = session.scalars(select(ReviewTask.id).where(ReviewTask.case_id == case_id)).one()
    dermatologist_asks(clinic, task_id, "Has it changed colour?")
    chat.expect_text("Has it changed colour?")
    _typed_twice(chat, 700_003, "Yes, darker at the edge.")
    _answered_twice(chat, "answer was added to the case")
    assert [n for n in notes(clinic, case_id) if n[2] == "Yes, darker at the edge."] == \
        [("patient", ["info_reply"], "Yes, darker at the edge.")]
    with clinic.session() as session:
        assert session.scalars(select(ReviewTask.status).where(ReviewTask.case_id == case_id)).one() == "open"
