"""A second `make run` on the same data: the sandbox (``skinbridge sandbox``) and the bot restart, and
the patient who was talking to the bot before is still answered.

Telegram never reuses an update id, nor a message id in a chat, and the bot counts on that: its inbox
keeps the ids it handled and ignores one it sees again (a re-delivery). A sandbox that started its ids
from scratch on each run made every message after a restart look like one already handled, so the chat
stayed silent. Real parts: the sandbox and the bot as their own processes on one var dir.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from clinic_db.models import Image, InboxUpdate
from tests.e2e_support import REPO, SKINBRIDGE_BOT, BotProcess, Chat, bot_environment, consent
from tests.support import free_port, wait_for
from tests.test_bot_conversation import lesion_photo

pytestmark = pytest.mark.slow


class Sandbox:
    """`skinbridge sandbox` on a fixed port, so a restarted one is where the bot looks for it."""

    def __init__(self, port: int, log: Path):
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        self.env = bot_environment(self.url)  # the var dir the bot uses: the sandbox keeps its state there
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "skinbridge", "sandbox", "--port", str(self.port)],
                                     cwd=REPO, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        wait_for(self._up, timeout=60, message="the sandbox serving")

    def _up(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text(errors="replace")
        try:
            return httpx.get(f"{self.url}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture
def sandbox(clinic, tmp_path: Path) -> Iterator[tuple[Sandbox, BotProcess]]:  # type: ignore[no-untyped-def]
    box = Sandbox(free_port(), tmp_path / "sandbox.log")
    bot = BotProcess(box.env, tmp_path / "bot.log", SKINBRIDGE_BOT)
    try:
        yield box, bot
    finally:
        bot.stop()
        box.stop()
        print(f"--- sandbox log ---\n{box.log.read_text(errors='replace')[-4000:]}\n--- bot log ---\n{bot.log()[-4000:]}")


def test_a_patient_is_answered_after_the_sandbox_and_bot_restart(clinic, sandbox) -> None:  # type: ignore[no-untyped-def]
    box, bot = sandbox
    box.start()
    bot.start(box.url)
    chat = Chat(box.url, 6101)
    consent(chat)
    chat.photo(lesion_photo(1))
    chat.expect_text("Photo saved (1 in this case)", timeout=60)
    last_id = max(m["message_id"] for m in chat.messages())

    # the second run: both stop and start again on the same data
    bot.stop()
    box.stop()
    time.sleep(0.5)
    box.start()
    bot.start(box.url)

    chat = Chat(box.url, 6101)  # the same patient, back on the sandbox page
    sent = chat.photo(lesion_photo(2))
    chat.expect_text("Photo saved (2 in this case)", timeout=60)
    with clinic.session() as session:
        assert session.get(InboxUpdate, sent["update_id"]) is not None
        assert session.scalar(select(func.count()).select_from(Image)) == 2
    assert sent["message_id"] > last_id  # a message id this chat never had, as on Telegram
