"""The bot's HTTP to the Bot API: PTB's httpx client, plus a second try when a connection breaks.

A kept-alive connection that the server closes just as the bot reuses it fails the call with a read
error although the server never saw the request; PTB hands that straight to the handler, whose
conversation step (the next history question, say) is then lost. Such calls are sent again, at most
twice, after a short pause. Answers from the server (400, 403, ...) and timeouts are not retried.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from telegram.error import NetworkError
from telegram.request import HTTPXRequest

# the connection broke before an answer came: safe to send again (at worst a message arrives twice)
BROKEN_CONNECTION = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError, httpx.ConnectError)
TRIES = 3


class RetryingRequest(HTTPXRequest):
    async def do_request(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        for attempt in range(TRIES):
            try:
                return await super().do_request(*args, **kwargs)
            except NetworkError as exc:
                if attempt == TRIES - 1 or not isinstance(exc.__cause__, BROKEN_CONNECTION):
                    raise
                await asyncio.sleep(0.1 * (attempt + 1))
        raise AssertionError("unreachable")
