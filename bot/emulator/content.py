"""Message content shared by the Bot API and the control API: stored photos/documents and the chat view."""

from __future__ import annotations

import time
from typing import Any

from starlette.concurrency import run_in_threadpool

from bot.emulator.media import photo_variants
from bot.emulator.world import StoredMessage, World


async def store_photo(world: World, data: bytes) -> list[dict[str, Any]]:
    """Store a photo as Telegram does: several PhotoSize entries, smallest first, the original last."""
    variants = await run_in_threadpool(photo_variants, data)
    sizes = []
    for variant in variants:
        stored = world.files.add(variant.data, folder="photos", mime_type=variant.mime_type,
                                 width=variant.width, height=variant.height)
        sizes.append(stored.photo_size())
    for size in sizes:
        world.photo_sets[size["file_id"]] = sizes
    return sizes


def store_document(world: World, data: bytes, *, file_name: str | None, mime_type: str | None) -> dict[str, Any]:
    stored = world.files.add(data, folder="documents", mime_type=mime_type, file_name=file_name)
    document: dict[str, Any] = {"file_id": stored.file_id, "file_unique_id": stored.file_unique_id,
                                "mime_type": stored.mime_type, "file_size": stored.size}
    if file_name:
        document["file_name"] = file_name
    return document


def now() -> int:
    return int(time.time())


def _file_url(file_id: str) -> str:
    return f"/_emulator/files/{file_id}"


def message_view(stored: StoredMessage) -> dict[str, Any]:
    """One message as the control API shows it: what a Telegram client would render."""
    message = stored.message
    view: dict[str, Any] = {
        "message_id": stored.message_id,
        "seq": stored.seq,
        "from": "bot" if stored.from_bot else "user",
        "date": message.get("date"),
        "edited": stored.edited,
        "media_group_id": message.get("media_group_id"),
        "reply_markup": message.get("reply_markup") or stored.keyboard,
        "parse_mode": stored.parse_mode,
        "files": [],
    }
    if stored.deleted:
        return {**view, "kind": "deleted", "deleted": True}
    if "text" in message:
        view.update(kind="text", text=message["text"], entities=message.get("entities", []))
    elif "photo" in message:
        largest = message["photo"][-1]
        view.update(kind="photo", caption=message.get("caption"), files=[_file_url(largest["file_id"])],
                    width=largest["width"], height=largest["height"])
    elif "document" in message:
        document = message["document"]
        view.update(kind="document", caption=message.get("caption"), files=[_file_url(document["file_id"])],
                    file_name=document.get("file_name"), mime_type=document.get("mime_type"))
    else:
        view.update(kind="other", text=None)
    if "reply_to_message" in message:
        view["reply_to_message_id"] = message["reply_to_message"]["message_id"]
    return view


def chat_view(world: World, chat_id: int, *, after: int, include_user: bool) -> list[dict[str, Any]]:
    """Messages of a chat changed after `after` (seq), in message order; media groups folded into one entry.

    Deleted messages are reported only to a caller that may have seen them (after > 0).
    """
    messages = sorted(world.chats.get(chat_id, {}).values(), key=lambda m: m.message_id)
    views: list[dict[str, Any]] = []
    groups: dict[str, dict[str, Any]] = {}
    for stored in messages:
        if not include_user and not stored.from_bot:
            continue
        if stored.deleted and after == 0:
            continue
        view = message_view(stored)
        group_id = view.get("media_group_id")
        if group_id and not stored.deleted:
            group = groups.get(group_id)
            if group is None:
                group = groups[group_id] = {**view, "kind": "media_group", "message_ids": [], "files": [], "captions": []}
                views.append(group)
            group["message_ids"].append(view["message_id"])
            group["files"].extend(view["files"])
            group["captions"].append(view.get("caption"))
            group["seq"] = max(group["seq"], view["seq"])
            group["edited"] = group["edited"] or view["edited"]
            group["caption"] = group.get("caption") or view.get("caption")
            continue
        views.append(view)
    return [view for view in views if view["seq"] > after]
