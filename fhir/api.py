"""The read-only FHIR R4 REST API (``/fhir``) for EHRs, protected by SMART Backend Services.

read, vread, instance history and search; ETag/Last-Modified with conditional reads; an
OperationOutcome (``application/fhir+json``) for every error; writes answer 405. Every read and
search is audited with the calling client as actor (clinic_db.audit).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Coroutine
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.db import Clinic, get_clinic
from clinic_db.keys import KeyUnavailable
from clinic_db.models import FhirResource
from fhir import mapping, search, smart
from fhir.publish import row_json
from fhir.smart import Grant, OAuthError

FHIR_JSON = "application/fhir+json"
JSON_TYPES = ("application/fhir+json", "application/json", "application/*", "*/*", "application/json+fhir")
READ_TYPES = tuple(search.TYPE_PARAMS)
SEARCH_TYPES = READ_TYPES


class FhirError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None):
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics, self.headers = status, code, diagnostics, headers or {}


def outcome(status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error" if status >= 400 else "information", "code": code,
                       "diagnostics": diagnostics}]}
    return fhir_response(body, status, headers)


def fhir_response(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False, separators=(",", ":")), status,
                    headers=headers, media_type=FHIR_JSON)


class FhirRoute(APIRoute):
    """Turns every failure inside /fhir into an OperationOutcome (routers cannot own exception handlers)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except FhirError as exc:
                return outcome(exc.status, exc.code, exc.diagnostics, exc.headers)
            except search.SearchError as exc:
                return outcome(exc.status, "invalid" if exc.status == 400 else "processing", str(exc))
            except RequestValidationError as exc:
                return outcome(400, "invalid", str(exc.errors()))
            except HTTPException as exc:
                return outcome(exc.status_code, "processing", str(exc.detail))

        return handler


# --- request helpers ----------------------------------------------------------------------------
def _check_accept(request: Request, *, binary: bool = False) -> bool:
    """True when the client wants FHIR JSON; raises 406 for anything else we cannot produce."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        if fmt in ("json", "application/json", "application/fhir+json"):
            return True
        raise FhirError(406, "not-supported", f"_format {fmt!r} is not supported; this server speaks JSON")
    accept = request.headers.get("accept", "")
    if not accept:
        return True
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if any(t in ("application/fhir+json", "application/json", "application/json+fhir") for t in types):
        return True
    if binary:
        return False  # raw content negotiated by the caller
    if any(t in JSON_TYPES for t in types):
        return True
    raise FhirError(406, "not-supported", f"cannot produce {accept!r}; use application/fhir+json")


def _grant(clinic: Clinic, request: Request) -> Grant:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise FhirError(401, "login", "a bearer access token from /auth/token is required",
                        {"WWW-Authenticate": 'Bearer realm="skinbridge-fhir"'})
    try:
        return smart.verify_access_token(clinic, token.strip(), smart.fhir_base(request))
    except OAuthError as exc:
        raise FhirError(401, "login", exc.description,
                        {"WWW-Authenticate": f'Bearer realm="skinbridge-fhir", error="{exc.error}"'}) from exc


def _authorise(clinic: Clinic, grant: Grant, rtype: str, perm: str, action: str) -> None:
    if not grant.allows(rtype, perm):
        with clinic.session() as session:
            audit.record(session, Actor("client", grant.client_id), action, rtype, None, outcome="denied",
                         scope_needed=f"system/{rtype}.{perm}")
            session.commit()
        raise FhirError(403, "forbidden", f"the token's scopes do not allow system/{rtype}.{perm}")


def _check_type(rtype: str) -> None:
    if rtype not in READ_TYPES:
        raise FhirError(404, "not-supported", f"resource type {rtype!r} is not served here")


def _headers(row: FhirResource) -> dict[str, str]:
    return {"ETag": f'W/"{row.version_id}"', "Last-Modified": format_datetime(row.last_updated, usegmt=True),
            "Content-Location": f"{row.resource_type}/{row.id}/_history/{row.version_id}"}


def _not_modified(request: Request, row: FhirResource) -> bool:
    inm = request.headers.get("if-none-match")
    if inm is not None:
        tags = {t.strip().removeprefix("W/").strip('"') for t in inm.split(",")}
        return str(row.version_id) in tags or "*" in tags
    ims = request.headers.get("if-modified-since")
    if ims:
        try:
            return row.last_updated.replace(microsecond=0) <= parsedate_to_datetime(ims)
        except (TypeError, ValueError):
            return False
    return False


def _open(clinic: Clinic, session: Session, row: FhirResource) -> dict[str, Any]:
    if row.deleted:
        raise FhirError(410, "deleted", f"{row.resource_type}/{row.id} was deleted")
    try:
        return row_json(clinic, session, row)
    except KeyUnavailable as exc:  # the patient was erased: the data key is gone
        raise FhirError(410, "deleted", f"{row.resource_type}/{row.id} is no longer available") from exc


def _audit(session: Session, grant: Grant, action: str, rtype: str, rid: str | None, **detail: Any) -> None:
    audit.record(session, Actor("client", grant.client_id), action, rtype, rid, **detail)


# --- capability statement ----------------------------------------------------------------------
def capability_statement(request: Request) -> dict[str, Any]:
    base = smart.fhir_base(request)
    common = [{"name": "_id", "type": "token"}, {"name": "_lastUpdated", "type": "date"}]
    types = {"patient": "reference", "subject": "reference", "status": "token", "category": "token",
             "code": "token", "date": "date", "issued": "date", "identifier": "token", "created": "date",
             "recorded": "date"}
    resources = []
    for rtype, params in search.TYPE_PARAMS.items():
        resources.append({
            "type": rtype,
            "interaction": [{"code": c} for c in ("read", "vread", "history-instance", "search-type")],
            "versioning": "versioned",
            "readHistory": True,
            "updateCreate": False,
            "conditionalRead": "full-support",
            "searchInclude": [f"{rtype}:{p}" for p in search.INCLUDES.get(rtype, {})],
            "searchParam": common + [{"name": p, "type": types[p]} for p in sorted(params)],
        })
    resources.append({
        "type": "Subscription",
        "interaction": [{"code": c} for c in ("create", "read", "delete", "search-type")],
        "documentation": "rest-hook channel only, id-only notifications; a client sees its own subscriptions",
    })
    body = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-23",
        "publisher": mapping.ORGANIZATION_NAME,
        "kind": "instance",
        "software": {"name": "SkinBridge", "version": "0.1.0"},
        "implementation": {"description": "SkinBridge teledermatology FHIR API (read-only)", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "AI results are preliminary until a dermatologist signs the DiagnosticReport.",
            "security": {
                "cors": False,
                "service": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                         "code": "SMART-on-FHIR"}], "text": "SMART Backend Services"}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": smart.token_url(request)}],
                }],
            },
            "resource": resources,
            "operation": [{"name": "export",
                           "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"}],
        }],
    }
    return mapping.validate(body)


# --- router -------------------------------------------------------------------------------------
def build_router() -> APIRouter:
    router = APIRouter(route_class=FhirRoute)
    router.include_router(smart.build_router())
    from fhir import bulk  # these modules import this one's helpers

    router.include_router(bulk.build_router())  # before the generic /fhir/{type}/{id} routes
    from fhir import subscriptions

    router.include_router(subscriptions.build_router())

    @router.get("/fhir/metadata")
    def metadata(request: Request) -> Response:
        _check_accept(request)
        return fhir_response(capability_statement(request))

    @router.get("/fhir/{rtype}")
    def search_get(rtype: str, request: Request) -> Response:
        return _search(request, rtype, list(request.query_params.multi_items()))

    @router.post("/fhir/{rtype}/_search")
    async def search_post(rtype: str, request: Request) -> Response:
        if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            raise FhirError(415, "not-supported", "POST _search needs application/x-www-form-urlencoded")
        form = await request.form()
        params = list(request.query_params.multi_items()) + [(k, str(v)) for k, v in form.multi_items()]
        return await run_in_threadpool(_search, request, rtype, params)

    @router.get("/fhir/{rtype}/{rid}")
    def read(rtype: str, rid: str, request: Request) -> Response:
        return _read(request, rtype, rid, None)

    @router.get("/fhir/{rtype}/{rid}/_history/{vid}")
    def vread(rtype: str, rid: str, vid: str, request: Request) -> Response:
        if not vid.isdigit():
            raise FhirError(404, "not-found", f"no version {vid!r}")
        return _read(request, rtype, rid, int(vid))

    @router.get("/fhir/{rtype}/{rid}/_history")
    def history(rtype: str, rid: str, request: Request) -> Response:
        return _history(request, rtype, rid)

    @router.api_route("/fhir", methods=["POST", "PUT", "PATCH", "DELETE"])
    @router.api_route("/fhir/{rtype}", methods=["POST", "PUT", "PATCH", "DELETE"])
    @router.api_route("/fhir/{rtype}/{rid}", methods=["POST", "PUT", "PATCH", "DELETE"])
    def write(request: Request) -> Response:
        _grant(get_clinic(), request)
        raise FhirError(405, "not-supported", "this FHIR API is read-only", {"Allow": "GET"})

    @router.api_route("/fhir/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def unknown(rest: str, request: Request) -> Response:
        raise FhirError(404, "not-found", f"no such FHIR endpoint: /fhir/{rest}")

    return router


def _read(request: Request, rtype: str, rid: str, version: int | None) -> Response:
    _check_type(rtype)
    wants_json = _check_accept(request, binary=rtype == "Binary")
    clinic = get_clinic()
    grant = _grant(clinic, request)
    action = "fhir.read" if version is None else "fhir.vread"
    _authorise(clinic, grant, rtype, "r", action)
    with clinic.session() as session:
        where = [FhirResource.resource_type == rtype, FhirResource.id == rid]
        where.append(FhirResource.is_current.is_(True) if version is None else FhirResource.version_id == version)
        row = session.scalar(select(FhirResource).where(*where))
        if row is None:
            _audit(session, grant, action, rtype, rid, outcome="failure", status=404)
            session.commit()
            raise FhirError(404, "not-found", f"{rtype}/{rid}" + (f"/_history/{version}" if version else "")
                            + " not found")
        try:
            resource = _open(clinic, session, row)
        except FhirError:
            _audit(session, grant, action, rtype, rid, outcome="failure", status=410)
            session.commit()
            raise
        _audit(session, grant, action, rtype, rid, version=row.version_id,
               patient=str(row.patient_id) if row.patient_id else None)
        session.commit()
    headers = _headers(row)
    if version is None and _not_modified(request, row):
        return Response(status_code=304, headers=headers)
    if rtype == "Binary" and not wants_json:
        return Response(base64.b64decode(resource.get("data", "")), media_type=resource["contentType"],
                        headers=headers)
    return fhir_response(resource, 200, headers)


def _history(request: Request, rtype: str, rid: str) -> Response:
    _check_type(rtype)
    _check_accept(request)
    clinic = get_clinic()
    grant = _grant(clinic, request)
    _authorise(clinic, grant, rtype, "r", "fhir.history")
    base = smart.fhir_base(request)
    with clinic.session() as session:
        rows = list(session.scalars(select(FhirResource).where(
            FhirResource.resource_type == rtype, FhirResource.id == rid).order_by(FhirResource.version_id.desc())))
        if not rows:
            raise FhirError(404, "not-found", f"{rtype}/{rid} not found")
        entries = []
        for row in rows:
            resource = _open(clinic, session, row)
            entries.append({
                "fullUrl": f"{base}/{rtype}/{rid}",
                "resource": resource,
                "request": {"method": "POST" if row.version_id == 1 else "PUT",
                            "url": rtype if row.version_id == 1 else f"{rtype}/{rid}"},
                "response": {"status": "201 Created" if row.version_id == 1 else "200 OK",
                             "etag": f'W/"{row.version_id}"', "lastModified": mapping.instant(row.last_updated)},
            })
        _audit(session, grant, "fhir.history", rtype, rid, versions=len(rows))
        session.commit()
    bundle = {"resourceType": "Bundle", "type": "history", "total": len(entries),
              "link": [{"relation": "self", "url": str(request.url)}], "entry": entries}
    return fhir_response(bundle)


def _search(request: Request, rtype: str, params: list[tuple[str, str]]) -> Response:
    _check_type(rtype)
    _check_accept(request)
    clinic = get_clinic()
    grant = _grant(clinic, request)
    _authorise(clinic, grant, rtype, "s", "fhir.search")
    strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "")
    q = search.parse(rtype, params, strict=strict)  # SearchError -> OperationOutcome in FhirRoute
    base = smart.fhir_base(request)
    with clinic.session() as session:
        page = search.run(session, q)
        entries, patients = [], set()
        for row in page.rows:
            try:
                resource = row_json(clinic, session, row)
            except KeyUnavailable:
                continue  # erased between query and decryption
            entries.append({"fullUrl": f"{base}/{rtype}/{row.id}", "resource": resource,
                            "search": {"mode": "match"}})
            if row.patient_id:
                patients.add(str(row.patient_id))
        entries += _included(clinic, session, grant, q, [e["resource"] for e in entries], page.snapshot, base,
                             patients)
        _audit(session, grant, "fhir.search", rtype, None, matches=len(page.rows), total=page.total,
               params=sorted({k for k, _ in q.params}), patients=sorted(patients))
        session.commit()
    # the self link lists only the parameters that were applied (FHIR's way of reporting ignored ones)
    applied = [(k, v) for k, v in params if k not in q.ignored]
    kept = [(k, v) for k, v in applied if k != "_page"]
    links = [{"relation": "self", "url": f"{base}/{rtype}" + (f"?{urlencode(applied)}" if applied else "")}]
    if page.next_page:
        links.append({"relation": "next", "url": f"{base}/{rtype}?{urlencode(kept + [('_page', page.next_page)])}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": page.total, "link": links}
    if entries:
        bundle["entry"] = entries
    return fhir_response(bundle)


def _included(
    clinic: Clinic, session: Session, grant: Grant, q: search.Query, matches: list[dict[str, Any]],
    snapshot: int, base: str, patients: set[str],
) -> list[dict[str, Any]]:
    """Resources named by _include, as of the same snapshot, only where the token may read them."""
    seen = {f"{m['resourceType']}/{m['id']}" for m in matches}
    wanted: list[str] = []
    for source, param, target in q.includes:
        for resource in matches:
            if resource["resourceType"] != source:
                continue
            for reference in search.references(resource, param):
                rt = reference.split("/")[0]
                if (target is None or rt == target) and reference not in seen:
                    seen.add(reference)
                    wanted.append(reference)
    out = []
    for reference in wanted:
        parts = reference.split("/")
        rt, rid = parts[0], parts[1]
        if rt not in READ_TYPES or not grant.allows(rt, "r"):
            continue
        row = session.scalar(search.snapshot_select(rt, snapshot).where(FhirResource.id == rid))
        if row is None:
            continue
        try:
            resource = row_json(clinic, session, row)
        except KeyUnavailable:
            continue
        if row.patient_id:
            patients.add(str(row.patient_id))
        out.append({"fullUrl": f"{base}/{rt}/{rid}", "resource": resource, "search": {"mode": "include"}})
    return out
