"""The read-only FHIR R4 REST API (``/fhir``) for EHRs, protected by SMART Backend Services.

read, vread, instance history and search; ETag/Last-Modified with conditional reads; an
OperationOutcome (``application/fhir+json``) for every error, also for paths and methods no route
serves (:func:`install_error_handlers`); writes answer 405. Every read and search is audited with
the calling client as actor (clinic_db.audit), in the same transaction as the read itself.

Published resources are served as stored: their JSON bytes go into the response (or a Bundle, as an
``orjson.Fragment``) without being parsed again, unless ``_include``, ``_summary`` or ``_elements``
need to look inside.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import re
from collections.abc import Callable, Coroutine
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any
from urllib.parse import urlencode

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy import and_, false, literal, select, tuple_
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from clinic_db import audit
from clinic_db.audit import Actor
from clinic_db.db import Clinic, get_clinic
from clinic_db.keys import KeyUnavailable
from clinic_db.models import FhirResource, PatientKey
from fhir import mapping, search, smart
from fhir.publish import row_bytes
from fhir.smart import Grant, OAuthError

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
JSON_TYPES = ("application/fhir+json", "application/json", "application/*", "*/*", "application/json+fhir")
READ_TYPES = tuple(search.TYPE_PARAMS)
SEARCH_TYPES = READ_TYPES
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # R4 id; anything else cannot name a stored resource
MAX_VERSION = 2**31 - 1  # fhir_resources.version_id is an INTEGER
SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED",
             "display": "subsetted"}
ISSUE_CODES = {400: "invalid", 401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported",
               406: "not-supported", 410: "deleted", 413: "too-costly", 415: "not-supported", 422: "invalid",
               429: "throttled", 431: "too-costly"}


class FhirError(Exception):
    def __init__(self, status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None):
        super().__init__(diagnostics)
        self.status, self.code, self.diagnostics, self.headers = status, code, diagnostics, headers or {}


def outcome(status: int, code: str, diagnostics: str, headers: dict[str, str] | None = None) -> Response:
    body = {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error" if status >= 400 else "information", "code": code,
                       "diagnostics": diagnostics}]}
    return fhir_response(body, status, headers)


def fhir_response(body: dict[str, Any] | bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return Response(content, status, headers=headers, media_type=FHIR_JSON)


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
                return outcome(exc.status_code, ISSUE_CODES.get(exc.status_code, "processing"), str(exc.detail))
            except OperationalError as exc:  # a dropped connection or the database away: try again shortly
                return database_unavailable(request, exc)
            except Exception:  # a bug: still an OperationOutcome (and logged), never a bare text body
                log.exception("FHIR request %s %s failed", request.method, request.url.path)
                return outcome(500, "exception", "internal error (logged on the server)")

        return handler


def database_unavailable(request: Request, exc: OperationalError) -> Response:
    """503 + Retry-After. Without pre-ping (settings.db_pre_ping) this is also what the first request on a
    connection PostgreSQL dropped gets; SQLAlchemy has then replaced the pool's connections."""
    log.warning("request %s %s: database unavailable (%s)", request.method, request.url.path,
                type(exc.orig).__name__ if exc.orig is not None else exc)
    retry = {"Retry-After": "1"}
    if request.url.path == smart.TOKEN_PATH:
        return JSONResponse({"error": "temporarily_unavailable", "error_description": "try again shortly"}, 503,
                            headers=retry)
    return outcome(503, "transient", "the database is unavailable for a moment; try again", retry)


def install_error_handlers(app: FastAPI) -> None:
    """Errors no route handles (unknown path, wrong method, OPTIONS, a crash in middleware): an
    OperationOutcome, or the OAuth error JSON on the token endpoint; the console keeps its own pages."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if path.startswith("/console"):
            return await http_exception_handler(request, exc)
        if path == smart.TOKEN_PATH:
            error = "invalid_request" if exc.status_code < 500 else "server_error"
            return JSONResponse({"error": error, "error_description": str(exc.detail)}, exc.status_code,
                                headers=exc.headers)
        return outcome(exc.status_code, ISSUE_CODES.get(exc.status_code, "processing"), str(exc.detail),
                       exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        if request.url.path.startswith("/console"):
            return await request_validation_exception_handler(request, exc)
        return outcome(400, "invalid", str(exc.errors()))

    @app.exception_handler(OperationalError)
    async def unavailable(request: Request, exc: OperationalError) -> Response:
        return database_unavailable(request, exc)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        log.error("request %s %s failed: %r", request.method, request.url.path, exc)
        if request.url.path == smart.TOKEN_PATH:
            return JSONResponse({"error": "server_error", "error_description": "internal error"}, 500)
        return outcome(500, "exception", "internal error (logged on the server)")


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


def require_grant(clinic: Clinic, request: Request, session: Session | None = None, *,
                  check_client: bool = True) -> Grant:
    """The access token's grant (401 OperationOutcome without a valid one). ``check_client=False``: the
    caller's own query checks smart.client_active (then it must call :func:`disabled` when false)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise FhirError(401, "login", "a bearer access token from /auth/token is required",
                        {"WWW-Authenticate": 'Bearer realm="skinbridge-fhir"'})
    try:
        return smart.verify_access_token(clinic, token.strip(), smart.fhir_base(request), session,
                                         check_client=check_client)
    except OAuthError as exc:
        raise _unauthorised(exc) from exc


def _unauthorised(exc: OAuthError) -> FhirError:
    return FhirError(401, "login", exc.description,
                     {"WWW-Authenticate": f'Bearer realm="skinbridge-fhir", error="{exc.error}"'})


def disabled() -> FhirError:
    """401 for a token whose client was disabled (see smart.client_active)."""
    return _unauthorised(smart.client_disabled())


def authorise(clinic: Clinic, grant: Grant, rtype: str, perm: str, action: str, session: Session | None = None) -> None:
    """403 (audited as denied) unless the grant's scopes allow ``perm`` on ``rtype``."""
    if grant.allows(rtype, perm):
        return
    with contextlib.nullcontext(session) if session is not None else clinic.session() as s:
        audit.record(s, Actor("client", grant.client_id), action, rtype, None, outcome="denied",
                     scope_needed=f"system/{rtype}.{perm}")
        s.commit()
    raise FhirError(403, "forbidden", f"the token's scopes do not allow system/{rtype}.{perm}")


def audit_access(session: Session, grant: Grant, action: str, rtype: str, rid: Any, **detail: Any) -> None:
    audit.record(session, Actor("client", grant.client_id), action, rtype, rid, **detail)


def _check_type(rtype: str) -> None:
    if rtype not in READ_TYPES:
        raise FhirError(404, "not-supported", f"resource type {rtype!r} is not served here")


def _check_id(rtype: str, rid: str) -> None:
    if not FHIR_ID.fullmatch(rid):
        raise FhirError(404, "not-found", f"{rtype}/{rid[:80]!r} not found (not a FHIR id)")


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
        except (TypeError, ValueError, OverflowError):
            return False
    return False


def _open(clinic: Clinic, session: Session, row: FhirResource) -> bytes:
    if row.deleted:
        raise FhirError(410, "deleted", f"{row.resource_type}/{row.id} was deleted")
    try:
        return row_bytes(clinic, session, row)
    except KeyUnavailable as exc:  # the patient was erased: the data key is gone
        raise FhirError(410, "deleted", f"{row.resource_type}/{row.id} is no longer available") from exc


# --- _summary / _elements -----------------------------------------------------------------------
@functools.cache
def _element_sets(rtype: str) -> tuple[frozenset[str], frozenset[str]]:
    """(summary elements, mandatory elements) of an R4 resource type, from fhir.resources' model."""
    from fhir.resources.R4B import get_fhir_model_class

    fields = {(f.alias or n): f for n, f in get_fhir_model_class(rtype).model_fields.items()}
    flags = {n: dict(f.json_schema_extra or {}) for n, f in fields.items()}  # type: ignore[arg-type]
    return (frozenset(n for n, x in flags.items() if x.get("summary_element_property")),
            frozenset(n for n, x in flags.items() if x.get("element_required") or fields[n].is_required()))


def subset(resource: dict[str, Any], summary: str | None, elements: list[str]) -> dict[str, Any]:
    """``_summary`` (true, text, data) or ``_elements`` applied; the result carries the SUBSETTED tag."""
    if summary is None and not elements:
        return resource
    summary_set, mandatory = _element_sets(resource["resourceType"])
    if summary == "data":
        out = {k: v for k, v in resource.items() if k != "text"}
    else:
        if summary == "true":
            keep = set(summary_set)
        elif summary == "text":
            keep = {"text"} | mandatory
        else:
            keep = {e.split(".")[-1] for e in elements} | mandatory
        keep |= {"resourceType", "id", "meta"}
        out = {k: v for k, v in resource.items() if k in keep or (k.startswith("_") and k[1:] in keep)}
    meta = dict(out.get("meta") or {})
    meta["tag"] = [*meta.get("tag", []), SUBSETTED]
    out["meta"] = meta
    return out


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
        # ASCII digits only ("²".isdigit() is true), and within the INTEGER column
        if not (vid.isascii() and vid.isdigit() and 0 < len(vid) <= 10 and int(vid) <= MAX_VERSION):
            raise FhirError(404, "not-found", f"no version {vid[:20]!r}")
        return _read(request, rtype, rid, int(vid))

    @router.get("/fhir/{rtype}/{rid}/_history")
    def history(rtype: str, rid: str, request: Request) -> Response:
        return _history(request, rtype, rid)

    @router.api_route("/fhir", methods=["POST", "PUT", "PATCH", "DELETE"])
    @router.api_route("/fhir/{rtype}", methods=["POST", "PUT", "PATCH", "DELETE"])
    @router.api_route("/fhir/{rtype}/{rid}", methods=["POST", "PUT", "PATCH", "DELETE"])
    def write(request: Request) -> Response:
        require_grant(get_clinic(), request)
        raise FhirError(405, "not-supported", "this FHIR API is read-only", {"Allow": "GET"})

    @router.api_route("/fhir/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def unknown(rest: str, request: Request) -> Response:
        raise FhirError(404, "not-found", f"no such FHIR endpoint: /fhir/{rest[:200]}")

    return router


def _subsetting(request: Request, rtype: str) -> search.Query:
    """_summary / _elements of a read (validated like a search's)."""
    return search.parse(rtype, [(k, v) for k, v in request.query_params.multi_items()
                                if k in ("_summary", "_elements")])


def _read(request: Request, rtype: str, rid: str, version: int | None) -> Response:
    _check_type(rtype)
    wants_json = _check_accept(request, binary=rtype == "Binary")
    shape = _subsetting(request, rtype)
    clinic = get_clinic()
    action = "fhir.read" if version is None else "fhir.vread"
    with clinic.session() as session:  # one transaction: token's client, the row, its audit record
        grant = require_grant(clinic, request, session, check_client=False)
        if not grant.allows(rtype, "r"):
            require_grant(clinic, request, session)  # a disabled client hears 401 before 403
            authorise(clinic, grant, rtype, "r", action, session)
        # One round trip: is the client active, the row, and its patient's data key (into the session,
        # where Vault.data_key finds it).
        match = [FhirResource.resource_type == rtype, FhirResource.id == rid,
                 FhirResource.is_current.is_(True) if version is None else FhirResource.version_id == version]
        if not FHIR_ID.fullmatch(rid):
            match = [false()]
        found = session.execute(
            select(smart.client_active(grant).label("active"), FhirResource, PatientKey)
            .select_from(select(literal(1).label("one")).subquery())
            .outerjoin(FhirResource, and_(*match))
            .outerjoin(PatientKey, PatientKey.patient_id == FhirResource.patient_id)).first()
        if found is None or not found.active:
            raise disabled()
        row = found.FhirResource
        if row is None:
            audit_access(session, grant, action, rtype, rid if FHIR_ID.fullmatch(rid) else None, outcome="failure",
                         status=404)
            session.commit()
            raise FhirError(404, "not-found", f"{rtype}/{rid[:80]}" + (f"/_history/{version}" if version else "")
                            + " not found")
        try:
            raw = _open(clinic, session, row)
        except FhirError:
            audit_access(session, grant, action, rtype, rid, outcome="failure", status=410)
            session.commit()
            raise
        audit_access(session, grant, action, rtype, rid, version=row.version_id,
                     patient=str(row.patient_id) if row.patient_id else None)
        session.commit()  # the access is on record before anything is sent
    headers = _headers(row)
    if version is None and _not_modified(request, row):
        return Response(status_code=304, headers=headers)
    if rtype == "Binary" and not wants_json:
        resource = orjson.loads(raw)
        return Response(base64.b64decode(resource.get("data", "")), media_type=resource["contentType"],
                        headers=headers)
    if shape.summary == "count":
        raise FhirError(400, "invalid", "_summary=count applies to searches only")
    if shape.summary or shape.elements:
        raw = orjson.dumps(subset(orjson.loads(raw), shape.summary, shape.elements))
    return fhir_response(raw, 200, headers)


def _history(request: Request, rtype: str, rid: str) -> Response:
    _check_type(rtype)
    _check_accept(request)
    clinic = get_clinic()
    base = smart.fhir_base(request)
    with clinic.session() as session:
        grant = require_grant(clinic, request, session)
        authorise(clinic, grant, rtype, "r", "fhir.history", session)
        rows = []
        if FHIR_ID.fullmatch(rid):
            rows = list(session.scalars(select(FhirResource).where(
                FhirResource.resource_type == rtype, FhirResource.id == rid).order_by(FhirResource.version_id.desc())))
        if not rows:
            raise FhirError(404, "not-found", f"{rtype}/{rid[:80]} not found")
        entries = []
        for row in rows:
            raw = _open(clinic, session, row)
            entries.append({
                "fullUrl": f"{base}/{rtype}/{rid}",
                "resource": orjson.Fragment(raw),
                "request": {"method": "POST" if row.version_id == 1 else "PUT",
                            "url": rtype if row.version_id == 1 else f"{rtype}/{rid}"},
                "response": {"status": "201 Created" if row.version_id == 1 else "200 OK",
                             "etag": f'W/"{row.version_id}"', "lastModified": mapping.instant(row.last_updated)},
            })
        audit_access(session, grant, "fhir.history", rtype, rid, versions=len(rows))
        session.commit()
    bundle = {"resourceType": "Bundle", "type": "history", "total": len(entries),
              "link": [{"relation": "self", "url": f"{base}/{rtype}/{rid}/_history"}], "entry": entries}
    return fhir_response(bundle)


def _search(request: Request, rtype: str, params: list[tuple[str, str]]) -> Response:
    _check_type(rtype)
    _check_accept(request)
    clinic = get_clinic()
    base = smart.fhir_base(request)
    with clinic.session() as session:
        grant = require_grant(clinic, request, session, check_client=False)
        if not grant.allows(rtype, "s"):
            require_grant(clinic, request, session)  # a disabled client hears 401 before 403
            authorise(clinic, grant, rtype, "s", "fhir.search", session)
        strict = "handling=strict" in request.headers.get("prefer", "").replace(" ", "")
        q = search.parse(rtype, params, strict=strict)  # SearchError -> OperationOutcome in FhirRoute
        active, snapshot = session.execute(select(smart.client_active(grant), search.snapshot_column())).one()
        if not active:
            raise disabled()
        page = search.run(session, q, snapshot)
        parse = bool(q.includes or q.summary or q.elements)  # otherwise the stored bytes go out untouched
        entries: list[dict[str, Any]] = []
        matches: list[dict[str, Any]] = []
        patients: set[str] = set()
        served: set[tuple[str, str, int]] = set()
        for row in page.rows:
            try:
                raw = row_bytes(clinic, session, row)
            except KeyUnavailable:
                continue  # erased between query and decryption
            resource: Any = orjson.Fragment(raw)
            if parse:
                resource = orjson.loads(raw)
                matches.append(resource)
                resource = subset(resource, q.summary, q.elements)
            entries.append({"fullUrl": f"{base}/{rtype}/{row.id}", "resource": resource, "search": {"mode": "match"}})
            served.add((rtype, row.id, row.version_id))
            if row.patient_id:
                patients.add(str(row.patient_id))
        entries += _included(clinic, session, grant, q, matches, page.snapshot, base, patients, served)
        audit_access(session, grant, "fhir.search", rtype, None, matches=len(page.rows), total=page.total,
                     params=sorted({k for k, _ in q.params}), patients=sorted(patients))
        session.commit()
    # The self link lists only the parameters that were applied (FHIR's way of reporting ignored
    # ones), with _count as applied (capped at search.MAX_COUNT).
    applied = [(k, str(q.count) if k == "_count" else v) for k, v in params if k not in q.ignored]
    kept = [(k, v) for k, v in applied if k != "_page"]
    links = [{"relation": "self", "url": f"{base}/{rtype}" + (f"?{urlencode(applied)}" if applied else "")}]
    if page.next_page:
        links.append({"relation": "next", "url": f"{base}/{rtype}?{urlencode(kept + [('_page', page.next_page)])}"})
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "total": page.total, "link": links}
    if q.summary == "count":
        bundle["meta"] = {"tag": [SUBSETTED]}
    if entries:
        bundle["entry"] = entries
    return fhir_response(bundle)


def _reference(reference: str) -> tuple[str, str, int | None] | None:
    """(type, id, version or None) of a literal relative reference, None for anything else."""
    parts = reference.split("/")
    if len(parts) == 2:
        return parts[0], parts[1], None
    if len(parts) == 4 and parts[2] == "_history" and parts[3].isascii() and parts[3].isdigit():
        version = int(parts[3])
        return (parts[0], parts[1], version) if version <= MAX_VERSION else None
    return None


def _included(
    clinic: Clinic, session: Session, grant: Grant, q: search.Query, matches: list[dict[str, Any]],
    snapshot: int, base: str, patients: set[str], served: set[tuple[str, str, int]],
) -> list[dict[str, Any]]:
    """Resources named by _include, as of the same snapshot and at the version a reference names,
    only where the token may read them. Each (resource, version) appears once in the Bundle, so
    fullUrl + meta.versionId are unique (bdl-7)."""
    wanted: dict[tuple[str, str, int | None], None] = {}
    for source, param, target in q.includes:
        for resource in matches:
            if resource["resourceType"] != source:
                continue
            for reference in search.references(resource, param):
                ref = _reference(reference)
                if ref is not None and (target is None or ref[0] == target) and ref[0] in READ_TYPES \
                        and grant.allows(ref[0], "r"):
                    wanted[ref] = None
    rows: list[FhirResource] = []
    for rtype in dict.fromkeys(r[0] for r in wanted):  # two queries per included type
        current = [rid for t, rid, v in wanted if t == rtype and v is None]
        versioned = [(rid, v) for t, rid, v in wanted if t == rtype and v is not None]
        if current:
            rows += session.scalars(search.snapshot_select(rtype, snapshot).where(FhirResource.id.in_(current)))
        if versioned:
            rows += session.scalars(select(FhirResource).where(
                FhirResource.resource_type == rtype, FhirResource.seq <= snapshot, FhirResource.deleted.is_(False),
                tuple_(FhirResource.id, FhirResource.version_id).in_(versioned)))
    out = []
    for row in sorted(rows, key=lambda r: r.seq):
        key = (row.resource_type, row.id, row.version_id)
        if key in served:
            continue
        served.add(key)
        try:
            raw = row_bytes(clinic, session, row)
        except KeyUnavailable:
            continue
        if row.patient_id:
            patients.add(str(row.patient_id))
        out.append({"fullUrl": f"{base}/{row.resource_type}/{row.id}", "resource": orjson.Fragment(raw),
                    "search": {"mode": "include"}})
    return out
