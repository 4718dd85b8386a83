"""Errors the emulated Bot API answers with, using Telegram's codes and wording."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A Bot API failure: rendered as {"ok": false, "error_code", "description"[, "parameters"]}."""

    def __init__(self, code: int, description: str, parameters: dict[str, Any] | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": False, "error_code": self.code, "description": self.description}
        if self.parameters:
            body["parameters"] = self.parameters
        return body


def bad_request(detail: str) -> ApiError:
    return ApiError(400, f"Bad Request: {detail}")


class ControlError(Exception):
    """A misuse of the control API (the test or the sandbox page asked for something impossible)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
