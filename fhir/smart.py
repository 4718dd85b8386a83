"""SMART Backend Services: client registration, the token endpoint and access-token checks.

An EHR registers its public JWKS and the scopes it may use (``skinbridge fhir-client add``). It then
asks ``/auth/token`` for an access token with a ``client_credentials`` grant authenticated by a
``private_key_jwt`` assertion signed RS384 or ES384 with one of its registered keys. Tokens live
five minutes, are signed by this server with a key derived from the clinic's blind-index key, and
carry the granted scopes, enforced per resource type by :mod:`fhir.api`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click
import jwt
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.db import Clinic, get_clinic
from clinic_db.models import FhirClient, UsedJti, utcnow
from skinbridge.settings import get_settings

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGS = ("RS384", "ES384")  # what SMART requires servers to support; nothing else is accepted
TOKEN_PATH = "/auth/token"
TOKEN_TTL_S = 300
MAX_ASSERTION_LIFETIME_S = 300  # SMART: exp no more than five minutes in the future
CLOCK_SKEW_S = 30
ACCESS_TOKEN_ALG = "HS256"  # our own tokens, verified only by us
READ_PERMS = frozenset("rs")
_SCOPE = re.compile(r"^system/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<perm>read|[cruds]+)$")
_PRIVATE_JWK_FIELDS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


class OAuthError(Exception):
    def __init__(self, error: str, description: str, status: int = 400):
        super().__init__(description)
        self.error, self.description, self.status = error, description, status


# --- scopes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scope:
    resource_type: str  # a type or "*"
    perms: frozenset[str]  # subset of {"r", "s"}

    @classmethod
    def parse(cls, text: str) -> "Scope | None":
        """``system/T.rs`` (SMART v2) or ``system/T.read`` (v1); None if not a read scope we serve."""
        m = _SCOPE.match(text)
        if m is None:
            return None
        perm, rtype = m["perm"], m["type"]
        perms = READ_PERMS if perm == "read" else frozenset(perm)
        if perm != "read" and (len(set(perm)) != len(perm) or "".join(sorted(perm, key="cruds".index)) != perm):
            return None  # v2 letters must be unique and in c-r-u-d-s order
        if not perms <= READ_PERMS and rtype != "Subscription":
            return None  # clinical data is read-only; an EHR only manages its own Subscriptions
        return cls(rtype, perms)

    def covers(self, other: "Scope") -> bool:
        return self.resource_type in ("*", other.resource_type) and other.perms <= self.perms


def _scopes(texts: list[str] | tuple[str, ...]) -> list[Scope]:
    return [s for s in (Scope.parse(t) for t in texts) if s is not None]


@dataclass(frozen=True)
class Grant:
    """What an access token allows."""

    client_id: str
    scopes: tuple[str, ...]

    def allows(self, resource_type: str, perm: str) -> bool:
        return any(s.covers(Scope(resource_type, frozenset(perm))) for s in _scopes(self.scopes))


# --- registration -----------------------------------------------------------------------------
def _check_jwks(jwks: dict[str, Any]) -> dict[str, Any]:
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not keys or not isinstance(keys, list):
        raise ValueError('the JWKS needs a non-empty "keys" list')
    seen: set[str] = set()
    for key in keys:
        if _PRIVATE_JWK_FIELDS & set(key):
            raise ValueError(f"key {key.get('kid')!r} contains private or symmetric key material")
        kid = key.get("kid")
        if not kid or kid in seen:
            raise ValueError("every key needs a unique kid")
        seen.add(kid)
        if key.get("kty") not in ("RSA", "EC"):
            raise ValueError(f"key {kid!r}: only RSA and EC keys are accepted")
        if key.get("alg") and key["alg"] not in ASSERTION_ALGS:
            raise ValueError(f"key {kid!r}: alg must be one of {', '.join(ASSERTION_ALGS)}")
        jwt.PyJWK(key, algorithm=key.get("alg") or ("RS384" if key["kty"] == "RSA" else "ES384"))
    return {"keys": keys}


def register_client(clinic: Clinic, name: str, jwks: dict[str, Any], scopes: list[str]) -> str:
    """Register an EHR for SMART Backend Services; returns its client_id."""
    bad = [s for s in scopes if Scope.parse(s) is None]
    if bad or not scopes:
        raise ValueError(f"unsupported scopes {bad or scopes}: use system/<Type|*>.rs (or .read), read-only "
                         "except system/Subscription.cruds")
    clean = _check_jwks(jwks)
    client_id = f"ehr-{secrets.token_hex(8)}"
    with clinic.session() as session:
        row = FhirClient(client_id=client_id, name=name, jwks=clean, scopes=list(scopes), active=True)
        session.add(row)
        audit.record(session, Actor.system("cli"), "fhir_client.register", "FhirClient", client_id,
                     purpose="operations", scopes=list(scopes))
        session.commit()
    return client_id


@click.group("fhir-client")
def fhir_client_command() -> None:
    """EHR clients of the FHIR API (SMART Backend Services)."""


@fhir_client_command.command("add")
@click.option("--name", required=True, help="Human-readable name of the EHR.")
@click.option("--jwks", "jwks_arg", required=True, help="Public JWKS: a file path or the JSON itself (no URL).")
@click.option("--scope", "scopes", multiple=True, required=True, help="e.g. system/DiagnosticReport.rs (repeat).")
def add_client(name: str, jwks_arg: str, scopes: tuple[str, ...]) -> None:
    """Register an EHR and print its client_id."""
    text = jwks_arg if jwks_arg.lstrip().startswith("{") else Path(jwks_arg).read_text()
    try:
        client_id = register_client(get_clinic(), name, json.loads(text), list(scopes))
    except (ValueError, json.JSONDecodeError) as exc:
        raise click.BadParameter(str(exc)) from exc
    click.echo(client_id)


@fhir_client_command.command("disable")
@click.argument("client_id")
def disable_client(client_id: str) -> None:
    """Stop a client: no new tokens, and its current tokens stop working at once."""
    clinic = get_clinic()
    with clinic.session() as session:
        row = session.scalar(select(FhirClient).where(FhirClient.client_id == client_id))
        if row is None:
            raise click.ClickException(f"no client {client_id}")
        row.active = False
        audit.record(session, Actor.system("cli"), "fhir_client.disable", "FhirClient", client_id,
                     purpose="operations")
        session.commit()
    click.echo(f"disabled {client_id}")


# --- URLs -------------------------------------------------------------------------------------
def public_base(request: Request) -> str:
    """SKINBRIDGE_PUBLIC_BASE_URL when set: then the Host header counts for nothing (token audience,
    fullUrl, paging links). Without it (development) the URL the request was sent to."""
    configured = get_settings().public_base_url
    return (configured or str(request.base_url)).rstrip("/")


def fhir_base(request: Request) -> str:
    return public_base(request) + "/fhir"


def token_url(request: Request) -> str:
    return public_base(request) + TOKEN_PATH


# --- tokens -----------------------------------------------------------------------------------
def _signing_key(clinic: Clinic) -> bytes:
    # Derived, not stored: every process of the deployment gets the same key from the key ring.
    return hmac.new(clinic.vault.keyring.blind_key, b"skinbridge|fhir-access-token|v1", hashlib.sha256).digest()


def _authenticate(clinic: Clinic, assertion: str, audiences: list[str]) -> FhirClient:
    try:
        header = jwt.get_unverified_header(assertion)
        unverified = jwt.decode(assertion, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise OAuthError("invalid_client", f"malformed client assertion: {exc}", 401) from exc
    alg = header.get("alg")
    if alg not in ASSERTION_ALGS:
        raise OAuthError("invalid_client", f"assertion alg {alg!r} not accepted (use RS384 or ES384)", 401)
    client_id = unverified.get("iss")
    if not isinstance(client_id, str) or not client_id or unverified.get("sub") != client_id \
            or len(client_id) > 64 or "\x00" in client_id:
        raise OAuthError("invalid_client", "iss and sub must both be the client_id", 401)
    with clinic.session() as session:
        client = session.scalar(select(FhirClient).where(FhirClient.client_id == str(client_id)))
        if client is None or not client.active:
            raise OAuthError("invalid_client", "unknown or disabled client", 401)
        session.expunge(client)
    kid = header.get("kid")
    jwk = next((k for k in client.jwks.get("keys", []) if k.get("kid") == kid), None) if kid else None
    if jwk is None:
        raise OAuthError("invalid_client", f"unknown kid {kid!r}", 401)
    try:
        key = jwt.PyJWK(jwk, algorithm=alg)
        claims = jwt.decode(assertion, key.key, algorithms=[alg], audience=audiences, leeway=CLOCK_SKEW_S,
                            options={"require": ["iss", "sub", "aud", "exp", "jti"]})
    except jwt.ExpiredSignatureError as exc:
        raise OAuthError("invalid_client", "client assertion expired", 401) from exc
    except jwt.InvalidAudienceError as exc:
        raise OAuthError("invalid_client", "client assertion aud must be the token endpoint URL", 401) from exc
    except (jwt.PyJWTError, OverflowError, ValueError, TypeError) as exc:  # e.g. "exp": 1e400
        raise OAuthError("invalid_client", f"client assertion rejected: {exc}", 401) from exc
    exp = int(claims["exp"])
    if exp > time.time() + MAX_ASSERTION_LIFETIME_S + CLOCK_SKEW_S:
        raise OAuthError("invalid_client", "client assertion exp is more than five minutes ahead", 401)
    _remember_jti(clinic, client.client_id, str(claims["jti"]), exp)
    return client


def _remember_jti(clinic: Clinic, client_id: str, jti: str, exp: int) -> None:
    """Refuse a replayed assertion: each jti is accepted once until it expires. The database is the
    replay cache, so every API process of a deployment sees every jti. Stored as its SHA-256: any
    length fits the column, and two long jtis never collide the way a cut to 255 characters did."""
    with clinic.session() as session:
        session.execute(delete(UsedJti).where(UsedJti.expires_at < utcnow() - timedelta(seconds=CLOCK_SKEW_S)))
        session.add(UsedJti(client_id=client_id, jti=hashlib.sha256(jti.encode("utf-8", "surrogatepass")).hexdigest(),
                            expires_at=datetime.fromtimestamp(exp, timezone.utc)))
        try:
            session.commit()
        except IntegrityError as exc:
            session.rollback()
            raise OAuthError("invalid_client", "client assertion jti already used (replay)", 401) from exc


def issue_token(clinic: Clinic, form: dict[str, str], *, audiences: list[str], resource_base: str) -> dict[str, Any]:
    if form.get("grant_type") != "client_credentials":
        raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
    if form.get("client_assertion_type") != ASSERTION_TYPE:
        raise OAuthError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
    if not form.get("client_assertion"):
        raise OAuthError("invalid_request", "client_assertion is missing")
    client = _authenticate(clinic, form["client_assertion"], audiences)
    allowed = _scopes(client.scopes)
    granted: list[str] = []
    for text in (form.get("scope") or "").split():
        asked = Scope.parse(text)
        if asked is None:
            continue  # not a system read scope (e.g. launch/patient): not granted
        if any(a.covers(asked) for a in allowed):
            granted.append(text)
        else:  # a wider request is narrowed to the registered scopes it covers
            granted += [t for t in client.scopes if (a := Scope.parse(t)) is not None and asked.covers(a)]
    granted = list(dict.fromkeys(granted))
    if not granted:
        raise OAuthError("invalid_scope", "none of the requested scopes is allowed for this client")
    now = int(time.time())
    token = jwt.encode(
        {"iss": resource_base, "aud": resource_base, "sub": client.client_id, "scope": " ".join(granted),
         "iat": now, "exp": now + TOKEN_TTL_S, "jti": uuid.uuid4().hex},
        _signing_key(clinic), algorithm=ACCESS_TOKEN_ALG,
    )
    return {"access_token": token, "token_type": "bearer", "expires_in": TOKEN_TTL_S, "scope": " ".join(granted)}


def verify_access_token(clinic: Clinic, token: str, resource_base: str, session: Session | None = None,
                        *, check_client: bool = True) -> Grant:
    """Check a bearer token; raises OAuthError (401) when it is not valid here and now. ``session``:
    the caller's, so the client check shares the request's one transaction. ``check_client=False``:
    the caller checks ``client_active_column`` in its own query (one round trip less)."""
    try:
        claims = jwt.decode(token, _signing_key(clinic), algorithms=[ACCESS_TOKEN_ALG], audience=resource_base,
                            options={"require": ["sub", "exp", "scope"]})
        if not isinstance(claims["sub"], str) or not isinstance(claims["scope"], str):
            raise jwt.InvalidTokenError("sub and scope must be strings")
    except jwt.PyJWTError as exc:
        raise OAuthError("invalid_token", f"access token rejected: {exc}", 401) from exc
    grant = Grant(client_id=claims["sub"], scopes=tuple(claims["scope"].split()))
    if not check_client:
        return grant
    query = select(client_active(grant))
    if session is not None:
        active = session.scalar(query)
    else:
        with clinic.session() as own:
            active = own.scalar(query)
    if not active:
        raise client_disabled()
    return grant


def client_disabled() -> OAuthError:
    return OAuthError("invalid_token", "client disabled", 401)


def client_active(grant: Grant) -> Any:
    """A scalar subquery: true while the grant's client is registered and active (a disabled client's
    live tokens stop working at once)."""
    return select(FhirClient.active).where(FhirClient.client_id == grant.client_id).scalar_subquery()


# --- HTTP -------------------------------------------------------------------------------------
def smart_configuration(request: Request) -> dict[str, Any]:
    return {
        "issuer": fhir_base(request),
        "token_endpoint": token_url(request),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": ["system/*.rs", "system/*.read"] + [
            f"system/{t}.rs" for t in ("DiagnosticReport", "Observation", "Media", "Binary", "Patient",
                                       "Device", "Provenance", "Practitioner", "Organization")],
        "response_types_supported": ["token"],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/.well-known/smart-configuration", include_in_schema=False)
    @router.get("/fhir/.well-known/smart-configuration")
    def well_known(request: Request) -> JSONResponse:
        return JSONResponse(smart_configuration(request))

    @router.post(TOKEN_PATH)
    async def token(request: Request) -> JSONResponse:
        clinic = get_clinic()
        headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
        try:
            if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                raise OAuthError("invalid_request", "use application/x-www-form-urlencoded")
            form = {k: str(v) for k, v in (await request.form()).items()}
            audiences = [token_url(request)]  # the configured public URL only (Host counts for nothing then)
            body = await run_in_threadpool(issue_token, clinic, form, audiences=audiences,
                                           resource_base=fhir_base(request))
        except OAuthError as exc:
            await run_in_threadpool(_audit_token, clinic, None, exc.error)
            return JSONResponse({"error": exc.error, "error_description": exc.description}, exc.status,
                                headers=headers)
        await run_in_threadpool(_audit_token, clinic,
                                jwt.decode(body["access_token"], options={"verify_signature": False})["sub"], None)
        return JSONResponse(body, headers=headers)

    return router


def _audit_token(clinic: Clinic, client_id: str | None, error: str | None) -> None:
    with clinic.session() as session:
        audit.record(session, Actor("client", client_id or "unknown"), "fhir.token", "FhirClient", client_id,
                     outcome="success" if error is None else "denied", purpose="operations", error=error)
        session.commit()
