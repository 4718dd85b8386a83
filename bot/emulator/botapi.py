"""The emulated Bot API: /bot<token>/<method>, answering like api.telegram.org does.

python-telegram-bot talks to it unchanged via Bot(token, base_url=".../bot", base_file_url=".../file/bot").
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from bot.emulator.content import now, store_document, store_photo
from bot.emulator.errors import ApiError, bad_request
from bot.emulator.markup import MAX_CAPTION, MAX_TEXT, check_reply_markup, format_text, utf16_len
from bot.emulator.media import DOWNLOAD_LIMIT
from bot.emulator.params import Params, read_params
from bot.emulator.world import StoredMessage, User, World

TOKEN = re.compile(r"[0-9]{1,20}:[A-Za-z0-9_-]{1,100}")
CHAT_ACTIONS = {"typing", "upload_photo", "record_video", "upload_video", "record_voice", "upload_voice",
                "upload_document", "choose_sticker", "find_location", "record_video_note", "upload_video_note"}
COMMAND_NAME = re.compile(r"[a-z0-9_]{1,32}")


def bot_user(token: str) -> dict[str, Any]:
    """The bot behind a token: its id is the token's numeric part, as on Telegram."""
    bot_id = int(token.split(":", 1)[0])
    return {"id": bot_id, "is_bot": True, "first_name": "SkinBridge Sandbox", "username": f"sandbox_{bot_id}_bot"}


@dataclass
class Call:
    world: World
    token: str
    params: Params
    request: Request

    @property
    def bot(self) -> dict[str, Any]:
        return bot_user(self.token)


Handler = Callable[[Call], Awaitable[Any]]
HANDLERS: dict[str, tuple[str, Handler]] = {}


def method(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        HANDLERS[name.lower()] = (name, handler)
        return handler

    return register


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.code)


async def bot_endpoint(request: Request) -> Response:
    world: World = request.app.state.world
    token = request.path_params["token"]
    if not TOKEN.fullmatch(token):
        return error_response(ApiError(401, "Unauthorized"))
    requested = request.path_params["method"]
    name, handler = HANDLERS.get(requested.lower(), (requested, None))
    try:
        params = await read_params(request)
    except ApiError as exc:
        world.log_call(name, {})
        return error_response(exc)
    world.log_call(name, params.loggable())
    if handler is None:
        return error_response(ApiError(404, "Not Found"))
    failure = world.take_failure(name)
    if failure is not None:
        return error_response(failure)
    try:
        result = await handler(Call(world, token, params, request))
    except ApiError as exc:
        return error_response(exc)
    return JSONResponse({"ok": True, "result": result})


async def file_endpoint(request: Request) -> Response:
    world: World = request.app.state.world
    if not TOKEN.fullmatch(request.path_params["token"]):
        return error_response(ApiError(401, "Unauthorized"))
    stored = world.files.by_path(request.path_params["file_path"])
    if stored is None:
        return error_response(ApiError(404, "Not Found"))
    return FileResponse(stored.disk_path, media_type=stored.mime_type)


# --- helpers -------------------------------------------------------------------------------------
def _chat(call: Call) -> User:
    chat_id = call.params.values.get("chat_id")
    if chat_id in (None, ""):
        raise bad_request("chat_id is empty")
    try:
        return call.world.chat_for_bot(int(chat_id))
    except (TypeError, ValueError):
        raise bad_request("chat not found") from None  # "@channel" names: no channels in the emulator


def _formatted(call: Call, field: str, *, limit: int, required: bool) -> tuple[str | None, list[dict[str, Any]], str | None]:
    """Text or caption with its entities: parse_mode parsed, or explicit entities kept."""
    raw = call.params.str(field, required=required, empty="message text is empty")
    parse_mode = call.params.str("parse_mode")
    if raw is None:
        return None, [], parse_mode
    entities_field = "entities" if field == "text" else "caption_entities"
    explicit = call.params.json(entities_field)
    if explicit and parse_mode:
        raise bad_request(f"can't use {entities_field} together with parse_mode")
    text, entities = (raw, list(explicit)) if explicit else format_text(raw, parse_mode)
    if required and not text.strip():
        raise bad_request("message text is empty")
    if utf16_len(text) > limit:
        raise bad_request("message is too long" if field == "text" else "message caption is too long")
    return text, entities, parse_mode


def _reply_to(call: Call, chat: User) -> dict[str, Any] | None:
    reply = call.params.json("reply_parameters")
    message_id = reply.get("message_id") if isinstance(reply, dict) else call.params.int("reply_to_message_id")
    if message_id is None:
        return None
    target = call.world.find(chat.id, int(message_id))
    if target is None:
        if isinstance(reply, dict) and reply.get("allow_sending_without_reply"):
            return None
        raise bad_request("message to be replied not found")
    return {k: v for k, v in target.message.items() if k != "reply_to_message"}


def _new_message(call: Call, chat: User, body: dict[str, Any], *, parse_mode: str | None,
                 media_group_id: str | None = None, with_markup: bool = True) -> StoredMessage:
    markup = check_reply_markup(call.params.json("reply_markup")) if with_markup else None
    reply_to = _reply_to(call, chat)
    message: dict[str, Any] = {"message_id": call.world.next_message_id(chat.id), "from": call.bot,
                               "chat": chat.as_chat(), "date": now()}
    if media_group_id:
        message["media_group_id"] = media_group_id
    if reply_to:
        message["reply_to_message"] = reply_to
    message.update(body)
    keyboard = None
    if markup and "inline_keyboard" in markup:
        message["reply_markup"] = markup  # Telegram echoes only inline keyboards in the Message
    elif markup:
        keyboard = markup
    stored = call.world.store(chat.id, message, from_bot=True, parse_mode=parse_mode)
    stored.keyboard = keyboard
    return stored


def _with_text(body: dict[str, Any], key: str, text: str | None, entities: list[dict[str, Any]]) -> dict[str, Any]:
    if text is not None:
        body[key] = text
        if entities:
            body["entities" if key == "text" else "caption_entities"] = entities
    return body


async def _photo_sizes(call: Call, value: Any, upload_field: str) -> list[dict[str, Any]]:
    """A photo given as upload, attach:// reference or file_id; URLs cannot be fetched offline."""
    upload = call.params.uploads.get(upload_field)
    if isinstance(value, str) and value.startswith("attach://"):
        upload = call.params.uploads.get(value[len("attach://"):])
        if upload is None:
            raise bad_request("wrong file identifier/HTTP URL specified")
    if upload is not None:
        return await store_photo(call.world, upload.data)
    if not isinstance(value, str) or not value:
        raise bad_request("there is no photo in the request")
    sizes = call.world.photo_sets.get(value)
    if sizes is None:
        if call.world.files.get(value) is not None:
            raise bad_request("wrong type of the web page content")  # a document id used as photo
        raise bad_request("wrong file identifier/HTTP URL specified")
    return sizes


def _document(call: Call, value: Any, upload_field: str) -> dict[str, Any]:
    upload = call.params.uploads.get(upload_field)
    if isinstance(value, str) and value.startswith("attach://"):
        upload = call.params.uploads.get(value[len("attach://"):])
    if upload is not None:
        return store_document(call.world, upload.data, file_name=upload.filename, mime_type=upload.content_type)
    stored = call.world.files.get(value) if isinstance(value, str) else None
    if stored is None:
        raise bad_request("wrong file identifier/HTTP URL specified")
    document: dict[str, Any] = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                                "mime_type": stored.mime_type, "file_size": stored.size}
    if stored.file_name:
        document["file_name"] = stored.file_name
    return document


def _edit_target(call: Call) -> StoredMessage:
    if call.params.has("inline_message_id"):
        raise bad_request("MESSAGE_ID_INVALID")  # no inline mode in the emulator
    chat = _chat(call)
    stored = call.world.find(chat.id, call.params.int("message_id", required=True))
    if stored is None:
        raise bad_request("message to edit not found")
    if not stored.from_bot:
        raise bad_request("message can't be edited")
    return stored


def _apply_edit(call: Call, stored: StoredMessage, changes: dict[str, Any], drop: tuple[str, ...]) -> dict[str, Any]:
    """Edit in place; Telegram refuses edits that change nothing, and an edit without reply_markup
    removes the inline keyboard."""
    markup = check_reply_markup(call.params.json("reply_markup"))
    updated = {k: v for k, v in stored.message.items() if k not in drop and k not in ("reply_markup", "edit_date")}
    updated.update(changes)
    if markup and "inline_keyboard" in markup:
        updated["reply_markup"] = markup
    current = {k: v for k, v in stored.message.items() if k != "edit_date"}
    if updated == current:
        raise bad_request("message is not modified: specified new message content and reply markup are exactly "
                          "the same as a current content and reply markup of the message")
    updated["edit_date"] = now()
    stored.message = updated
    call.world.touch(stored)
    return updated


# --- methods -------------------------------------------------------------------------------------
@method("getMe")
async def get_me(call: Call) -> dict[str, Any]:
    return {**call.bot, "can_join_groups": False, "can_read_all_group_messages": False,
            "supports_inline_queries": False, "can_connect_to_business": False, "has_main_web_app": False}


@method("logOut")
async def log_out(call: Call) -> bool:
    return True


@method("close")
async def close(call: Call) -> bool:
    return True


@method("getUpdates")
async def get_updates(call: Call) -> list[dict[str, Any]]:
    limit = min(max(call.params.int("limit", default=100) or 100, 1), 100)
    allowed = call.params.json("allowed_updates")
    if allowed is not None and not isinstance(allowed, list):
        raise bad_request("can't parse allowed_updates")
    client_gone = asyncio.ensure_future(_disconnected(call.request))
    try:
        return await call.world.get_updates(offset=call.params.int("offset", default=0) or 0, limit=limit,
                                            timeout=max(call.params.float("timeout", default=0.0), 0.0),
                                            allowed_updates=allowed, client_gone=client_gone)
    finally:
        client_gone.cancel()


async def _disconnected(request: Request) -> None:
    """Completes when the client hangs up (the request body has been read, so only disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@method("setWebhook")
async def set_webhook(call: Call) -> bool:
    url = call.params.str("url") or ""
    if url and not url.startswith("https://"):
        raise bad_request("bad webhook: An HTTPS URL must be provided for webhook")
    call.world.webhook = {"url": url, "secret_token": call.params.str("secret_token")} if url else {}
    if call.params.bool("drop_pending_updates"):
        call.world._pending.clear()
    return True  # stored only: the emulator never pushes to webhooks


@method("deleteWebhook")
async def delete_webhook(call: Call) -> bool:
    call.world.webhook = {}
    if call.params.bool("drop_pending_updates"):
        call.world._pending.clear()
    return True


@method("getWebhookInfo")
async def get_webhook_info(call: Call) -> dict[str, Any]:
    return {"url": call.world.webhook.get("url", ""), "has_custom_certificate": False,
            "pending_update_count": call.world.pending_count()}


@method("getChat")
async def get_chat(call: Call) -> dict[str, Any]:
    chat = _chat(call)
    return {**chat.as_chat(), "accent_color_id": 0, "max_reaction_count": 11, "accepted_gift_types":
            {"unlimited_gifts": False, "limited_gifts": False, "unique_gifts": False, "premium_subscription": False}}


@method("sendMessage")
async def send_message(call: Call) -> dict[str, Any]:
    chat = _chat(call)
    text, entities, parse_mode = _formatted(call, "text", limit=MAX_TEXT, required=True)
    return _new_message(call, chat, _with_text({}, "text", text, entities), parse_mode=parse_mode).message


@method("sendPhoto")
async def send_photo(call: Call) -> dict[str, Any]:
    chat = _chat(call)
    caption, entities, parse_mode = _formatted(call, "caption", limit=MAX_CAPTION, required=False)
    sizes = await _photo_sizes(call, call.params.values.get("photo"), "photo")
    body = _with_text({"photo": sizes}, "caption", caption, entities)
    return _new_message(call, chat, body, parse_mode=parse_mode).message


@method("sendDocument")
async def send_document(call: Call) -> dict[str, Any]:
    chat = _chat(call)
    caption, entities, parse_mode = _formatted(call, "caption", limit=MAX_CAPTION, required=False)
    document = _document(call, call.params.values.get("document"), "document")
    body = _with_text({"document": document}, "caption", caption, entities)
    return _new_message(call, chat, body, parse_mode=parse_mode).message


@method("sendMediaGroup")
async def send_media_group(call: Call) -> list[dict[str, Any]]:
    chat = _chat(call)
    media = call.params.json("media")
    if not isinstance(media, list) or not 2 <= len(media) <= 10:
        raise bad_request("wrong number of media in the media group: must include 2-10 items")
    kinds = {item.get("type") for item in media if isinstance(item, dict)}
    if not kinds <= {"photo", "video"} and not kinds <= {"document"} and not kinds <= {"audio"}:
        raise bad_request("MEDIA_GROUP_TYPES_MIXED" if len(kinds) > 1 else "unsupported media type")
    if not kinds <= {"photo", "document"}:
        raise bad_request("unsupported media type in the emulator (only photo and document albums)")
    group_id = str(10_000_000_000_000_000 + call.world.next_seq())
    bodies: list[tuple[dict[str, Any], str | None]] = []
    for item in media:
        caption_text = item.get("caption")
        caption, entities = (None, [])
        if caption_text:
            caption, entities = format_text(caption_text, item.get("parse_mode"))
            if utf16_len(caption) > MAX_CAPTION:
                raise bad_request("message caption is too long")
        if item["type"] == "photo":
            body = {"photo": await _photo_sizes(call, item.get("media"), "")}
        else:
            body = {"document": _document(call, item.get("media"), "")}
        bodies.append((_with_text(body, "caption", caption, entities), item.get("parse_mode")))
    return [_new_message(call, chat, body, parse_mode=mode, media_group_id=group_id, with_markup=False).message
            for body, mode in bodies]


@method("editMessageText")
async def edit_message_text(call: Call) -> dict[str, Any]:
    stored = _edit_target(call)
    if "text" not in stored.message:
        raise bad_request("there is no text in the message to edit")
    text, entities, parse_mode = _formatted(call, "text", limit=MAX_TEXT, required=True)
    result = _apply_edit(call, stored, _with_text({}, "text", text, entities), drop=("text", "entities"))
    stored.parse_mode = parse_mode
    return result


@method("editMessageCaption")
async def edit_message_caption(call: Call) -> dict[str, Any]:
    stored = _edit_target(call)
    if "text" in stored.message:
        raise bad_request("there is no caption in the message to edit")
    caption, entities, parse_mode = _formatted(call, "caption", limit=MAX_CAPTION, required=False)
    result = _apply_edit(call, stored, _with_text({}, "caption", caption, entities), drop=("caption", "caption_entities"))
    stored.parse_mode = parse_mode
    return result


@method("editMessageReplyMarkup")
async def edit_message_reply_markup(call: Call) -> dict[str, Any]:
    return _apply_edit(call, _edit_target(call), {}, drop=())


@method("deleteMessage")
async def delete_message(call: Call) -> bool:
    chat = _chat(call)
    stored = call.world.find(chat.id, call.params.int("message_id", required=True))
    if stored is None:
        raise bad_request("message to delete not found")
    stored.deleted = True
    call.world.touch(stored, edited=False)
    return True


@method("sendChatAction")
async def send_chat_action(call: Call) -> bool:
    chat = _chat(call)
    action = call.params.str("action", required=True)
    if action not in CHAT_ACTIONS:
        raise bad_request("wrong parameter action in request")
    call.world.chat_actions[chat.id] = (action, time.monotonic())
    return True


@method("answerCallbackQuery")
async def answer_callback_query(call: Call) -> bool:
    query_id = call.params.str("callback_query_id", required=True) or ""
    record = call.world.callbacks.get(query_id)
    if record is None or record.answered:
        raise bad_request("query is too old and response timeout expired or query ID is invalid")
    text = call.params.str("text")
    if text and len(text) > 200:
        raise bad_request("MESSAGE_TOO_LONG")
    record.answered, record.text, record.show_alert = True, text, call.params.bool("show_alert")
    return True


@method("getFile")
async def get_file(call: Call) -> dict[str, Any]:
    file_id = call.params.str("file_id", required=True) or ""
    stored = call.world.files.get(file_id)
    if stored is None:
        raise bad_request("invalid file_id")
    if stored.size > DOWNLOAD_LIMIT:
        raise bad_request("file is too big")
    return {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id, "file_size": stored.size,
            "file_path": stored.file_path}


def _commands_key(call: Call) -> tuple[str, str]:
    scope = call.params.json("scope") or {"type": "default"}
    if not isinstance(scope, dict) or "type" not in scope:
        raise bad_request("can't parse BotCommandScope")
    language = call.params.str("language_code") or ""
    if language and not re.fullmatch(r"[a-z]{2}", language):
        raise bad_request("invalid language code specified")
    return json.dumps(scope, sort_keys=True), language


@method("setMyCommands")
async def set_my_commands(call: Call) -> bool:
    commands = call.params.json("commands")
    if not isinstance(commands, list) or len(commands) > 100:
        raise bad_request("can't parse commands JSON object")
    cleaned = []
    for command in commands:
        name = str(command.get("command", "")).lstrip("/") if isinstance(command, dict) else ""
        description = str(command.get("description", "")) if isinstance(command, dict) else ""
        if not COMMAND_NAME.fullmatch(name):
            raise bad_request("BOT_COMMAND_INVALID")
        if not 1 <= len(description) <= 256:
            raise bad_request("BOT_COMMAND_DESCRIPTION_INVALID")
        cleaned.append({"command": name, "description": description})
    key = _commands_key(call)
    if cleaned:
        call.world.commands[key] = cleaned
    else:
        call.world.commands.pop(key, None)
    return True


@method("getMyCommands")
async def get_my_commands(call: Call) -> list[dict[str, str]]:
    return call.world.commands.get(_commands_key(call), [])


@method("deleteMyCommands")
async def delete_my_commands(call: Call) -> bool:
    call.world.commands.pop(_commands_key(call), None)
    return True
