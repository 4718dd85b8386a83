"""The emulator's ASGI app: Bot API, file downloads, control API and the sandbox chat page."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from bot.emulator import botapi, control
from bot.emulator.errors import ControlError
from bot.emulator.media import FileStore
from bot.emulator.world import World

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    # The page renders only text nodes; the policy is a second line of defence against injected markup.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ControlGuard:
    """Mutating control calls must carry X-Emulator-Control: a custom header forces a CORS preflight,
    so another web page open in the same browser cannot post messages into the sandbox."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] == "http" and scope["path"].startswith("/_emulator/")
                and scope["method"] not in ("GET", "HEAD")
                and not any(name == control.CONTROL_HEADER.encode() for name, _ in scope["headers"])):
            response = JSONResponse({"ok": False, "error": "control API calls that change state need the header "
                                     "'X-Emulator-Control: 1'"}, status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


async def control_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ControlError)
    return JSONResponse({"ok": False, "error": exc.message}, status_code=exc.status)


LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "testserver"]


def create_app(files_dir: Path | None = None, *, allowed_hosts: list[str] | None = None,
               state_file: Path | None = None) -> Starlette:
    """A fresh emulated Telegram with its own in-memory state (and temp dir for files); with
    ``state_file`` its id counters and users carry over from the last run (see :mod:`bot.emulator.world`).

    Only loopback Host headers are served by default: that stops DNS-rebinding pages from reaching the
    control API; pass allowed_hosts=["*"] when serving the sandbox to other machines on purpose.
    """
    world = World(FileStore(files_dir), state_file=state_file)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        world.files.close()

    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            Route("/bot{token}/{method}", botapi.bot_endpoint, methods=["GET", "POST"]),
            Route("/file/bot{token}/{file_path:path}", botapi.file_endpoint, methods=["GET"]),
            *control.routes(),
        ],
        exception_handlers={ControlError: control_error},
        lifespan=lifespan,
    )
    app.state.world = world
    app.add_middleware(ControlGuard)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_HOSTS)
    return app


def run(host: str = "127.0.0.1", port: int = 8081, state_file: Path | None = None) -> None:
    import uvicorn

    from bot.emulator.cli import is_loopback

    from skinbridge import logs

    hosts = LOOPBACK_HOSTS if is_loopback(host) else ["*"]
    logs.setup()  # the bot polls this server all the time: its requests are logged at DEBUG only
    # idle connections are kept longer than clients keep them (httpx: 5 s), as Telegram's servers do: a
    # server closing one just as a client reuses it would fail that call (bot.request retries it anyway)
    uvicorn.run(create_app(allowed_hosts=hosts, state_file=state_file), host=host, port=port, log_config=None, log_level=None,
                timeout_keep_alive=75)
