"""Control API under /_emulator/: plays the Telegram users (for tests and the sandbox page) and
inspects what the bot did. It is a test double of Telegram itself, so it keeps state in memory."""

from __future__ import annotations

import json
import secrets
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from bot.emulator.content import chat_view, now, store_document, store_photo
from bot.emulator.errors import ControlError
from bot.emulator.markup import MAX_CAPTION, MAX_TEXT, command_entities, utf16_len
from bot.emulator.media import INLINE_TYPES, sniff_image_mime
from bot.emulator.world import CallbackRecord, Failure, User, World

CONTROL_HEADER = "x-emulator-control"
MAX_UPLOAD = 50 * 1024 * 1024
MAX_USER_ID = 2**52


def _world(request: Request) -> World:
    return request.app.state.world


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except json.JSONDecodeError:
        raise ControlError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise ControlError(400, "the body must be a JSON object")
    return body


def _user(request: Request, fields: dict[str, Any]) -> User:
    user_id = int(request.path_params["user_id"])
    if not 0 < user_id < MAX_USER_ID:
        raise ControlError(400, "user_id must be a positive integer")
    return _world(request).user(user_id, first_name=_opt_str(fields.get("first_name")),
                                language_code=_opt_str(fields.get("language_code")),
                                username=_opt_str(fields.get("username")))


def _opt_str(value: Any) -> str | None:
    return str(value)[:64] if isinstance(value, str) and value.strip() else None


def _user_message(world: World, user: User, body: dict[str, Any]) -> dict[str, Any]:
    return {"message_id": world.next_message_id(user.id), "from": user.as_user(), "chat": user.as_chat(),
            "date": now(), **body}


def _deliver(world: World, user: User, message: dict[str, Any]) -> dict[str, int]:
    world.store(user.id, message, from_bot=False)
    update_id = world.push_update({"message": message})
    return {"update_id": update_id, "message_id": message["message_id"]}


async def _read_upload(value: Any) -> tuple[bytes, str | None, str | None]:
    if not isinstance(value, UploadFile):
        raise ControlError(400, "a multipart 'file' part is required")
    data = await value.read()
    if not data:
        raise ControlError(400, "the file is empty")
    if len(data) > MAX_UPLOAD:
        raise ControlError(413, "the file is larger than the emulator accepts (50 MB)")
    return data, value.filename, value.content_type


def _caption(value: Any) -> dict[str, Any]:
    caption = _opt_text(value)
    if caption is None:
        return {}
    if utf16_len(caption) > MAX_CAPTION:
        raise ControlError(400, "caption is too long (1024 characters at most)")
    return {"caption": caption}


def _opt_text(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


# --- users talk to the bot -----------------------------------------------------------------------
async def user_text(request: Request) -> Response:
    body = await _json_body(request)
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ControlError(400, "text is required")
    if utf16_len(text) > MAX_TEXT:
        raise ControlError(400, "text is too long (4096 characters at most)")
    world = _world(request)
    user = _user(request, body)
    content: dict[str, Any] = {"text": text}
    if entities := command_entities(text):
        content["entities"] = entities
    return JSONResponse(_deliver(world, user, _user_message(world, user, content)))


async def user_photo(request: Request) -> Response:
    async with request.form(max_part_size=1024 * 1024) as form:
        data, _, _ = await _read_upload(form.get("file"))
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    world = _world(request)
    user = _user(request, fields)
    content: dict[str, Any] = {"photo": await store_photo(world, data), **_caption(fields.get("caption"))}
    if group := _opt_text(fields.get("media_group_id")):
        content["media_group_id"] = group
    return JSONResponse(_deliver(world, user, _user_message(world, user, content)))


async def user_document(request: Request) -> Response:
    async with request.form(max_part_size=1024 * 1024) as form:
        data, filename, content_type = await _read_upload(form.get("file"))
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    world = _world(request)
    user = _user(request, fields)
    mime = _opt_text(fields.get("mime_type")) or content_type or sniff_image_mime(data)
    document = store_document(world, data, file_name=_opt_text(fields.get("file_name")) or filename, mime_type=mime)
    content = {"document": document, **_caption(fields.get("caption"))}
    return JSONResponse(_deliver(world, user, _user_message(world, user, content)))


async def user_album(request: Request) -> Response:
    """Several photos sent at once: one message each, sharing a media_group_id (caption on the first)."""
    async with request.form(max_files=10, max_part_size=1024 * 1024) as form:
        uploads = [await _read_upload(part) for part in form.getlist("files")]
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    if not 2 <= len(uploads) <= 10:
        raise ControlError(400, "an album has 2 to 10 'files' parts")
    world = _world(request)
    user = _user(request, fields)
    group_id = str(20_000_000_000_000_000 + world.next_seq())
    caption = _caption(fields.get("caption"))
    messages = []
    for index, (data, _, _) in enumerate(uploads):
        content: dict[str, Any] = {"photo": await store_photo(world, data), "media_group_id": group_id}
        if index == 0:
            content.update(caption)
        messages.append(_user_message(world, user, content))
    delivered = [_deliver(world, user, message) for message in messages]
    return JSONResponse({"media_group_id": group_id, "update_ids": [d["update_id"] for d in delivered],
                         "message_ids": [d["message_id"] for d in delivered]})


async def user_press(request: Request) -> Response:
    """The user taps an inline button: only buttons the bot really showed can be pressed."""
    body = await _json_body(request)
    world = _world(request)
    user = _user(request, body)
    try:
        message_id = int(body.get("message_id"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ControlError(400, "message_id is required") from None
    data = body.get("data")
    stored = world.find(user.id, message_id)
    if stored is None or not stored.from_bot:
        raise ControlError(404, "no such bot message in this chat")
    rows = (stored.message.get("reply_markup") or {}).get("inline_keyboard", [])
    if not any(button.get("callback_data") == data for row in rows for button in row):
        raise ControlError(409, "that message has no inline button with this callback_data")
    query_id = str(secrets.randbits(62))
    world.callbacks[query_id] = CallbackRecord(user.id, message_id, str(data))
    query = {"id": query_id, "from": user.as_user(), "message": stored.message,
             "chat_instance": str(abs(hash(("chat", user.id))) % 10**18), "data": data}
    update_id = world.push_update({"callback_query": query})
    return JSONResponse({"update_id": update_id, "callback_query_id": query_id})


async def user_block(request: Request) -> Response:
    body = await _json_body(request)
    user = _user(request, body)
    user.blocked_bot = bool(body.get("blocked", True))
    _world(request).remember()
    return JSONResponse({"blocked": user.blocked_bot})


async def user_messages(request: Request) -> Response:
    user_id = int(request.path_params["user_id"])
    try:
        after = int(request.query_params.get("after", "0"))
    except ValueError:
        raise ControlError(400, "after must be an integer") from None
    include_user = request.query_params.get("include_user", "0").lower() in ("1", "true", "yes")
    return JSONResponse(chat_view(_world(request), user_id, after=after, include_user=include_user))


async def user_state(request: Request) -> Response:
    """What a Telegram client shows around the messages: typing status, command menu, button answers."""
    world = _world(request)
    user_id = int(request.path_params["user_id"])
    user = world.users.get(user_id)
    language = request.query_params.get("language_code") or (user.language_code if user else None) or ""
    answers = {qid: {"answered": r.answered, "text": r.text, "show_alert": r.show_alert}
               for qid, r in world.callbacks.items() if r.chat_id == user_id}
    return JSONResponse({"chat_action": world.chat_action(user_id), "commands": resolve_commands(world, user_id, language),
                         "callback_answers": answers, "blocked": bool(user and user.blocked_bot)})


def resolve_commands(world: World, chat_id: int, language: str) -> list[dict[str, str]]:
    """The command menu a client shows: narrowest scope first, then the user's language before the default."""
    scopes = [{"type": "chat", "chat_id": chat_id}, {"type": "all_private_chats"}, {"type": "default"}]
    for scope in scopes:
        key = json.dumps(scope, sort_keys=True)
        for lang in ([language[:2]] if language else []) + [""]:
            if (key, lang) in world.commands:
                return world.commands[(key, lang)]
    return []


# --- test hooks ----------------------------------------------------------------------------------
async def raw_update(request: Request) -> Response:
    """Enqueue an Update exactly as given (keeps its update_id, so duplicates can be delivered)."""
    body = await _json_body(request)
    if not any(key in body for key in ("message", "edited_message", "callback_query", "my_chat_member",
                                        "inline_query", "poll_answer", "chat_member", "message_reaction")):
        raise ControlError(400, "the body must be an Update object")
    world = _world(request)
    chat = (body.get("message") or {}).get("chat") or {}
    if chat.get("type") == "private" and isinstance(chat.get("id"), int):
        world.user(chat["id"], first_name=chat.get("first_name"))  # lets the bot answer this chat
    forced = "update_id" in body
    return JSONResponse({"update_id": world.push_update(body, forced=forced)})


async def calls(request: Request) -> Response:
    world = _world(request)
    if request.method == "DELETE":
        world.calls.clear()
        return JSONResponse({"ok": True})
    wanted = request.query_params.get("method", "").lower()
    return JSONResponse([c for c in world.calls if not wanted or c["method"].lower() == wanted])


async def fail(request: Request) -> Response:
    """Make the next N calls of a method fail (429 with retry_after by default)."""
    body = await _json_body(request)
    method = body.get("method")
    if not isinstance(method, str) or not method:
        raise ControlError(400, "method is required")
    times = int(body.get("times", 1))
    code = int(body.get("error_code", 429))
    retry_after = body.get("retry_after", 1 if code == 429 else None)
    description = body.get("description") or (
        f"Too Many Requests: retry after {retry_after}" if code == 429 else "Internal Server Error")
    _world(request).add_failure(method, Failure(times, code, str(description),
                                                int(retry_after) if retry_after is not None else None))
    return JSONResponse({"ok": True})


async def file_bytes(request: Request) -> Response:
    stored = _world(request).files.get(request.path_params["file_id"])
    if stored is None:
        raise ControlError(404, "no such file")
    inline = stored.mime_type in INLINE_TYPES
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox",
               "Cache-Control": "private, max-age=3600"}
    return FileResponse(stored.disk_path, media_type=stored.mime_type, headers=headers,
                        content_disposition_type="inline" if inline else "attachment",
                        filename=None if inline else (stored.file_name or stored.file_path.rsplit("/", 1)[-1]))


async def reset(request: Request) -> Response:
    _world(request).reset()
    return JSONResponse({"ok": True})


def routes() -> list[Route]:
    users = "/_emulator/users/{user_id:int}"
    return [
        Route(f"{users}/text", user_text, methods=["POST"]),
        Route(f"{users}/photo", user_photo, methods=["POST"]),
        Route(f"{users}/document", user_document, methods=["POST"]),
        Route(f"{users}/album", user_album, methods=["POST"]),
        Route(f"{users}/press", user_press, methods=["POST"]),
        Route(f"{users}/block", user_block, methods=["POST"]),
        Route(f"{users}/messages", user_messages, methods=["GET"]),
        Route(f"{users}/state", user_state, methods=["GET"]),
        Route("/_emulator/updates", raw_update, methods=["POST"]),
        Route("/_emulator/calls", calls, methods=["GET", "DELETE"]),
        Route("/_emulator/fail", fail, methods=["POST"]),
        Route("/_emulator/files/{file_id}", file_bytes, methods=["GET"]),
        Route("/_emulator/reset", reset, methods=["POST"]),
    ]
