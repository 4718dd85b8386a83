"""The sandbox chat page in a real browser (Debian chromium via Playwright) against the real emulator,
with a tiny echo bot built on python-telegram-bot polling getUpdates in a thread."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup, Update

from bot.emulator import create_app
from tests.e2e_support import CHROMIUM, CHROMIUM_ARGS
from tests.support import serve_app
from tests.conftest import service_missing

pytestmark = pytest.mark.browser

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "sandbox.png"
TOKEN = "5550001:echo-bot"


def png(color: tuple[int, int, int], size: tuple[int, int] = (480, 320)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


class EchoBot:
    """Answers text with a button + a photo; a button press edits the message; photos are acknowledged."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._loop())
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    async def _loop(self) -> None:
        async with Bot(TOKEN, base_url=f"{self.url}/bot", base_file_url=f"{self.url}/file/bot") as bot:
            offset = 0
            while not self.stop.is_set():
                for update in await bot.get_updates(offset=offset, timeout=1):
                    offset = update.update_id + 1
                    await self._handle(bot, update)

    async def _handle(self, bot: Bot, update: Update) -> None:
        if update.callback_query:
            query = update.callback_query
            await query.answer("Noted")
            await bot.edit_message_text(f"Confirmed: {query.data}", chat_id=query.message.chat.id,
                                        message_id=query.message.message_id)
            return
        message = update.message
        if message is None:
            return
        if message.photo:
            await bot.send_chat_action(message.chat.id, "typing")
            await bot.send_message(message.chat.id, f"Photo received ({message.photo[-1].width}px wide)")
            return
        keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("Confirm", callback_data="yes")]])
        await bot.send_message(message.chat.id, f"You said: {message.text}", reply_markup=keyboard)
        await bot.send_photo(message.chat.id, png((214, 120, 96)),
                             caption="Example image (AI-generated, preliminary)")


@pytest.fixture
def sandbox() -> Iterator[str]:
    if not CHROMIUM.exists():
        service_missing("Debian chromium", "not installed at /usr/bin/chromium (apt-get install chromium)")
    with serve_app(create_app()) as url:
        bot = EchoBot(url)
        bot.thread.start()
        try:
            yield url
        finally:
            bot.stop.set()
            bot.thread.join(timeout=10)
        assert not bot.errors, bot.errors


def test_patient_chats_with_a_bot_in_the_sandbox_page(sandbox: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 440, "height": 860})
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(sandbox + "/")

            expect(page.get_by_role("note")).to_contain_text("AI-generated and preliminary")
            user_id = page.locator("#user-id").inner_text()
            assert user_id.isdigit()

            # Markup typed by the user must come back as plain text, never as HTML.
            page.fill("#first-name", "Ada")
            page.fill("#text", "hello <img src=x onerror=alert(1)> <b>bot</b>")
            page.click("#send")
            bot_text = page.locator("li.msg.bot[data-kind=text]").first
            expect(bot_text).to_contain_text("You said: hello <img src=x onerror=alert(1)> <b>bot</b>")
            assert page.locator("li.msg b, li.msg img[src='x']").count() == 0
            expect(page.locator("li.msg.user").first).to_contain_text("hello <img")

            photo = page.locator("li.msg.bot[data-kind=photo] img")
            expect(photo).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth === 480", arg=photo.element_handle())
            expect(page.locator("li.msg.bot[data-kind=photo]")).to_contain_text("Example image (AI-generated")

            # The inline button goes to the bot as a callback query; its edit replaces the message in place.
            page.get_by_role("button", name="Confirm").click()
            expect(bot_text).to_contain_text("Confirmed: yes")
            expect(bot_text).to_contain_text("edited")
            expect(page.get_by_role("button", name="Confirm")).to_have_count(0)
            expect(page.locator("#toast")).to_have_text("Noted")

            # Two photos picked at once are sent as one album and shown as a grid.
            first, second = tmp_path / "a.png", tmp_path / "b.png"
            first.write_bytes(png((30, 160, 90), (320, 240)))
            second.write_bytes(png((40, 60, 200), (320, 240)))
            page.set_input_files("#files", [str(first), str(second)])
            album = page.locator("li.msg.user[data-kind=media_group] .album img")
            expect(album).to_have_count(2)
            expect(page.locator("li.msg.bot", has_text="Photo received (320px wide)")).to_have_count(2)

            # A reload keeps the same patient and rebuilds the conversation from the emulator.
            page.reload()
            expect(page.locator("#user-id")).to_have_text(user_id)
            expect(page.locator("li.msg")).to_have_count(6)
            page.wait_for_timeout(1500)  # two poll rounds: an old button answer must not pop up again
            expect(page.locator("#toast")).to_be_hidden()
            assert page_errors == []

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.eval_on_selector("#chat", "chat => { chat.scrollTop = 0; }")
            page.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
