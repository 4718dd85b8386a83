"""The patient bot as a real separate process against the Telegram emulator and a real database.

Each test starts the emulator (real uvicorn server) and ``python -m bot`` with its own var dir and
SQLite database, then plays the patient through the emulator's control API.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from sqlalchemy import func, select

from bot.emulator import create_app
from clinic_db import cases as clinic_cases
from clinic_db.models import Case, Image as ImageRow, KeyValue, Patient, PatientKey
from tests.e2e_support import (  # noqa: F401 - re-exported for tests/test_bot_results.py
    HISTORY,
    BotProcess,
    Chat,
    answer_history,
    bot_environment,
    consent,
)
from tests.support import serve_app, wait_for


# --- photos -----------------------------------------------------------------------------------------
def lesion_photo(seed: int = 0, size: tuple[int, int] = (900, 700), blur: float = 0.0) -> bytes:
    """A sharp, well-exposed synthetic skin photo with a dark irregular lesion (JPEG)."""
    rng = np.random.default_rng(seed)
    w, h = size
    skin = np.array([214, 170, 140], dtype=np.float32)
    base = skin + rng.normal(0, 9, (h, w, 3)).astype(np.float32)  # pores and texture: lots of fine detail
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy = w // 2 + int(rng.integers(-40, 40)), h // 2 + int(rng.integers(-40, 40))
    points = [
        (cx + r * np.cos(a), cy + r * np.sin(a))
        for a, r in zip(np.linspace(0, 2 * np.pi, 24, endpoint=False), rng.uniform(70, 130, 24))
    ]
    draw.polygon(points, fill=(92, 55, 40))
    for _ in range(40):  # darker dots inside: structure a blur would wipe out
        x, y = cx + rng.integers(-60, 60), cy + rng.integers(-60, 60)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(40, 25, 20))
    if blur:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92)
    return out.getvalue()


def decompression_bomb() -> bytes:
    """A tiny PNG that decodes to 144 megapixels (a few KB on the wire)."""
    out = io.BytesIO()
    Image.new("1", (12000, 12000), 0).save(out, "PNG", optimize=True)
    return out.getvalue()


# --- the emulator and the bot process -------------------------------------------------------------
@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[str]:
    with serve_app(create_app(tmp_path / "emulator-files")) as url:
        yield url


@pytest.fixture
def bot_env(clinic, emulator: str, tmp_path: Path) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return bot_environment(emulator)


@pytest.fixture
def bot(bot_env: dict[str, str], emulator: str, tmp_path: Path) -> Iterator[BotProcess]:
    process = BotProcess(bot_env, tmp_path / "bot.log")
    process.start(emulator)
    yield process
    process.stop()
    print(process.log()[-6000:])  # shown by pytest when the test failed


def count(clinic, model, *where) -> int:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


def only_case(clinic) -> Case:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        rows = session.scalars(select(Case)).all()
        assert len(rows) == 1, rows
        return rows[0]


# --- conversations ---------------------------------------------------------------------------------
def test_consent_album_history_and_submission(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1001)
    chat.text("/start")
    intro = chat.expect_text("Do you agree?")
    assert "do not make a diagnosis" in intro["text"]
    assert count(clinic, Patient) == 0  # nothing stored before consent
    chat.tap(intro, "consent:yes")
    chat.expect_text("/new")
    with clinic.session() as session:
        patient = session.scalars(select(Patient)).one()
        assert patient.has_consent and patient.consent_version and patient.language == "en"

    chat.album([lesion_photo(1), lesion_photo(2)])
    saved = chat.expect_text("2 photos saved")
    assert count(clinic, ImageRow) == 2
    chat.tap(saved, "photos:done")
    answer_history(chat, HISTORY)
    # the last question, edited once: the answer and the submission in one message, no reply below it
    done = chat.expect_text("submitted")
    assert done["edited"] and done["text"] == "Optional: what is your skin type? Skip\n\nThank you. Your case has been submitted."
    progress = chat.expect_text("received and is waiting")  # the progress message, from the outbox

    case = only_case(clinic)
    assert case.status == "queued"
    assert case.history_completed_at is not None  # what the sweeper needs had the bot died before submitting
    with clinic.session() as session:
        stored = clinic_cases.history(clinic, session, session.get(Case, case.id))
    assert stored == {k: v for k, v in HISTORY.items() if v != "skip"}
    # its message id is remembered (committed just after Telegram accepted it) so later stages edit it
    wait_for(lambda: count(clinic, KeyValue, KeyValue.namespace == "bot_progress", KeyValue.key == str(case.id)) == 1,
             10, message="the progress message id to be stored")
    assert not progress["edited"]


def test_nothing_is_stored_before_consent(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1002, language_code="de-DE")
    chat.photo(lesion_photo(3))
    chat.expect_text("Einwilligung")  # answered in the client's language: please /start first
    chat.text("/new")
    chat.expect_text("/start")
    chat.text("/start")
    intro = chat.expect_text("Sind Sie einverstanden?")
    chat.tap(intro, "consent:no")
    chat.expect_text("nichts über Sie gespeichert")
    assert count(clinic, Patient) == 0
    assert count(clinic, Case) == 0
    assert count(clinic, ImageRow) == 0
    assert count(clinic, KeyValue, KeyValue.namespace.like("bot_user%")) == 0


def test_bad_files_get_clear_messages_and_the_bot_keeps_working(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1003)
    consent(chat)
    chat.document(b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n", "application/pdf", "report.pdf")
    chat.expect_text("not a photo")
    good = lesion_photo(4)
    chat.document(good[: len(good) // 3], "image/jpeg", "broken.jpg")  # a JPEG cut off mid-stream
    chat.expect(lambda m: "damaged" in (m.get("text") or "") or "could not be used" in (m.get("text") or ""),
                "about the corrupt JPEG")
    chat.document(os.urandom(30 * 1024 * 1024), "image/jpeg", "huge.jpg")
    chat.expect_text("too large")
    chat.document(decompression_bomb(), "image/png", "bomb.png")
    chat.expect_text("too many pixels")
    chat.photo(lesion_photo(5, blur=12))
    blurry = chat.expect_text("not saved")
    assert "blurry" in blurry["text"].lower() or "focus" in blurry["text"].lower()
    assert count(clinic, ImageRow) == 0  # none of these reached the case

    chat.document(lesion_photo(6), "image/jpeg", "mole.jpg")  # an image sent as a file is fine
    chat.expect_text("Photo saved (1 in this case)")
    assert count(clinic, ImageRow) == 1
    assert "Traceback" not in bot.log()


def test_killed_mid_conversation_continues_after_restart(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1004)
    consent(chat)
    chat.photo(lesion_photo(7))
    saved = chat.expect_text("Photo saved (1 in this case)")
    chat.tap(saved, "photos:done")
    answer_history(chat, {"body_site": "arm", "duration": "weeks"})
    question = chat.expect(lambda m: "h:itch:" in str(m.get("reply_markup")), "the itch question")

    bot.kill()  # SIGKILL: no shutdown hook runs
    bot.start(emulator)

    chat.press(question["message_id"], "h:itch:yes")  # the conversation goes on where it was
    answer_history(chat, {"bleeding": "no", "growth": "unsure", "pain": "no", "prior_treatment": "cream",
                          "fitzpatrick": "III"})
    chat.expect_text("submitted")
    chat.expect_text("received and is waiting")
    case = only_case(clinic)
    assert case.status == "queued"
    assert count(clinic, ImageRow, ImageRow.case_id == case.id) == 1  # the photo survived the kill
    with clinic.session() as session:
        answers = clinic_cases.history(clinic, session, session.get(Case, case.id))
    assert answers == {"body_site": "arm", "duration": "weeks", "itch": "yes", "bleeding": "no", "growth": "unsure",
                       "pain": "no", "prior_treatment": "cream", "fitzpatrick": "III"}


def test_the_same_update_twice_makes_one_case(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1005)
    consent(chat)
    user = {"id": 1005, "is_bot": False, "first_name": "Patient", "language_code": "en"}
    update = {"update_id": 900_000_001, "message": {
        "message_id": 5000, "date": int(time.time()), "from": user,
        "chat": {"id": 1005, "type": "private", "first_name": "Patient"},
        "text": "/new", "entities": [{"type": "bot_command", "offset": 0, "length": 4}]}}
    for _ in range(2):
        r = chat.http.post("/_emulator/updates", json=update)
        r.raise_for_status()
    chat.expect_text("New case started")
    chat.text("/help")  # processed after both copies: by now the duplicate has been seen and dropped
    chat.expect_text("/history - your cases")
    opened = [m for m in chat.messages() if "New case started" in (m.get("text") or "")]
    assert len(opened) == 1
    chat.photo(lesion_photo(7))  # the case row comes with its first stored photo: one case
    chat.expect_text("Photo saved (1 in this case)")
    assert count(clinic, Case) == 1


def test_telegram_429_is_retried(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1006)
    chat.http.delete("/_emulator/calls").raise_for_status()
    chat.http.post("/_emulator/fail", json={"method": "sendMessage", "times": 1, "retry_after": 1}).raise_for_status()
    chat.text("/help")
    chat.expect_text("/history - your cases")
    attempts = chat.http.get("/_emulator/calls", params={"method": "sendMessage"}).json()
    assert len(attempts) >= 2  # the first got 429 Too Many Requests, the retry got through


def test_delete_erases_everything(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1007)
    consent(chat)
    chat.photo(lesion_photo(8))
    chat.expect_text("Photo saved")
    assert count(clinic, ImageRow) == 1
    chat.text("/delete")
    confirm = chat.expect(lambda m: "cannot be undone" in (m.get("text") or "") and "del:yes" in str(m["reply_markup"]),
                          "asking to confirm")
    chat.tap(confirm, "del:no")
    chat.expect_text("Nothing was deleted")
    assert count(clinic, Patient) == 1
    chat.text("/delete")
    confirm = chat.expect(lambda m: "cannot be undone" in (m.get("text") or "") and "del:yes" in str(m["reply_markup"]),
                          "asking to confirm")
    chat.tap(confirm, "del:yes")
    chat.expect_text("All your data has been deleted")
    assert count(clinic, Patient) == 0
    assert count(clinic, Case) == 0
    assert count(clinic, ImageRow) == 0
    assert count(clinic, PatientKey, PatientKey.patient_id != uuid.UUID(int=0)) == 0  # data key shredded
    assert count(clinic, KeyValue, KeyValue.namespace == "bot_user") == 0
    chat.text("/history")
    chat.expect_text("/start")  # a stranger again


def test_language_switch_and_command_menus(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1008)
    consent(chat)
    state = chat.http.get(f"/_emulator/users/{chat.user_id}/state", params={"language_code": "de"}).json()
    assert {c["command"] for c in state["commands"]} >= {"new", "history", "delete", "language", "help"}
    assert any(c["description"] == "Neuen Fall beginnen" for c in state["commands"])
    chat.text("/language")
    menu = chat.expect_text("Choose your language")
    chat.tap(menu, "lang:de")
    chat.expect_text("Deutsch umgestellt")
    chat.text("/history")
    chat.expect_text("noch keine Fälle")
    with clinic.session() as session:
        assert session.scalars(select(Patient)).one().language == "de"


@pytest.fixture
def tight_limit_bot(clinic, emulator: str, tmp_path: Path) -> Iterator[BotProcess]:  # type: ignore[no-untyped-def]
    env = bot_environment(emulator, {"SKINBRIDGE_BOT_USER_LIMIT": "20", "SKINBRIDGE_BOT_USER_WINDOW_S": "4"})
    process = BotProcess(env, tmp_path / "bot.log")
    process.start(emulator)
    yield process
    process.stop()
    print(process.log()[-6000:])


def test_per_user_rate_limit_keeps_every_message(clinic, emulator: str, tight_limit_bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1009)
    for i in range(24):
        chat.text(f"hello {i}")
    chat.expect_text("no need to send them again")
    other = Chat(emulator, 1010)
    other.text("/help")
    other.expect_text("/history - your cases")  # other patients are not slowed down
    # the four over the limit were kept and are answered once the window moves on: none is dropped
    wait_for(lambda: sum("/start" in (m.get("text") or "") for m in chat.messages()) == 24, timeout=30,
             message="all 24 messages answered")
    texts = [m.get("text") or "" for m in chat.messages()]
    assert sum("no need to send them again" in t for t in texts) == 1


def test_an_error_gives_the_user_a_reference_found_in_the_log(clinic, emulator: str, bot: BotProcess) -> None:  # type: ignore[no-untyped-def]
    chat = Chat(emulator, 1011)
    chat.text("/start")
    intro = chat.expect_text("Do you agree?")
    user = {"id": 1011, "is_bot": False, "first_name": "Patient", "language_code": "en"}
    message = {"message_id": intro["message_id"], "date": int(time.time()), "text": "x",
               "chat": {"id": 1011, "type": "private", "first_name": "Patient"}}
    broken = {"update_id": 900_000_100, "callback_query": {  # a forged button press the bot cannot parse
        "id": "4242", "from": user, "chat_instance": "1", "data": "consent:yes", "message": message}}
    chat.http.post("/_emulator/updates", json=broken).raise_for_status()
    apology = chat.expect_text("something went wrong")
    ref = apology["text"].split("reference ")[1].split(")")[0]
    assert len(ref) == 8
    deadline = time.monotonic() + 10
    while f"error {ref}" not in bot.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = bot.log()
    assert f"error {ref}" in log and "Traceback" in log.split(f"error {ref}", 1)[1]
    assert count(clinic, Patient) == 0
    chat.text("/help")  # and it keeps working
    chat.expect_text("/history - your cases")
