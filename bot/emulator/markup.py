"""Message text as Telegram stores it: HTML parse mode turned into plain text + entities, bot commands
found, keyboards checked. Entity offsets are UTF-16 code units, error offsets UTF-8 bytes, like the real API."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bot.emulator.errors import bad_request

MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_CALLBACK_DATA = 64

_HTML_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "tg-spoiler": "spoiler",
    "span": "spoiler",  # only with class="tg-spoiler"
    "code": "code",
    "pre": "pre",
    "a": "text_link",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}
_NAMED_ENTITIES = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}
_ATTR = re.compile(r"""\s*([a-zA-Z-]+)\s*(?:=\s*(?:"([^"]*)"|'([^']*)'|([^\s>"']+)))?""")
_COMMAND = re.compile(r"(?<![\w/])/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?(?![\w/])")


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _parse_error(detail: str) -> Exception:
    return bad_request(f"can't parse entities: {detail}")


@dataclass
class _Open:
    tag: str
    entity: dict[str, Any]


def parse_html(source: str) -> tuple[str, list[dict[str, Any]]]:
    """Telegram's HTML parse mode: supported tags only, every '<' must start a tag, tags must nest."""
    out: list[str] = []
    out_units = 0  # UTF-16 length of the text produced so far
    stack: list[_Open] = []
    entities: list[dict[str, Any]] = []
    i = 0
    n = len(source)

    def byte_offset(pos: int) -> int:
        return len(source[:pos].encode("utf-8"))

    def emit(chunk: str) -> None:
        nonlocal out_units
        out.append(chunk)
        out_units += utf16_len(chunk)

    while i < n:
        ch = source[i]
        if ch == "&":
            end = source.find(";", i + 1, i + 12)
            name = source[i + 1 : end] if end != -1 else ""
            if name in _NAMED_ENTITIES:
                emit(_NAMED_ENTITIES[name])
                i = end + 1
                continue
            if re.fullmatch(r"#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}", name):
                code = int(name[2:], 16) if name[1:2] in "xX" else int(name[1:])
                if 0 < code <= 0x10FFFF:
                    emit(chr(code))
                    i = end + 1
                    continue
            emit(ch)  # Telegram leaves unknown entities as they are
            i += 1
            continue
        if ch != "<":
            emit(ch)
            i += 1
            continue
        close = source.find(">", i)
        if source.startswith("</", i):
            if close == -1:
                raise _parse_error(f"Unclosed end tag at byte offset {byte_offset(i)}")
            name = source[i + 2 : close].strip().lower()
            if not stack:
                raise _parse_error(f'Unexpected end tag at byte offset {byte_offset(i)}')
            if stack[-1].tag != name:
                raise _parse_error(
                    f'Unmatched end tag at byte offset {byte_offset(i)}, expected "</{stack[-1].tag}>", found "</{name}>"'
                )
            opened = stack.pop()
            opened.entity["length"] = out_units - opened.entity["offset"]
            if opened.entity["length"] > 0:
                entities.append(opened.entity)
            i = close + 1
            continue
        match = re.match(r"[a-zA-Z][a-zA-Z0-9-]*", source[i + 1 :])
        name = match.group(0).lower() if match else ""
        if not name or name not in _HTML_TAGS:
            shown = name or source[i + 1 : i + 2]
            raise _parse_error(f'Unsupported start tag "{shown}" at byte offset {byte_offset(i)}')
        if close == -1:
            raise _parse_error(f"Unclosed start tag at byte offset {byte_offset(i)}")
        attrs = {m.group(1).lower(): next((g for g in m.groups()[1:] if g is not None), "")
                 for m in _ATTR.finditer(source[i + 1 + len(name) : close]) if m.group(1)}
        entity: dict[str, Any] = {"type": _HTML_TAGS[name], "offset": out_units}
        if name == "span" and attrs.get("class") != "tg-spoiler":
            raise _parse_error(f'Unsupported start tag "span" at byte offset {byte_offset(i)}')
        if name == "a":
            href = attrs.get("href", "")
            if href.startswith("tg://user?id="):
                entity = {"type": "text_mention", "offset": out_units, "user": {"id": int(href[13:] or 0), "is_bot": False, "first_name": ""}}
            else:
                entity["url"] = href
        if name == "pre" and attrs.get("language"):
            entity["language"] = attrs["language"]
        if name == "blockquote" and "expandable" in attrs:
            entity["type"] = "expandable_blockquote"
        if name == "tg-emoji":
            entity["custom_emoji_id"] = attrs.get("emoji-id", "")
        stack.append(_Open(name, entity))
        i = close + 1
    if stack:
        raise _parse_error(f'Can\'t find end tag corresponding to start tag "{stack[-1].tag}"')
    entities.sort(key=lambda e: (e["offset"], -e["length"]))
    return "".join(out), entities


def format_text(text: str, parse_mode: str | None) -> tuple[str, list[dict[str, Any]]]:
    """Plain text + entities for a message body, as Telegram would store it."""
    mode = (parse_mode or "").strip().lower()
    if mode == "html":
        return parse_html(text)
    if mode in ("", "markdown", "markdownv2"):
        # Markdown modes are kept verbatim (not parsed): the sandbox only renders plain text for them.
        return text, []
    raise bad_request("unsupported parse_mode")


def command_entities(text: str) -> list[dict[str, Any]]:
    """bot_command entities for /commands in a user's text (what PTB's CommandHandler looks for)."""
    entities = []
    for match in _COMMAND.finditer(text):
        entities.append({"type": "bot_command", "offset": utf16_len(text[: match.start()]), "length": utf16_len(match.group(0))})
    return entities


def check_reply_markup(markup: Any) -> dict[str, Any] | None:
    """Validate a reply_markup the way Telegram rejects broken keyboards; returns it unchanged."""
    if markup is None:
        return None
    if not isinstance(markup, dict):
        raise bad_request("can't parse reply keyboard markup JSON object")
    if "inline_keyboard" in markup:
        rows = markup["inline_keyboard"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise bad_request("field \"inline_keyboard\" of the InlineKeyboardMarkup should be an Array of Arrays")
        for row in rows:
            for button in row:
                _check_inline_button(button)
    elif "keyboard" in markup:
        rows = markup["keyboard"]
        if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
            raise bad_request("field \"keyboard\" of the ReplyKeyboardMarkup should be an Array of Arrays")
    elif not (markup.get("remove_keyboard") or markup.get("force_reply")):
        raise bad_request("can't parse reply keyboard markup JSON object")
    return markup


_BUTTON_ACTIONS = ("callback_data", "url", "switch_inline_query", "switch_inline_query_current_chat",
                   "switch_inline_query_chosen_chat", "web_app", "login_url", "pay", "callback_game", "copy_text")


def _check_inline_button(button: Any) -> None:
    if not isinstance(button, dict) or not isinstance(button.get("text"), str) or not button["text"]:
        raise bad_request("can't parse inline keyboard button: Text buttons are unallowed in the inline keyboard")
    actions = [key for key in _BUTTON_ACTIONS if key in button]
    if len(actions) != 1:
        raise bad_request("can't parse inline keyboard button: InlineKeyboardButton must have exactly one of the optional fields")
    if "callback_data" in button:
        data = button["callback_data"]
        if not isinstance(data, str) or not 1 <= len(data.encode("utf-8")) <= MAX_CALLBACK_DATA:
            raise bad_request("BUTTON_DATA_INVALID")
    if "url" in button and not re.match(r"(https?|tg)://", str(button["url"])):
        raise bad_request(f"inline keyboard button URL '{button['url']}' is invalid: Unsupported URL protocol")
