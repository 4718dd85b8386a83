"""Console sessions, CSRF tokens and security headers.

Sessions are server-side: the cookie holds a random token, the database (``kv`` table, namespace
``console_session``) holds only HMAC(session_secret, token) with the clinician id, the per-session
CSRF token and timestamps. Logging out deletes the row, so a stolen cookie dies with it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from fastapi import HTTPException, Request, Response
from fastapi.routing import APIRoute
from sqlalchemy import delete
from sqlalchemy.orm import Session

from clinic_db.models import Clinician, KeyValue, utcnow
from skinbridge.settings import get_settings

SESSION_COOKIE = "sb_console"
LOGIN_COOKIE = "sb_console_login"
SESSION_NS = "console_session"
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_TIMEOUT = timedelta(hours=12)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def _secret() -> bytes:
    return get_settings().session_secret.get_secret_value().encode()


def _mac(*parts: str) -> str:
    return hmac.new(_secret(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def is_https(request: Request) -> bool:
    return request.url.scheme == "https"


def cookie_path(request: Request) -> str:
    """The console's own path (wherever the router is mounted): cookies are not sent elsewhere."""
    return request.url_for("home").path.rstrip("/") or "/"


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path=cookie_path(request), httponly=True,
                        samesite="strict", secure=is_https(request))


# --- login form CSRF (before a session exists) -------------------------------------------------

def login_csrf(request: Request) -> tuple[str, str]:
    """(cookie nonce, form token) for the login form: a signed double submit, as no session exists yet.

    The caller sets the nonce with :func:`set_cookie` under :data:`LOGIN_COOKIE`.
    """
    nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    return nonce, _mac("login", nonce)


def check_login_csrf(request: Request, token: str | None) -> None:
    nonce = request.cookies.get(LOGIN_COOKIE)
    if not nonce or not token or not hmac.compare_digest(_mac("login", nonce), token):
        raise HTTPException(403, "invalid or missing CSRF token: reload the page and try again")


# --- sessions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConsoleSession:
    clinician: Clinician
    csrf: str
    key: str  # the kv row key


def start_session(session: Session, clinician: Clinician) -> tuple[str, str]:
    """Create a server-side session; returns (cookie token, CSRF token). The caller commits."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow().isoformat()
    session.add(KeyValue(namespace=SESSION_NS, key=_mac("session", token), value={
        "clinician_id": str(clinician.id), "csrf": csrf, "created": now, "seen": now,
    }))
    return token, csrf


def load_session(session: Session, request: Request) -> ConsoleSession | None:
    """The session of this request, or None (expired sessions are deleted)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None
    key = _mac("session", token)
    row = session.get(KeyValue, (SESSION_NS, key))
    if row is None or not row.value:
        return None
    now = utcnow()
    created = datetime.fromisoformat(row.value["created"])
    seen = datetime.fromisoformat(row.value["seen"])
    clinician = session.get(Clinician, uuid.UUID(row.value["clinician_id"]))
    locked = clinician is not None and clinician.locked_until is not None and clinician.locked_until > now
    if (now - seen > IDLE_TIMEOUT or now - created > ABSOLUTE_TIMEOUT or clinician is None
            or not clinician.active or locked):
        session.delete(row)
        session.commit()
        return None
    if now - seen > timedelta(minutes=1):  # sliding idle timeout without a write on every request
        row.value = {**row.value, "seen": now.isoformat()}
        session.commit()
    return ConsoleSession(clinician=clinician, csrf=row.value["csrf"], key=key)


def end_session(session: Session, console_session: ConsoleSession) -> None:
    session.execute(delete(KeyValue).where(KeyValue.namespace == SESSION_NS, KeyValue.key == console_session.key))


def check_csrf(console_session: ConsoleSession, token: str | None) -> None:
    if not token or not hmac.compare_digest(console_session.csrf, token):
        raise HTTPException(403, "invalid or missing CSRF token: reload the page and try again")


# --- headers ----------------------------------------------------------------------------------

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


class SecureRoute(APIRoute):
    """Adds the security headers to every console response (errors included).

    Everything but the stylesheet and script is ``no-store``: console pages and images carry
    patient data and must not stay in browser or proxy caches.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        cacheable = "/static/" in self.path

        async def secured(request: Request) -> Response:
            try:
                response = await handler(request)
            except HTTPException as exc:
                headers = dict(exc.headers or {})
                headers.update(SECURITY_HEADERS)
                headers.setdefault("Cache-Control", "no-store")
                raise HTTPException(exc.status_code, exc.detail, headers=headers) from exc
            for name, value in SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
            if not cacheable:
                response.headers["Cache-Control"] = "no-store"
                response.headers["Pragma"] = "no-cache"
            return response

        return secured
