"""Killing the bot loses no patient's message (issue 24, problem 1).

The bot runs as its own process against the Telegram emulator. Fifteen patients accept the privacy
terms at once; the moment the bot has confirmed their button presses to the Bot API (so Telegram
has forgotten them) it is SIGKILLed, with most of them not yet handled. A new bot process must
register every one of them and answer each: the presses were in the bot's inbox before they were
confirmed. With python-telegram-bot's own updater (confirm on fetch) they were lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from bot.emulator import create_app
from clinic_db.models import InboxUpdate, Patient
from tests.e2e_support import BotProcess, Chat, bot_environment
from tests.support import serve_app, wait_for

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
