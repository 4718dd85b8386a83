"""The Telegram Bot API emulator, driven by python-telegram-bot's real Bot over real HTTP.

Each test talks to a uvicorn server on a free loopback port exactly the way production code does:
Bot(token, base_url=f"{url}/bot", base_file_url=f"{url}/file/bot").
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import io
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from telegram import (
    Bot,
    BotCommand,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaPhoto,
    ReplyKeyboardMarkup,
)
from telegram.error import BadRequest, Conflict, Forbidden, InvalidToken, RetryAfter
from telegram.ext import AIORateLimiter, ApplicationBuilder

from bot.emulator import create_app
from tests.support import serve_app

TOKEN = "123456789:AAF-test_Token"
USER = 4242
CONTROL = {"X-Emulator-Control": "1"}


@pytest.fixture
def url() -> Iterator[str]:
    with serve_app(create_app()) as base:
        yield base


def make_bot(url: str, token: str = TOKEN) -> Bot:
    return Bot(token, base_url=f"{url}/bot", base_file_url=f"{url}/file/bot")


def control(url: str, method: str, path: str, **kwargs: Any) -> Any:
    """Synchronous control-API call (the tests' own hand playing the Telegram user)."""
    response = httpx.request(method, f"{url}/_emulator{path}", headers=CONTROL, timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


async def acontrol(url: str, method: str, path: str, **kwargs: Any) -> Any:
    async with httpx.AsyncClient(headers=CONTROL, timeout=10) as client:
        response = await client.request(method, f"{url}/_emulator{path}", **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def jpeg(width: int, height: int, color: tuple[int, int, int] = (200, 120, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def say(url: str, text: str, **extra: Any) -> dict[str, Any]:
    return control(url, "POST", f"/users/{USER}/text", json={"text": text, "first_name": "Ada", **extra})


def seconds(value: int | dtm.timedelta) -> float:
    return value.total_seconds() if isinstance(value, dtm.timedelta) else float(value)


# --- identity and tokens -----------------------------------------------------------------------------
def test_get_me_derives_the_bot_from_the_token_and_rejects_malformed_tokens(url: str) -> None:
    async def scenario() -> None:
        async with make_bot(url) as bot:
            me = await bot.get_me()
            assert me.id == 123456789 and me.is_bot and me.username == "sandbox_123456789_bot"
        with pytest.raises(InvalidToken):
            async with make_bot(url, token="not-a-token"):
                pass

    asyncio.run(scenario())


# --- getUpdates ----------------------------------------------------------------------------------------
def test_long_poll_returns_as_soon_as_the_user_writes_and_offset_confirms(url: str) -> None:
    async def scenario() -> None:
        async with make_bot(url) as bot:
            started = time.monotonic()
            poll = asyncio.create_task(bot.get_updates(timeout=20))
            await asyncio.sleep(0.3)
            assert not poll.done(), "getUpdates must wait while there is nothing to deliver"
            sent = await acontrol(url, "POST", f"/users/{USER}/text",
                                  json={"text": "/start hello", "language_code": "de", "first_name": "Ada"})
            updates = await asyncio.wait_for(poll, timeout=5)
            assert time.monotonic() - started < 5, "the long poll must wake up on the new update, not time out"

            (update,) = updates
            assert update.update_id == sent["update_id"]
            message = update.message
            assert message.message_id == sent["message_id"] and message.chat.id == USER
            assert message.text == "/start hello" and message.from_user.language_code == "de"
            assert message.parse_entities(["bot_command"]) and message.entities[0].length == len("/start")

            # Not confirmed yet: delivered again. Confirmed with offset: gone.
            assert [u.update_id for u in await bot.get_updates(timeout=0)] == [update.update_id]
            assert await bot.get_updates(offset=update.update_id + 1, timeout=0) == ()

            for word in ("one", "two", "three"):
                await acontrol(url, "POST", f"/users/{USER}/text", json={"text": word})
            first = await bot.get_updates(offset=update.update_id + 1, limit=2, timeout=0)
            assert [u.message.text for u in first] == ["one", "two"]
            rest = await bot.get_updates(offset=first[-1].update_id + 1, timeout=0)
            assert [u.message.text for u in rest] == ["three"]

    asyncio.run(scenario())


def test_allowed_updates_filters_and_a_second_poller_conflicts(url: str) -> None:
    async def scenario() -> None:
        # Two Bot objects with one token = two bot processes polling at once.
        async with make_bot(url) as first, make_bot(url) as second:
            older = asyncio.create_task(first.get_updates(timeout=20))
            await asyncio.sleep(0.3)
            newer = asyncio.create_task(second.get_updates(timeout=20, allowed_updates=["callback_query"]))
            with pytest.raises(Conflict, match="terminated by other getUpdates request"):
                await asyncio.wait_for(older, timeout=5)
            await acontrol(url, "POST", f"/users/{USER}/text", json={"text": "not wanted"})
            await asyncio.sleep(0.3)
            assert not newer.done(), "a message must not wake a poller that only wants callback queries"
            newer.cancel()

    asyncio.run(scenario())


def test_a_raw_update_can_be_delivered_twice_with_the_same_id(url: str) -> None:
    say(url, "hi")  # makes the chat known

    async def scenario() -> None:
        async with make_bot(url) as bot:
            (first,) = await bot.get_updates(timeout=0)
            raw = first.to_dict()
            await acontrol(url, "POST", "/updates", json=raw)
            again = await bot.get_updates(offset=first.update_id + 1, timeout=0)
            assert [u.update_id for u in again] == [first.update_id]
            assert again[0].message.text == "hi"

    asyncio.run(scenario())


# --- messages, keyboards, edits --------------------------------------------------------------------------
def test_inline_keyboard_press_reaches_the_bot_and_edits_show_in_the_chat(url: str) -> None:
    say(url, "/start")

    async def scenario() -> None:
        async with make_bot(url) as bot:
            updates = await bot.get_updates(timeout=0)
            offset = updates[-1].update_id + 1
            keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("Yes, I consent", callback_data="consent:yes"),
                                              InlineKeyboardButton("No", callback_data="consent:no")]])
            sent = await bot.send_message(USER, "Do you consent?", reply_markup=keyboard)
            assert sent.reply_markup == keyboard

            pressed = await acontrol(url, "POST", f"/users/{USER}/press",
                                     json={"message_id": sent.message_id, "data": "consent:yes"})
            (update,) = await bot.get_updates(offset=offset, timeout=5)
            query = update.callback_query
            assert query.id == pressed["callback_query_id"] and query.data == "consent:yes"
            assert query.from_user.id == USER and query.message.message_id == sent.message_id
            assert await bot.answer_callback_query(query.id, text="Thanks")
            with pytest.raises(BadRequest, match="(?i)query is too old"):
                await bot.answer_callback_query(query.id)

            edited = await bot.edit_message_text("Consent recorded.", chat_id=USER, message_id=sent.message_id)
            assert edited.text == "Consent recorded." and edited.edit_date is not None
            assert edited.reply_markup is None, "an edit without reply_markup removes the inline keyboard"
            with pytest.raises(BadRequest, match="(?i)message is not modified"):
                await bot.edit_message_text("Consent recorded.", chat_id=USER, message_id=sent.message_id)

    asyncio.run(scenario())
    (view,) = control(url, "GET", f"/users/{USER}/messages")
    assert view["kind"] == "text" and view["text"] == "Consent recorded." and view["edited"] is True
    assert view["reply_markup"] is None
    state = control(url, "GET", f"/users/{USER}/state")
    assert state["callback_answers"][next(iter(state["callback_answers"]))]["text"] == "Thanks"

    # Buttons that the bot never showed cannot be pressed.
    response = httpx.post(f"{url}/_emulator/users/{USER}/press", headers=CONTROL,
                          json={"message_id": view["message_id"], "data": "consent:yes"})
    assert response.status_code == 409


def test_messages_view_lists_changes_after_a_seq_in_order(url: str) -> None:
    say(url, "hello")

    async def scenario() -> None:
        async with make_bot(url) as bot:
            first = await bot.send_message(USER, "first")
            await bot.send_message(USER, "second", reply_markup=ReplyKeyboardMarkup([["Yes", "No"]]))
            views = await acontrol(url, "GET", f"/users/{USER}/messages")
            assert [v["text"] for v in views] == ["first", "second"]
            assert views[1]["reply_markup"] == {"keyboard": [[{"text": "Yes"}, {"text": "No"}]]}
            mark = max(v["seq"] for v in views)
            assert await acontrol(url, "GET", f"/users/{USER}/messages", params={"after": mark}) == []
            await bot.edit_message_text("first, edited", chat_id=USER, message_id=first.message_id)
            await bot.delete_message(USER, first.message_id)
            changed = await acontrol(url, "GET", f"/users/{USER}/messages", params={"after": mark})
            assert [(v["message_id"], v.get("deleted", False)) for v in changed] == [(first.message_id, True)]
            with_user = await acontrol(url, "GET", f"/users/{USER}/messages", params={"include_user": 1})
            assert [(v["from"], v.get("text")) for v in with_user] == [("user", "hello"), ("bot", "second")]

    asyncio.run(scenario())


def test_html_parse_mode_gives_entities_and_bad_markup_is_refused(url: str) -> None:
    say(url, "hi")

    async def scenario() -> None:
        async with make_bot(url) as bot:
            sent = await bot.send_message(USER, "<b>Preliminary</b> result &lt;AI&gt; – 💡 <i>ok</i>", parse_mode="HTML")
            assert sent.text == "Preliminary result <AI> – 💡 ok"
            bold, italic = sent.entities
            assert (bold.type, bold.offset, bold.length) == ("bold", 0, 11)
            assert sent.parse_entity(italic) == "ok"  # offsets count UTF-16 units, as Telegram's do
            with pytest.raises(BadRequest, match="(?i)can't parse entities"):
                await bot.send_message(USER, "lesion size < 5 mm", parse_mode="HTML")
            with pytest.raises(BadRequest, match="(?i)Can't find end tag"):
                await bot.send_message(USER, "<b>unclosed", parse_mode="HTML")
            with pytest.raises(BadRequest, match="(?i)text is empty"):
                await bot.send_message(USER, "")
            with pytest.raises(BadRequest, match="(?i)too long"):
                await bot.send_message(USER, "x" * 4097)
            with pytest.raises(BadRequest, match="(?i)chat not found"):
                await bot.send_message(999, "nobody started this bot")
            with pytest.raises(BadRequest, match="(?i)BUTTON_DATA_INVALID"):
                await bot.send_message(USER, "x", reply_markup=InlineKeyboardMarkup(
                    [[InlineKeyboardButton("big", callback_data="d" * 65)]]))

    asyncio.run(scenario())


# --- files -----------------------------------------------------------------------------------------------
def test_bot_photo_upload_can_be_downloaded_via_get_file_and_the_chat_view(url: str) -> None:
    say(url, "hi")
    original = jpeg(1000, 600)

    async def scenario() -> str:
        async with make_bot(url) as bot:
            sent = await bot.send_photo(USER, photo=original, caption="Example image (AI-generated)")
            sizes = sent.photo
            assert [s.width for s in sizes] == [90, 320, 800, 1000], "Telegram-like size ladder, original last"
            assert sizes[-1].file_size == len(original)
            file = await bot.get_file(sizes[-1].file_id)
            assert bytes(await file.download_as_bytearray()) == original
            small = await (await bot.get_file(sizes[0].file_id)).download_as_bytearray()
            assert Image.open(io.BytesIO(bytes(small))).size == (90, 54)
            # Re-sending by file_id reuses the stored photo without an upload.
            again = await bot.send_photo(USER, photo=sizes[-1].file_id)
            assert again.photo[-1].file_unique_id == sizes[-1].file_unique_id
            with pytest.raises(BadRequest, match="(?i)wrong file identifier"):
                await bot.send_photo(USER, photo="no-such-file-id")
            return sizes[-1].file_id

    file_id = asyncio.run(scenario())
    views = control(url, "GET", f"/users/{USER}/messages")
    assert views[0]["kind"] == "photo" and views[0]["caption"] == "Example image (AI-generated)"
    response = httpx.get(url + views[0]["files"][0])
    assert response.content == original and response.headers["content-type"] == "image/jpeg"
    assert views[0]["files"][0].endswith(file_id)


def test_user_photo_reaches_the_bot_with_sizes_and_get_file_returns_the_same_bytes(url: str) -> None:
    original = jpeg(1500, 900)
    sent = control(url, "POST", f"/users/{USER}/photo", files={"file": ("lesion.jpg", original, "image/jpeg")},
                   data={"caption": "itchy since May"})

    async def scenario() -> None:
        async with make_bot(url) as bot:
            (update,) = await bot.get_updates(timeout=0)
            message = update.message
            assert message.message_id == sent["message_id"] and message.caption == "itchy since May"
            widths = [p.width for p in message.photo]
            assert widths == sorted(widths) and len(widths) == 5 and widths[-1] == 1500
            file = await bot.get_file(message.photo[-1].file_id)
            assert bytes(await file.download_as_bytearray()) == original

    asyncio.run(scenario())


def test_unreadable_and_huge_photos_reach_the_bot_untouched_for_its_own_gate(url: str) -> None:
    garbage = b"this is not an image" * 10
    bomb = io.BytesIO()
    Image.new("1", (7000, 7000), 0).save(bomb, "PNG")  # 49 megapixels in a few KB
    for data in (garbage, bomb.getvalue()):
        control(url, "POST", f"/users/{USER}/photo", files={"file": ("x.jpg", data, "image/jpeg")})

    async def scenario() -> None:
        async with make_bot(url) as bot:
            first, second = await bot.get_updates(timeout=0)
            assert [(p.width, p.height) for p in first.message.photo] == [(0, 0)]
            assert [(p.width, p.height) for p in second.message.photo] == [(7000, 7000)]
            for update, data in ((first, garbage), (second, bomb.getvalue())):
                file = await bot.get_file(update.message.photo[-1].file_id)
                assert bytes(await file.download_as_bytearray()) == data

    asyncio.run(scenario())


def test_user_album_and_document_arrive_as_telegram_sends_them(url: str) -> None:
    files = [("files", (f"p{i}.jpg", jpeg(400, 300, (i * 60, 80, 80)), "image/jpeg")) for i in range(3)]
    album = control(url, "POST", f"/users/{USER}/album", files=files, data={"caption": "three views"})
    pdf = b"%PDF-1.4 fake referral letter"
    control(url, "POST", f"/users/{USER}/document", files={"file": ("referral.pdf", pdf, "application/pdf")})

    async def scenario() -> None:
        async with make_bot(url) as bot:
            updates = await bot.get_updates(timeout=0)
            photos, document = updates[:3], updates[3].message.document
            assert {u.message.media_group_id for u in photos} == {album["media_group_id"]}
            assert [u.message.caption for u in photos] == ["three views", None, None]
            assert document.file_name == "referral.pdf" and document.mime_type == "application/pdf"
            data = await (await bot.get_file(document.file_id)).download_as_bytearray()
            assert bytes(data) == pdf

    asyncio.run(scenario())
    (doc_view,) = [v for v in control(url, "GET", f"/users/{USER}/messages", params={"include_user": 1})
                   if v["kind"] == "document"]
    response = httpx.get(url + doc_view["files"][0])
    # Non-image files are never rendered inline on the emulator's origin.
    assert response.content == pdf and response.headers["content-disposition"].startswith("attachment")


def test_send_media_group_uploads_an_album_shown_as_one_grid(url: str) -> None:
    say(url, "hi")
    images = [jpeg(300, 200, (10, 200, 10)), jpeg(300, 200, (10, 10, 200))]

    async def scenario() -> None:
        async with make_bot(url) as bot:
            sent = await bot.send_media_group(USER, [InputMediaPhoto(images[0], caption="Melanoma (example)"),
                                                     InputMediaPhoto(images[1], caption="Nevus (example)")])
            assert len(sent) == 2 and sent[0].media_group_id == sent[1].media_group_id
            data = await (await bot.get_file(sent[1].photo[-1].file_id)).download_as_bytearray()
            assert bytes(data) == images[1]

    asyncio.run(scenario())
    (view,) = control(url, "GET", f"/users/{USER}/messages")
    assert view["kind"] == "media_group" and len(view["files"]) == 2
    assert view["captions"] == ["Melanoma (example)", "Nevus (example)"]
    assert [httpx.get(url + f).content for f in view["files"]] == images


# --- commands, errors, failures ----------------------------------------------------------------------------
def test_set_my_commands_per_language(url: str) -> None:
    async def scenario() -> None:
        async with make_bot(url) as bot:
            assert await bot.set_my_commands([BotCommand("start", "Start"), BotCommand("help", "Help")])
            assert await bot.set_my_commands([BotCommand("start", "Starten")], language_code="de")
            assert [c.description for c in await bot.get_my_commands(language_code="de")] == ["Starten"]
            assert [c.command for c in await bot.get_my_commands()] == ["start", "help"]
            assert await bot.get_my_commands(language_code="fr") == ()
            with pytest.raises(BadRequest, match="(?i)BOT_COMMAND_INVALID"):
                await bot.set_my_commands([BotCommand("Bad Command", "x")])

    asyncio.run(scenario())
    control(url, "POST", f"/users/{USER}/text", json={"text": "hallo", "language_code": "de"})
    assert control(url, "GET", f"/users/{USER}/state")["commands"] == [{"command": "start", "description": "Starten"}]


def test_injected_429_raises_retry_after_and_the_rate_limiter_retries(url: str) -> None:
    say(url, "hi")
    control(url, "POST", "/fail", json={"method": "sendMessage", "times": 1, "retry_after": 7})

    async def scenario() -> None:
        async with make_bot(url) as bot:
            with pytest.raises(RetryAfter) as caught:
                await bot.send_message(USER, "first try")
            assert seconds(caught.value.retry_after) == 7
            assert (await bot.send_message(USER, "second try")).text == "second try"

        await acontrol(url, "POST", "/fail", json={"method": "sendMessage", "times": 1, "retry_after": 1})
        application = (ApplicationBuilder().token(TOKEN).base_url(f"{url}/bot").base_file_url(f"{url}/file/bot")
                       .rate_limiter(AIORateLimiter(max_retries=2)).build())
        async with application:
            started = time.monotonic()
            message = await application.bot.send_message(USER, "retried")
            assert message.text == "retried" and time.monotonic() - started >= 1

    asyncio.run(scenario())
    sends = control(url, "GET", "/calls", params={"method": "sendMessage"})
    assert [c["params"]["text"] for c in sends] == ["first try", "second try", "retried", "retried"]
    control(url, "DELETE", "/calls")
    assert control(url, "GET", "/calls") == []


def test_blocked_user_and_control_guard(url: str) -> None:
    say(url, "hi")
    control(url, "POST", f"/users/{USER}/block", json={"blocked": True})

    async def scenario() -> None:
        async with make_bot(url) as bot:
            with pytest.raises(Forbidden, match="(?i)blocked by the user"):
                await bot.send_message(USER, "are you there?")

    asyncio.run(scenario())
    # Without the control header (what a foreign web page could send) nothing changes.
    refused = httpx.post(f"{url}/_emulator/users/{USER}/text", json={"text": "forged"})
    assert refused.status_code == 403
    # A foreign host name (DNS rebinding onto 127.0.0.1) is not served at all.
    rebound = httpx.post(f"{url}/_emulator/users/{USER}/text", json={"text": "forged"},
                         headers={**CONTROL, "Host": "evil.example"})
    assert rebound.status_code == 400
    assert [v["text"] for v in control(url, "GET", f"/users/{USER}/messages", params={"include_user": 1})] == ["hi"]


def test_reset_clears_everything(url: str) -> None:
    say(url, "hi")
    control(url, "POST", "/reset")
    assert control(url, "GET", f"/users/{USER}/messages", params={"include_user": 1}) == []
    assert control(url, "GET", "/calls") == []

    async def scenario() -> None:
        async with make_bot(url) as bot:
            assert await bot.get_updates(timeout=0) == ()
            with pytest.raises(BadRequest, match="(?i)chat not found"):
                await bot.send_message(USER, "hello?")

    asyncio.run(scenario())


def test_a_restarted_sandbox_never_reuses_an_id_and_remembers_its_users(tmp_path: Any) -> None:
    """Telegram's update ids and a chat's message ids never repeat, and it remembers who started the bot;
    a bot (its inbox, its replay guard) counts on both, so the sandbox keeps them across restarts."""
    state = tmp_path / "sandbox-state.json"

    async def last_update(url: str) -> int:
        async with make_bot(url) as bot:
            updates = await bot.get_updates(timeout=0)
            await bot.get_updates(offset=updates[-1].update_id + 1, timeout=0)  # confirmed, as a bot does
            return updates[-1].update_id

    with serve_app(create_app(state_file=state)) as url:
        first = say(url, "before the restart")
        before = asyncio.run(last_update(url))
        control(url, "POST", "/reset")  # what tests do between cases: the ids still go on
        again = say(url, "after a reset")
        assert again["update_id"] > before and again["message_id"] > first["message_id"]
        seen = control(url, "GET", f"/users/{USER}/messages", params={"include_user": 1})[-1]["seq"]
    with serve_app(create_app(state_file=state)) as url:

        async def greet() -> Any:
            async with make_bot(url) as bot:
                return await bot.send_message(USER, "welcome back")  # no "chat not found": the user is known

        greeted = asyncio.run(greet())
        after = say(url, "after the restart")
        assert greeted.message_id > again["message_id"] and after["message_id"] > greeted.message_id
        assert after["update_id"] > again["update_id"]
        assert greeted.chat.first_name == "Ada"
        # a sandbox page left open polls on from the change it saw last, and still gets what is new
        fresh = control(url, "GET", f"/users/{USER}/messages", params={"include_user": 1, "after": seen})
        assert [v["text"] for v in fresh] == ["welcome back", "after the restart"]

    state.write_text("{not json")  # a damaged file: ids start from the clock, above any counted before
    with serve_app(create_app(state_file=state)) as url:
        assert say(url, "after the damage")["update_id"] > after["update_id"]


def test_module_entry_point_serves_the_bot_api_and_the_page(tmp_path: Any) -> None:
    import subprocess
    import sys

    from tests.support import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bot.emulator", "--port", str(port),
                                "--state", str(tmp_path / "sandbox-state.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                me = httpx.get(f"{base}/bot{TOKEN}/getMe", timeout=2).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None, "the emulator did not start"
                time.sleep(0.2)
        assert me == {"ok": True, "result": me["result"]} and me["result"]["id"] == 123456789
        page = httpx.get(f"{base}/")
        assert "AI-generated and preliminary" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert httpx.get(f"{base}/bot{TOKEN}/noSuchMethod").json() == {
            "ok": False, "error_code": 404, "description": "Not Found"}
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_a_ptb_application_polls_and_answers_like_on_telegram(url: str) -> None:
    """The production shape: Application + handlers + Updater.start_polling against the emulator."""
    from telegram import Update
    from telegram.ext import CallbackQueryHandler, CommandHandler, ContextTypes

    async def start(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        keyboard = InlineKeyboardMarkup([[InlineKeyboardButton("Begin", callback_data="begin")]])
        await update.message.reply_text(f"Welcome {update.effective_user.first_name}", reply_markup=keyboard)

    async def begin(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await update.callback_query.answer()
        await update.callback_query.edit_message_text("Please send a photo of the skin area.")

    async def scenario() -> None:
        application = (ApplicationBuilder().token(TOKEN).base_url(f"{url}/bot")
                       .base_file_url(f"{url}/file/bot").build())
        application.add_handler(CommandHandler("start", start))
        application.add_handler(CallbackQueryHandler(begin))
        async with application:
            await application.start()
            await application.updater.start_polling(poll_interval=0, timeout=2,
                                                    allowed_updates=Update.ALL_TYPES, drop_pending_updates=True)
            await acontrol(url, "POST", f"/users/{USER}/text", json={"text": "/start", "first_name": "Ada"})
            view = await wait_for_view(url, lambda v: v.get("text") == "Welcome Ada")
            await acontrol(url, "POST", f"/users/{USER}/press", json={"message_id": view["message_id"], "data": "begin"})
            await wait_for_view(url, lambda v: v.get("text") == "Please send a photo of the skin area." and v["edited"])
            await application.updater.stop()
            await application.stop()

    asyncio.run(scenario())
    methods = {c["method"] for c in control(url, "GET", "/calls")}
    assert {"getMe", "deleteWebhook", "getUpdates", "sendMessage", "answerCallbackQuery", "editMessageText"} <= methods


async def wait_for_view(url: str, predicate: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for view in await acontrol(url, "GET", f"/users/{USER}/messages"):
            if predicate(view):
                return view
        await asyncio.sleep(0.1)
    raise AssertionError("the bot did not show the expected message")
