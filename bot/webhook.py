"""Webhook intake: Telegram POSTs each update here; it is stored in the inbox before the 200 answer.

Telegram re-delivers an update until it gets a 2xx, so the answer waits for the database commit: a
database that is down answers 503 and Telegram tries again later. The secret token that the bot
registered with ``setWebhook`` must be in every request (compared in constant time). Served by
tornado, the HTTP server python-telegram-bot's own webhook uses, in the bot's event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets

from tornado.httpserver import HTTPServer
from tornado.web import Application, RequestHandler

from bot.inbox import Inbox

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
MAX_BODY = 1 << 20  # Telegram's updates are small; a photo is a file id, not bytes


class UpdateHandler(RequestHandler):
    def initialize(self, inbox: Inbox, wake: asyncio.Event, secret: str) -> None:
        self.inbox, self.wake, self.secret = inbox, wake, secret

    async def post(self) -> None:
        given = self.request.headers.get(SECRET_HEADER, "")
        if not hmac.compare_digest(given.encode(), self.secret.encode()):
            log.warning("webhook call without the right secret token refused")
            self.set_status(403)
            return
        try:
            payload = json.loads(self.request.body)
        except ValueError:
            self.set_status(400)
            return
        if not isinstance(payload, dict) or not isinstance(payload.get("update_id"), int):
            self.set_status(400)
            return
        try:
            await asyncio.to_thread(self.inbox.store, [payload])
        except Exception:  # noqa: BLE001 - not stored: Telegram must deliver it again
            log.exception("error %s storing a webhook update; answered 503 so Telegram retries",
                          secrets.token_hex(4).upper())
            self.set_status(503)
            return
        self.wake.set()
        self.set_status(200)

    def get(self) -> None:
        self.set_status(405)


def start_webhook_server(inbox: Inbox, wake: asyncio.Event, *, secret: str, listen: str, port: int,
                         path: str) -> HTTPServer:
    app = Application([(rf"/{path.strip('/')}/?", UpdateHandler, {"inbox": inbox, "wake": wake, "secret": secret})])
    server = HTTPServer(app, max_body_size=MAX_BODY, xheaders=False)
    server.listen(port, address=listen)
    return server
