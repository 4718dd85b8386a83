"""bot.request: a Bot API call whose connection breaks before the answer is sent again; answers from
the server are not. Against a real loopback HTTP server that drops chosen connections."""

from __future__ import annotations

import asyncio
import json

from telegram.error import BadRequest, NetworkError

from bot.request import TRIES, RetryingRequest


class Server:
    """Answers each request with the next planned reply; "drop" closes the connection unanswered."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length")), 0)
        await reader.readexactly(length)
        reply = self.plan[min(self.requests, len(self.plan) - 1)]
        self.requests += 1
        if reply != "drop":
            status, body = ((200, {"ok": True, "result": True}) if reply == "ok"
                            else (400, {"ok": False, "error_code": 400, "description": "Bad Request: chat not found"}))
            data = json.dumps(body).encode()
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + data)
            await writer.drain()
        writer.close()


async def _call(plan: list[str]) -> tuple[Server, object]:
    server = Server(plan)
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    request = RetryingRequest()
    await request.initialize()
    try:
        result: object = await request.post(f"http://127.0.0.1:{port}/botTOKEN/sendMessage",
                                            request_data=None)
    except Exception as exc:  # noqa: BLE001 - returned for the assertions
        result = exc
    finally:
        await request.shutdown()
        listening.close()
    return server, result


def test_a_dropped_connection_is_sent_again_and_the_call_succeeds() -> None:
    server, result = asyncio.run(_call(["drop", "ok"]))
    assert result is True and server.requests == 2


def test_a_connection_that_keeps_breaking_fails_after_the_last_try() -> None:
    server, result = asyncio.run(_call(["drop"]))
    assert isinstance(result, NetworkError) and not isinstance(result, BadRequest)
    assert server.requests == TRIES


def test_an_answer_of_the_server_is_never_sent_again() -> None:
    server, result = asyncio.run(_call(["bad", "ok"]))
    assert isinstance(result, BadRequest) and server.requests == 1
