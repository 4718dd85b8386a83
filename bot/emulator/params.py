"""Bot API request parameters: query string, JSON, urlencoded form or multipart, normalised.

Telegram accepts all four encodings; with forms every value is a string and nested objects are JSON
strings (that is how python-telegram-bot sends them), so getters coerce the way the real server does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from bot.emulator.errors import bad_request

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}


@dataclass(frozen=True)
class Upload:
    """One file part of a multipart request."""

    field: str
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Params:
    values: dict[str, Any] = field(default_factory=dict)
    uploads: dict[str, Upload] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        return name in self.values and self.values[name] not in (None, "")

    def str(self, name: str, *, required: bool = False, empty: str | None = None) -> str | None:
        value = self.values.get(name)
        if value is None or value == "":
            if required:
                raise bad_request(empty or f"{name} is empty")
            return None
        return value if isinstance(value, str) else json.dumps(value)

    def int(self, name: str, *, required: bool = False, default: int | None = None) -> int | None:
        value = self.values.get(name)
        if value is None or value == "":
            if required:
                raise bad_request(f"{name} is empty")
            return default
        if isinstance(value, bool):
            return int(value)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise bad_request(f"invalid {name} specified") from None

    def float(self, name: str, *, default: float) -> float:
        value = self.values.get(name)
        if value is None or value == "":
            return default
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad_request(f"invalid {name} specified") from None

    def bool(self, name: str, *, default: bool = False) -> bool:
        value = self.values.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise bad_request(f"invalid {name} specified")

    def json(self, name: str) -> Any:
        """A nested object: already decoded with JSON bodies, a JSON string in forms and queries."""
        value = self.values.get(name)
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                raise bad_request(f"can't parse {name} JSON object") from None
        return value

    def loggable(self) -> dict[str, Any]:
        """The parameters for the call log: values as sent, files summarised (never their bytes)."""
        logged: dict[str, Any] = {}
        for name, value in self.values.items():
            if isinstance(value, str) and value[:1] in "[{":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            logged[name] = value
        for name, upload in self.uploads.items():
            logged[name] = {"upload": upload.filename, "content_type": upload.content_type, "size": len(upload.data)}
        return logged


async def read_params(request: Request) -> Params:
    params = Params(values=dict(request.query_params))
    if request.method != "POST":
        return params
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        raw = await request.body()
        if raw.strip():
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                raise bad_request("can't parse JSON body") from None
            if not isinstance(body, dict):
                raise bad_request("the JSON body must be an object")
            params.values.update(body)
    elif content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        async with request.form(max_part_size=8 * 1024 * 1024) as form:
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    params.uploads[name] = Upload(name, value.filename, value.content_type, await value.read())
                else:
                    params.values[name] = value
    return params
