"""Killing the bot loses no patient's message (issue 24, problem 1).

The bot runs as its own process against the Telegram emulator. Fifteen patients accept the privacy
terms at once; the moment the bot has confirmed their button presses to the Bot API (so Telegram
has forgotten them) it is SIGKILLed, with most of them not yet handled. A new bot process must
register every one of them and answer each: the presses were in the bot's inbox before they were
confirmed. With python-telegram-bot's own updater (confirm on fetch) they were lost.

A kill can also fall between a handler's commit and the write of the conversation state: the replay then
meets its own earlier effect. The photo that opened a case is the case in point (the chaos suite once
found a second, orphaned case that way).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from bot.emulator import create_app
from bot.persistence import NS_USER
from clinic_db.models import Case, Image, InboxUpdate, KeyValue, Patient
from tests.e2e_support import HISTORY, BotProcess, Chat, answer_history, bot_environment, consent
from tests.support import serve_app, wait_for
from tests.test_bot_conversation import lesion_photo

pytestmark = pytest.mark.slow
PATIENTS = 15


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[str]:
    with serve_app(create_app(tmp_path / "emulator-files")) as url:
        yield url


def _patients(clinic) -> int:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return session.scalar(select(func.count()).select_from(Patient).where(Patient.consent_at.is_not(None))) or 0


def _confirmed_offset(emulator: str) -> int:
    calls = httpx.get(f"{emulator}/_emulator/calls", params={"method": "getUpdates"}).json()
    return max((int(c["params"].get("offset") or 0) for c in calls), default=0)


def test_a_bot_killed_mid_batch_replays_every_confirmed_update(clinic, emulator: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = bot_environment(emulator)
    first = BotProcess(env, tmp_path / "bot-1.log")
    first.start(emulator)
    chats = [Chat(emulator, 3000 + i) for i in range(PATIENTS)]
    intros = []
    for chat in chats:
        chat.text("/start")
    for chat in chats:
        intros.append(chat.expect(lambda m: "consent:yes" in str(m.get("reply_markup")), "the consent buttons"))
    presses = []
    for chat, intro in zip(chats, intros):
        r = chat.http.post(chat._user("press"), json={"message_id": intro["message_id"],
                                                      "data": chat.button(intro, "consent:yes")})
        r.raise_for_status()
        presses.append(r.json()["update_id"])
    # as soon as the bot has told the Bot API it has them all, Telegram will never send them again
    wait_for(lambda: _confirmed_offset(emulator) > max(presses), timeout=30, interval=0.01,
             message="the presses confirmed")
    first.kill()
    handled_before_kill = _patients(clinic)
    assert handled_before_kill < PATIENTS, "the kill came too late to test anything"

    second = BotProcess(env, tmp_path / "bot-2.log")
    second.start(emulator)
    try:
        wait_for(lambda: _patients(clinic) == PATIENTS, timeout=60, message="every patient registered")
        for chat in chats:
            chat.expect_text("/new")  # each one heard back
        with clinic.session() as session:
            statuses = dict(session.execute(select(InboxUpdate.status, func.count()).group_by(InboxUpdate.status)).all())
        assert statuses.get("pending", 0) == 0 and statuses.get("failed", 0) == 0
    finally:
        second.stop()
        print(first.log()[-3000:], second.log()[-3000:])


def _conversation_state(clinic) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return {row.key: row.value_enc for row in session.scalars(select(KeyValue).where(KeyValue.namespace == NS_USER))}


def _put_back(clinic, state: dict[str, bytes]) -> None:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        for row in session.scalars(select(KeyValue).where(KeyValue.namespace == NS_USER)):
            if row.key in state:
                row.value_enc = state[row.key]
            else:
                session.delete(row)
        session.commit()


def test_a_photo_replayed_after_its_case_was_opened_opens_no_second_case(clinic, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    emulator_app = create_app(tmp_path / "emulator-files")
    with serve_app(emulator_app) as emulator:
        bot = BotProcess(bot_environment(emulator), tmp_path / "bot.log")
        bot.start(emulator)
        try:
            chat = Chat(emulator, 3100)
            consent(chat)
            before_photo = _conversation_state(clinic)
            sent = chat.photo(lesion_photo(3))
            chat.expect_text("Photo saved (1 in this case)")
            bot.kill()
            # what a kill right after the photo's commit leaves: the photo stored in its new case, the
            # conversation state from before it, and the message to be handled again
            _put_back(clinic, before_photo)
            message = copy.deepcopy(emulator_app.state.world.chats[chat.user_id][sent["message_id"]].message)
            chat.http.post("/_emulator/updates", json={"message": message}).raise_for_status()
            bot.start(emulator)

            again = chat.expect_text("Photo saved (1 in this case)")  # acknowledged again, counted once
            chat.tap(again, "photos:done")
            answer_history(chat, HISTORY)
            chat.expect_text("submitted")
            with clinic.session() as session:
                cases = session.scalars(select(Case)).all()
                assert [c.status for c in cases] == ["queued"]
                assert session.scalar(select(func.count()).select_from(Image)) == 1
        finally:
            bot.stop()
            print(bot.log()[-3000:])
