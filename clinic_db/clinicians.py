"""Clinician accounts: argon2 password hashes, lockout after repeated failures, optional TOTP.

The TOTP secret is sealed with the system data key (AAD ``clinicians|<id>|totp_secret``) so a copy
of the database alone cannot mint second factors. A 128-bit secret (the RFC 4226 minimum) keeps
the sealed value within the 64-character column.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.db import Clinic
from clinic_db.models import Clinician, utcnow
from clinic_db.vault import SYSTEM_KEY_ID

ROLES = ("dermatologist", "admin")
MAX_FAILURES = 5
LOCKOUT = timedelta(minutes=15)
MIN_PASSWORD_LENGTH = 12
TOTP_ISSUER = "SkinBridge"
FOREVER = datetime(9999, 1, 1, tzinfo=timezone.utc)

_hasher = PasswordHasher()
# Verified against when the username is unknown, so the response time does not reveal which
# usernames exist.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """An account cannot be created or changed as asked; the message says why."""


@dataclass(frozen=True)
class LoginResult:
    ok: bool
    clinician: Clinician | None
    reason: str  # ok | bad_credentials | locked | totp_required | bad_totp | inactive
    locked_until: datetime | None = None


def by_username(session: Session, username: str) -> Clinician | None:
    return session.scalar(select(Clinician).where(Clinician.username == username.strip().lower()))


def create(
    clinic: Clinic,
    session: Session,
    username: str,
    *,
    display_name: str,
    role: str,
    password: str,
    totp: bool = False,
) -> tuple[Clinician, str | None]:
    """Create an account. Returns it and, when ``totp`` is set, the otpauth:// URI to enrol."""
    username = username.strip().lower()
    if not username or len(username) > 64 or not all(c.isalnum() or c in "._-" for c in username):
        raise AccountError("username: 1-64 characters, letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise AccountError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if by_username(session, username) is not None:
        raise AccountError(f"username {username!r} is taken")
    clinician = Clinician(
        username=username,
        display_name=display_name.strip() or username,
        role=role,
        password_hash=_hasher.hash(password),
        failed_logins=0,
        active=True,
    )
    clinician.ensure_id()
    uri = enable_totp(clinic, session, clinician) if totp else None
    session.add(clinician)
    session.flush()
    audit.record(session, Actor.system("cli"), "clinician.create", "Clinician", clinician.id,
                 role=role, totp=totp, purpose="operations")
    return clinician, uri


def enable_totp(clinic: Clinic, session: Session, clinician: Clinician) -> str:
    """Give the account a fresh TOTP secret; returns the provisioning URI for an authenticator app."""
    raw = secrets.token_bytes(16)
    sealed = clinic.vault.seal_for(session, SYSTEM_KEY_ID, "clinicians", str(clinician.ensure_id()), "totp_secret", raw)
    clinician.totp_secret = base64.urlsafe_b64encode(sealed).decode().rstrip("=")
    return pyotp.TOTP(_b32(raw)).provisioning_uri(name=clinician.username, issuer_name=TOTP_ISSUER)


def totp_secret(clinic: Clinic, session: Session, clinician: Clinician) -> str | None:
    """The base32 TOTP secret, or None when the account has no second factor."""
    if not clinician.totp_secret:
        return None
    blob = base64.urlsafe_b64decode(clinician.totp_secret + "=" * (-len(clinician.totp_secret) % 4))
    raw = clinic.vault.open_for(session, SYSTEM_KEY_ID, "clinicians", str(clinician.id), "totp_secret", blob)
    return _b32(raw)


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode().rstrip("=")


def is_locked(clinician: Clinician, now: datetime | None = None) -> bool:
    return clinician.locked_until is not None and clinician.locked_until > (now or utcnow())


def verify(
    clinic: Clinic, session: Session, username: str, password: str, totp_code: str | None = None
) -> LoginResult:
    """Check a login attempt and record it. The caller commits (failures must be kept too).

    Five failures in a row lock the account for 15 minutes; while locked even the right password
    is refused, so guessing cannot continue.
    """
    now = utcnow()
    clinician = by_username(session, username)
    if clinician is None:
        try:
            _hasher.verify(_DUMMY_HASH, password)
        except VerificationError:
            pass
        audit.record(session, Actor("clinician", "unknown"), "auth.login", "Clinician", None,
                     outcome="denied", purpose="operations", reason="bad_credentials")
        return LoginResult(False, None, "bad_credentials")
    actor = Actor("clinician", str(clinician.id))
    if is_locked(clinician, now):
        audit.record(session, actor, "auth.login", "Clinician", clinician.id, outcome="denied",
                     purpose="operations", reason="locked")
        return LoginResult(False, clinician, "locked", clinician.locked_until)
    try:
        password_ok = _hasher.verify(clinician.password_hash, password)
    except (VerificationError, InvalidHashError):
        password_ok = False
    reason = "ok"
    if not password_ok:
        reason = "bad_credentials"
    elif not clinician.active:
        reason = "inactive"
    else:
        secret = totp_secret(clinic, session, clinician)
        if secret is not None:
            if not totp_code:
                reason = "totp_required"
            elif not pyotp.TOTP(secret).verify(totp_code.strip(), valid_window=1):
                reason = "bad_totp"
    if reason != "ok":
        if reason in ("bad_credentials", "bad_totp"):
            clinician.failed_logins = (clinician.failed_logins or 0) + 1
            if clinician.failed_logins >= MAX_FAILURES:
                clinician.locked_until = now + LOCKOUT
                clinician.failed_logins = 0
                audit.record(session, actor, "auth.lockout", "Clinician", clinician.id, purpose="operations")
        audit.record(session, actor, "auth.login", "Clinician", clinician.id, outcome="denied",
                     purpose="operations", reason=reason)
        locked = clinician.locked_until if is_locked(clinician, now) else None
        return LoginResult(False, clinician, "locked" if locked else reason, locked)
    clinician.failed_logins = 0
    clinician.locked_until = None
    if _hasher.check_needs_rehash(clinician.password_hash):
        clinician.password_hash = _hasher.hash(password)
    audit.record(session, actor, "auth.login", "Clinician", clinician.id, purpose="operations")
    return LoginResult(True, clinician, "ok")


def lock(session: Session, clinician: Clinician, *, until: datetime | None = None, actor: Actor | None = None) -> None:
    """Lock an account (default: until an admin unlocks it) and deactivate it."""
    clinician.locked_until = until or FOREVER
    if until is None:
        clinician.active = False
    audit.record(session, actor or Actor.system("cli"), "clinician.lock", "Clinician", clinician.id,
                 purpose="operations")


def unlock(session: Session, clinician: Clinician, *, actor: Actor | None = None) -> None:
    clinician.locked_until = None
    clinician.failed_logins = 0
    clinician.active = True
    audit.record(session, actor or Actor.system("cli"), "clinician.unlock", "Clinician", clinician.id,
                 purpose="operations")


def set_password(session: Session, clinician: Clinician, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AccountError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    clinician.password_hash = _hasher.hash(password)
    audit.record(session, Actor.system("cli"), "clinician.password", "Clinician", clinician.id, purpose="operations")


def all_clinicians(session: Session) -> list[Clinician]:
    return list(session.scalars(select(Clinician).order_by(Clinician.username)))
