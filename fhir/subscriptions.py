"""R4 Subscriptions (rest-hook, id-only notifications) for registered EHRs.

An EHR creates a Subscription with ``criteria`` such as ``DiagnosticReport?status=final``. When
:func:`fhir.publish.publish_case` writes a new version that matches, a ``SubscriptionNotification``
row is written in the *same transaction* (an outbox: no change is announced that did not commit).
:func:`deliver_due` (run by ``skinbridge fhir-subscription deliver`` or a periodic task) POSTs an
id-only notification Bundle (Subscriptions R5 Backport IG shape for R4) to the EHR's endpoint and
retries failures with exponential backoff; after repeated failures the subscription goes to
``error``. The notification carries references only: the EHR reads the resource with its token.
Channel headers (e.g. the EHR endpoint's own credentials) are sealed with the system key.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlparse

import click
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from clinic_db.db import Clinic, get_clinic
from clinic_db.models import FhirResource, FhirSubscription, SubscriptionNotification, utcnow
from clinic_db.vault import SYSTEM_KEY_ID
from fhir import mapping, search, smart
from fhir.api import FhirError, FhirRoute, audit_access, authorise, fhir_response, require_grant
from skinbridge.settings import get_settings

BACKPORT_STATUS = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-subscription-status-r4"
PAYLOAD_CONTENT = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"
MAX_ATTEMPTS = 8
ERROR_AFTER = 5  # consecutive failed deliveries before the subscription is set to error
BASE_DELAY_S = 5.0
MAX_DELAY_S = 3600.0


# --- criteria ----------------------------------------------------------------------------------
def parse_criteria(criteria: str) -> search.Query:
    rtype, _, query = criteria.partition("?")
    if rtype not in search.TYPE_PARAMS or rtype == "Binary":
        raise ValueError(f"cannot subscribe to {rtype!r}")
    params = parse_qsl(query, keep_blank_values=False)
    if any(name.startswith("_") and name not in ("_id",) for name, _ in params):
        raise ValueError("criteria may use search parameters only (no _include, _sort, ...)")
    try:
        return search.parse(rtype, params, strict=True)
    except search.SearchError as exc:
        raise ValueError(str(exc)) from exc


def _check_endpoint(url: str) -> None:
    parsed = urlparse(url)
    https_only = get_settings().profile == "production"
    if parsed.scheme not in (("https",) if https_only else ("https", "http")) or not parsed.hostname:
        raise ValueError("channel.endpoint must be an " + ("https" if https_only else "http(s)") + " URL")


def _seal_headers(clinic: Clinic, session: Session, sub_id: uuid.UUID, headers: list[str]) -> list[str]:
    if not headers:
        return []
    blob = clinic.vault.seal_for(session, SYSTEM_KEY_ID, "fhir_subscriptions", str(sub_id), "headers",
                                 json.dumps(headers).encode())
    return [base64.b64encode(blob).decode("ascii")]


def _open_headers(clinic: Clinic, session: Session, sub: FhirSubscription) -> dict[str, str]:
    if not sub.headers:
        return {}
    raw = clinic.vault.open_for(session, SYSTEM_KEY_ID, "fhir_subscriptions", str(sub.id), "headers",
                                base64.b64decode(sub.headers[0]))
    out = {}
    for line in json.loads(raw):
        name, _, value = line.partition(":")
        out[name.strip()] = value.strip()
    return out


# --- matching (called by publish_case, inside its transaction) ----------------------------------
def enqueue_matches(session: Session, changed: list[str]) -> int:
    """Write a pending notification for each active subscription a new version matches."""
    if not changed:
        return 0
    subs = session.scalars(select(FhirSubscription).where(FhirSubscription.status == "active")).all()
    if not subs:
        return 0
    snapshot = search.current_snapshot(session)
    n = 0
    for sub in subs:
        try:
            q = parse_criteria(sub.criteria)
        except ValueError:
            continue
        for ref in changed:
            rtype, rid = ref.split("/")[:2]
            if rtype != q.resource_type:
                continue
            hit = session.scalar(search.filtered(q, snapshot).where(FhirResource.id == rid).limit(1))
            if hit is not None:
                session.add(SubscriptionNotification(subscription_id=sub.id, resource_ref=ref, status="pending"))
                n += 1
    session.flush()
    return n


# --- delivery ----------------------------------------------------------------------------------
def notification_bundle(sub: FhirSubscription, ref: str, event_number: int, base: str) -> dict[str, Any]:
    rtype, rid = ref.split("/")[:2]
    status = {
        "resourceType": "Parameters",
        "id": str(uuid.uuid4()),
        "meta": {"profile": [BACKPORT_STATUS]},
        "parameter": [
            {"name": "subscription", "valueReference": {"reference": f"{base}/Subscription/{sub.id}"}},
            {"name": "topic", "valueCanonical": f"{base}/Subscription/{sub.id}"},
            {"name": "status", "valueCode": "active"},
            {"name": "type", "valueCode": "event-notification"},
            {"name": "events-since-subscription-start", "valueString": str(event_number)},
            {"name": "notification-event", "part": [
                {"name": "event-number", "valueString": str(event_number)},
                {"name": "focus", "valueReference": {"reference": f"{base}/{ref}"}},
            ]},
        ],
    }
    bundle = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "history",
        "timestamp": mapping.instant(utcnow()),
        "entry": [
            {"fullUrl": f"urn:uuid:{status['id']}", "resource": status,
             "request": {"method": "GET", "url": f"{base}/Subscription/{sub.id}/$status"},
             "response": {"status": "200"}},
            {"fullUrl": f"{base}/{ref}", "request": {"method": "PUT", "url": f"{rtype}/{rid}"},
             "response": {"status": "200"}},
        ],
    }
    return mapping.validate(bundle)


def _base_url() -> str:
    configured = get_settings().public_base_url
    settings = get_settings()
    return (configured or f"http://{settings.http_host}:{settings.http_port}").rstrip("/") + "/fhir"


def deliver_due(clinic: Clinic, *, now: datetime | None = None, limit: int = 50, timeout: float = 10.0,
                base: str | None = None) -> int:
    """POST due notifications; returns how many were delivered. Failures are retried later."""
    now = now or utcnow()
    base = base or _base_url()
    delivered = 0
    with clinic.session() as session:
        due = session.scalars(
            select(SubscriptionNotification)
            .where(SubscriptionNotification.status == "pending", SubscriptionNotification.next_attempt_at <= now)
            .order_by(SubscriptionNotification.created_at).limit(limit).with_for_update(skip_locked=True)
        ).all()
        with httpx.Client(timeout=timeout, follow_redirects=False) as http:
            for note in due:
                sub = session.get(FhirSubscription, note.subscription_id)
                if sub is None or sub.status not in ("active", "error"):
                    note.status, note.last_error = "dead", "subscription off"
                    continue
                number = 1 + int(session.scalar(select(func.count()).where(
                    SubscriptionNotification.subscription_id == sub.id,
                    SubscriptionNotification.status == "sent")) or 0)
                body = notification_bundle(sub, note.resource_ref, number, base)
                headers = {"Content-Type": "application/fhir+json", **_open_headers(clinic, session, sub)}
                error = None
                try:
                    resp = http.post(sub.endpoint, content=json.dumps(body), headers=headers)
                    if not 200 <= resp.status_code < 300:
                        error = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    error = type(exc).__name__
                note.attempts += 1
                if error is None:
                    note.status, note.last_error = "sent", None
                    sub.error_count, sub.last_error = 0, None
                    if sub.status == "error":
                        sub.status = "active"
                    delivered += 1
                    continue
                note.last_error = error
                sub.error_count += 1
                sub.last_error = error
                if sub.error_count >= ERROR_AFTER:
                    sub.status = "error"  # still retried, so a recovered endpoint gets its backlog
                if note.attempts >= MAX_ATTEMPTS:
                    note.status = "dead"
                else:
                    delay = min(BASE_DELAY_S * 2 ** (note.attempts - 1), MAX_DELAY_S)
                    note.next_attempt_at = now + timedelta(seconds=delay)
        session.commit()
    return delivered


# --- REST ----------------------------------------------------------------------------------------
def _resource(sub: FhirSubscription) -> dict[str, Any]:
    res = dict(sub.resource)
    res["id"] = str(sub.id)
    res["status"] = "active" if sub.status == "active" else ("error" if sub.status == "error" else "off")
    if sub.last_error:
        res["error"] = sub.last_error
    return res


def _own(session: Session, client_id: str, sub_id: str) -> FhirSubscription:
    try:
        sub = session.get(FhirSubscription, uuid.UUID(sub_id))
    except ValueError:
        sub = None
    if sub is None or sub.client_id != client_id or sub.status == "off":
        raise FhirError(404, "not-found", f"Subscription/{sub_id} not found")
    return sub


def build_router() -> APIRouter:
    router = APIRouter(route_class=FhirRoute)

    @router.post("/fhir/Subscription")
    async def create(request: Request) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype not in ("application/fhir+json", "application/json"):
            raise FhirError(415, "not-supported", "send the Subscription as application/fhir+json")
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise FhirError(400, "invalid", "the body is not JSON") from exc
        return await run_in_threadpool(_create, request, body)

    @router.get("/fhir/Subscription/{sub_id}")
    def read(sub_id: str, request: Request) -> Response:
        clinic = get_clinic()
        grant = require_grant(clinic, request)
        authorise(clinic, grant, "Subscription", "r", "fhir.read")
        with clinic.session() as session:
            sub = _own(session, grant.client_id, sub_id)
            return fhir_response(_resource(sub))

    @router.get("/fhir/Subscription")
    def list_own(request: Request) -> Response:
        clinic = get_clinic()
        grant = require_grant(clinic, request)
        authorise(clinic, grant, "Subscription", "s", "fhir.search")
        base = smart.fhir_base(request)
        with clinic.session() as session:
            subs = session.scalars(select(FhirSubscription).where(
                FhirSubscription.client_id == grant.client_id, FhirSubscription.status != "off")
                .order_by(FhirSubscription.created_at)).all()
            entries = [{"fullUrl": f"{base}/Subscription/{s.id}", "resource": _resource(s),
                        "search": {"mode": "match"}} for s in subs]
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": len(entries)}
        if entries:
            bundle["entry"] = entries
        return fhir_response(bundle)

    @router.delete("/fhir/Subscription/{sub_id}")
    def remove(sub_id: str, request: Request) -> Response:
        clinic = get_clinic()
        grant = require_grant(clinic, request)
        authorise(clinic, grant, "Subscription", "d", "fhir.delete")
        with clinic.session() as session:
            sub = _own(session, grant.client_id, sub_id)
            sub.status = "off"
            audit_access(session, grant, "fhir.subscription.delete", "Subscription", sub.id)
            session.commit()
        return Response(status_code=204)

    return router


def _create(request: Request, body: dict[str, Any]) -> Response:
    clinic = get_clinic()
    grant = require_grant(clinic, request)
    authorise(clinic, grant, "Subscription", "c", "fhir.create")
    if body.get("resourceType") != "Subscription":
        raise FhirError(400, "invalid", "the body must be a Subscription")
    body = {k: v for k, v in body.items() if k not in ("id", "meta")}
    body.setdefault("status", "requested")
    try:
        mapping.validate(body)
    except Exception as exc:  # noqa: BLE001 - pydantic's message is the diagnostic
        raise FhirError(400, "structure", f"invalid Subscription: {exc}") from exc
    channel = body.get("channel") or {}
    if channel.get("type") != "rest-hook":
        raise FhirError(422, "not-supported", "only channel.type rest-hook is supported")
    try:
        _check_endpoint(channel.get("endpoint") or "")
        q = parse_criteria(body.get("criteria") or "")
    except ValueError as exc:
        raise FhirError(422, "processing", str(exc)) from exc
    authorise(clinic, grant, q.resource_type, "r", "fhir.create")  # may only hear about what it may read
    # id-only: notifications never carry resource content (R4 backport payload-content extension)
    channel["payload"] = "application/fhir+json"
    channel["_payload"] = {"extension": [{"url": PAYLOAD_CONTENT, "valueCode": "id-only"}]}
    headers = list(channel.pop("header", []) or [])
    body["channel"] = channel
    body["status"] = "active"
    mapping.validate(body)
    with clinic.session() as session:
        sub = FhirSubscription(client_id=grant.client_id, criteria=body["criteria"], endpoint=channel["endpoint"],
                               status="active", resource=body)
        sub.ensure_id()
        sub.headers = _seal_headers(clinic, session, sub.id, headers)
        session.add(sub)
        audit_access(session, grant, "fhir.subscription.create", "Subscription", sub.id, criteria_type=q.resource_type)
        session.commit()
        res = _resource(sub)
    url = f"{smart.fhir_base(request)}/Subscription/{res['id']}"
    return fhir_response(res, 201, {"Location": url})


@click.group("fhir-subscription")
def fhir_subscription_command() -> None:
    """FHIR Subscription notifications."""


@fhir_subscription_command.command("deliver")
@click.option("--loop/--once", default=False, help="Keep delivering every --interval seconds.")
@click.option("--interval", default=5.0, show_default=True)
def deliver_command(loop: bool, interval: float) -> None:
    """POST due rest-hook notifications (retries with backoff)."""
    clinic = get_clinic()
    while True:
        n = deliver_due(clinic)
        click.echo(f"delivered {n}")
        if not loop:
            return
        time.sleep(interval)
