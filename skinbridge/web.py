"""The one web application: FHIR API for EHRs (with SMART auth) and the dermatologists' console."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio

import h11
import orjson
from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from skinbridge.settings import get_settings

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Request handlers run in anyio's thread pool (40 threads by default). Forty threads serving at once
    # spend their time passing the GIL around: at 32 clients a read cost 5.9 ms of CPU with 40 and 4.0 ms
    # with 4 (docs/benchmarks/fhir-postgresql.md). Requests beyond the limit wait in the event loop.
    anyio.to_thread.current_default_thread_limiter().total_tokens = get_settings().api_threads
    # each API process beats (clinic_db.heartbeat): `skinbridge check --liveness api`, `skinbridge up`
    from clinic_db import heartbeat
    from clinic_db.db import get_clinic

    beater = heartbeat.start(get_clinic(), "api")
    try:
        yield
    finally:
        beater.stop()


def create_app() -> FastAPI:
    settings = get_settings()
    settings.check_safe()
    if not settings.public_base_url:
        log.warning("SKINBRIDGE_PUBLIC_BASE_URL is not set: FHIR URLs and the token endpoint's audience follow "
                    "each request's Host header. Fine for development; set it wherever EHRs connect.")
    app = FastAPI(title="SkinBridge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        from sqlalchemy import text

        from clinic_db.db import get_clinic

        with get_clinic().engine.connect() as conn:
            conn.execute(text("select 1"))
        return {"status": "ok"}

    from console.app import build_router as console_router
    from fhir.api import build_router as fhir_router
    from fhir.api import install_error_handlers

    app.include_router(fhir_router())
    app.include_router(console_router(), prefix="/console")
    install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/console/")

    return app


LINGER_S = 2.0  # how long the rest of a refused request is read and dropped before the socket closes


class HttpProtocol(H11Protocol):
    """uvicorn's h11 protocol, except that a request it cannot parse is answered with h11's own status
    hint (431 for a header block over the limit, else 400) and an OperationOutcome body, not a plain-text
    400, followed by a lingering close: the answer is sent with a FIN and what the client still sends
    is read and dropped, so the client sees the answer instead of a connection reset (closing with
    unread data makes the kernel send RST). ``skinbridge api`` serves with it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._error_status = 400
        self._lingering = False
        next_event = self.conn.next_event

        def remembering_next_event() -> Any:
            try:
                return next_event()
            except h11.RemoteProtocolError as exc:
                self._error_status = exc.error_status_hint
                raise

        self.conn.next_event = remembering_next_event  # type: ignore[method-assign]

    def send_400_response(self, msg: str) -> None:
        status = self._error_status if 400 <= self._error_status < 500 else 400
        text = ("request header fields too large" if status == 431 else "invalid HTTP request")
        body = orjson.dumps({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "too-costly" if status == 431 else "invalid", "diagnostics": text}]})
        headers = [(b"content-type", b"application/fhir+json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers)))  # type: ignore[arg-type]
        self.transport.write(self.conn.send(h11.Data(data=body)))  # type: ignore[arg-type]
        self.transport.write(self.conn.send(h11.EndOfMessage()))  # type: ignore[arg-type]
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._lingering:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._lingering:
            self.transport.close()
        return None
