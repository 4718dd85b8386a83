"""The patient bot in production webhook mode, as a real process against the Telegram emulator.

Telegram pushes updates to the bot's webhook; the emulator stores ``setWebhook`` but never pushes
(docs/emulator.md), so the test plays Telegram's side: the users write through the control API (the
chat must exist for the bot's replies) and the test POSTs the resulting updates to the bot's own HTTP
listener, with or without the secret token that the bot registered.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from bot.emulator import create_app
from clinic_db.models import Patient
from tests.e2e_support import BOT_MODULE, REPO, BotProcess, Chat, bot_environment
from tests.support import free_port, serve_app

pytestmark = pytest.mark.slow

SECRET = "webhook-Secret_0123456789abcdef"
PUBLIC_URL = "https://bot.skinbridge.test/telegram/hook"  # what TLS in front of the bot would expose
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
BOT_ID = 123456  # the emulator derives the bot from the sandbox token 123456:SANDBOX
QUIET_S = 2.0  # how long a refused update has to show no effect


class WebhookBot(BotProcess):
    """``python -m bot --listen 127.0.0.1 --port N`` with SKINBRIDGE_WEBHOOK_URL/SECRET set."""

    def __init__(self, env: dict[str, str], log_path: Path, port: int):
        super().__init__(env, log_path, [*BOT_MODULE, "--listen", "127.0.0.1", "--port", str(port)])
        self.port = port

    @property
    def hook(self) -> str:
        """The local address the TLS proxy would forward PUBLIC_URL to."""
        return f"http://127.0.0.1:{self.port}/telegram/hook"

    def start(self, emulator: str) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ready once the webhook is registered and the socket listens
            if self.proc.poll() is not None:
                break
            registered = httpx.get(f"{emulator}/_emulator/calls", params={"method": "setWebhook"}).json()
            if registered and _listening(self.port):
                return
            time.sleep(0.1)
        raise AssertionError("bot did not start in webhook mode:\n" + self.log()[-4000:])


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[str]:
    with serve_app(create_app(tmp_path / "emulator-files")) as url:
        yield url


@pytest.fixture
def webhook_env(clinic, emulator: str) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return bot_environment(emulator, {"SKINBRIDGE_WEBHOOK_URL": PUBLIC_URL, "SKINBRIDGE_WEBHOOK_SECRET": SECRET})


@pytest.fixture
def bot(webhook_env: dict[str, str], emulator: str, tmp_path: Path) -> Iterator[WebhookBot]:
    process = WebhookBot(webhook_env, tmp_path / "bot.log", free_port())
    process.start(emulator)
    yield process
    process.stop()
    print(process.log()[-6000:])  # shown by pytest when the test failed


# --- Telegram's side: updates as the Bot API would push them ----------------------------------------
def user_json(chat: Chat) -> dict[str, Any]:
    return {"id": chat.user_id, "is_bot": False, "first_name": "Pat", "language_code": chat.language_code}


def text_update(chat: Chat, text: str) -> dict[str, Any]:
    """The user writes through the emulator (so the chat exists and the message is in its history);
    the update Telegram would push for it is built from the ids the emulator assigned."""
    sent = chat.text(text)
    command = {"entities": [{"type": "bot_command", "offset": 0, "length": len(text.split()[0])}]} \
        if text.startswith("/") else {}
    return {"update_id": sent["update_id"], "message": {
        "message_id": sent["message_id"], "date": int(time.time()), "from": user_json(chat),
        "chat": {"id": chat.user_id, "type": "private", "first_name": "Pat"}, "text": text, **command}}


def press_update(chat: Chat, message: dict[str, Any], data: str) -> dict[str, Any]:
    """A button press: the emulator registers the callback query (so answerCallbackQuery works)."""
    r = chat.http.post(f"/_emulator/users/{chat.user_id}/press",
                       json={"message_id": message["message_id"], "data": data, "language_code": chat.language_code})
    r.raise_for_status()
    pressed = r.json()
    return {"update_id": pressed["update_id"], "callback_query": {
        "id": pressed["callback_query_id"], "from": user_json(chat), "chat_instance": str(chat.user_id),
        "data": data, "message": {
            "message_id": message["message_id"], "date": int(time.time()),
            "from": {"id": BOT_ID, "is_bot": True, "first_name": "SkinBridge"},
            "chat": {"id": chat.user_id, "type": "private", "first_name": "Pat"},
            "text": message["text"], "reply_markup": message["reply_markup"]}}}


def push(bot: WebhookBot, update: dict[str, Any], secret: str | None) -> httpx.Response:
    headers = {} if secret is None else {SECRET_HEADER: secret}
    return httpx.post(bot.hook, json=update, headers=headers, timeout=10)


def patients(clinic) -> int:  # type: ignore[no-untyped-def]
    with clinic.session() as session:
        return session.scalar(select(func.count()).select_from(Patient)) or 0


# --- tests -----------------------------------------------------------------------------------------
def test_webhook_registered_secured_and_processed(clinic, emulator: str, bot: WebhookBot) -> None:  # type: ignore[no-untyped-def]
    # (1) the bot told "Telegram" where to push and which secret to send, and does not poll
    calls = httpx.get(f"{emulator}/_emulator/calls", params={"method": "setWebhook"}).json()
    assert [c["params"]["url"] for c in calls] == [PUBLIC_URL]
    assert calls[0]["params"]["secret_token"] == SECRET
    info = httpx.post(f"{emulator}/bot123456:SANDBOX/getWebhookInfo").json()["result"]
    assert info["url"] == PUBLIC_URL
    assert httpx.get(f"{emulator}/_emulator/calls", params={"method": "getUpdates"}).json() == []

    chat = Chat(emulator, 4242)
    start = text_update(chat, "/start")

    # (3) without the secret, or with a wrong one: refused, and the update has no effect at all
    for secret in (None, "wrong-secret", SECRET.upper(), ""):
        refused = push(bot, start, secret)
        assert refused.status_code == 403, (secret, refused.status_code, refused.text)
    time.sleep(QUIET_S)
    assert chat.messages() == []

    # (2) the same update with the right secret is processed: the consent text arrives in the chat.
    # That it is not dropped as a duplicate also shows the refused deliveries never reached the bot.
    accepted = push(bot, start, SECRET)
    assert accepted.status_code == 200, accepted.text
    intro = chat.expect_text("Do you agree?")
    assert "consent:yes" in str(intro["reply_markup"])
    assert patients(clinic) == 0  # nothing stored before consent

    # a forged button press (someone who found the URL) registers nobody ...
    forged = press_update(chat, intro, chat.button(intro, "consent:yes"))
    assert push(bot, forged, "not-the-secret").status_code == 403
    time.sleep(QUIET_S)
    assert patients(clinic) == 0
    assert [m["message_id"] for m in chat.messages()] == [intro["message_id"]]

    # ... while Telegram's genuine push of a press does: the whole consent step works over the webhook
    press = press_update(chat, intro, chat.button(intro, "consent:yes"))
    assert push(bot, press, SECRET).status_code == 200
    chat.expect_text("Send /new to start a case")
    assert patients(clinic) == 1
    answers = httpx.get(f"{emulator}/_emulator/users/{chat.user_id}/state").json()["callback_answers"]
    assert answers, "the bot answered the callback query"

    # a refused /help is never answered, even while the bot is demonstrably handling this chat
    assert push(bot, text_update(chat, "/help"), None).status_code == 403
    assert push(bot, text_update(chat, "/history"), SECRET).status_code == 200
    chat.expect_text("You have no cases yet")
    time.sleep(QUIET_S)
    assert not [m for m in chat.messages() if "Commands:" in (m.get("text") or "")]
    assert len(chat.messages()) == 3  # consent text, thanks, /history: nothing for the refused updates


@pytest.mark.parametrize("secret", [None, "", "   ", "not allowed!"], ids=["unset", "empty", "blank", "invalid"])
def test_webhook_mode_refuses_to_start_without_a_secret(clinic, emulator: str, tmp_path: Path,
                                                        secret: str | None) -> None:  # type: ignore[no-untyped-def]
    extra = {"SKINBRIDGE_WEBHOOK_URL": PUBLIC_URL}
    if secret is not None:
        extra["SKINBRIDGE_WEBHOOK_SECRET"] = secret
    env = bot_environment(emulator, extra)
    done = subprocess.run([*BOT_MODULE, "--listen", "127.0.0.1", "--port", str(free_port())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "SKINBRIDGE_WEBHOOK_SECRET" in done.stderr
    # it neither registered an unprotected webhook nor fell back to polling
    calls = httpx.get(f"{emulator}/_emulator/calls").json()
    assert [c["method"] for c in calls if c["method"].lower() in {"setwebhook", "getupdates"}] == []
