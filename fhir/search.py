"""FHIR search over the ``fhir_resources`` table: parameters, snapshot, sorting and stable paging.

Every search runs against a *snapshot* ``seq <= S`` where S is the highest seq when the first page was
asked for: each resource counts with its newest version at or below S. Pages of the default order
are keyed on seq (``seq > last``), pages of other orders on an offset into the same snapshot, so
reports that arrive (or change) while a client pages never cause duplicates or gaps.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from clinic_db.models import FhirResource, PatientKey

DEFAULT_COUNT = 20
MAX_COUNT = 100
# Bounds that keep every query well inside what both databases accept (SQLite parses a long OR/AND
# chain into a tree of at most 1,000 levels; PostgreSQL's BIGINT/INTEGER overflow).
MAX_PARAMS = 50  # search parameters in one request
MAX_VALUES = 100  # comma-separated values of one parameter
MAX_CURSOR = 2**62  # seq / offset values a _page token may carry
MIN_INSTANT = datetime.min.replace(tzinfo=timezone.utc)
MAX_INSTANT = datetime.max.replace(tzinfo=timezone.utc)
SUMMARY_MODES = frozenset({"true", "false", "count", "data", "text"})

PATIENT_PARAMS = ("patient", "subject")
TYPE_PARAMS: dict[str, frozenset[str]] = {
    "DiagnosticReport": frozenset({"patient", "subject", "status", "category", "code", "date", "issued",
                                   "identifier"}),
    "Observation": frozenset({"patient", "subject", "status", "category", "code", "date"}),
    "Media": frozenset({"patient", "subject", "status", "created"}),
    "Patient": frozenset({"identifier"}),
    "Device": frozenset({"identifier", "status"}),
    "Provenance": frozenset({"patient", "recorded"}),
    "Practitioner": frozenset({"identifier"}),
    "Organization": frozenset(),
    "Binary": frozenset(),
}
COMMON_PARAMS = frozenset({"_id", "_lastUpdated"})
CONTROL_PARAMS = frozenset({"_count", "_sort", "_include", "_page", "_format", "_total", "_pretty", "_summary",
                            "_elements"})
INCLUDES: dict[str, dict[str, str | None]] = {
    # search param -> target type (None: any)
    "DiagnosticReport": {"result": "Observation", "media": "Media", "subject": "Patient", "patient": "Patient",
                         "performer": "Organization", "results-interpreter": "Practitioner"},
    "Observation": {"subject": "Patient", "patient": "Patient", "device": "Device"},
    "Media": {"subject": "Patient", "patient": "Patient"},
    "Provenance": {"patient": "Patient", "target": None},
}
SORTS: dict[str, Any] = {
    "_lastUpdated": FhirResource.last_updated,
    "date": FhirResource.effective_at,
    "issued": FhirResource.issued_at,
    "created": FhirResource.effective_at,
    "status": FhirResource.status,
    "_id": FhirResource.id,
}
DATE_COLUMNS: dict[str, Any] = {
    "date": FhirResource.effective_at,
    "created": FhirResource.effective_at,
    "recorded": FhirResource.effective_at,
    "issued": FhirResource.issued_at,
    "_lastUpdated": FhirResource.last_updated,
}
TOKEN_COLUMNS: dict[str, Any] = {
    "code": FhirResource.code,
    "category": FhirResource.category,
    "identifier": FhirResource.identifier,
}


class SearchError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Query:
    resource_type: str
    params: list[tuple[str, str]]
    strict: bool = False
    count: int = DEFAULT_COUNT
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    includes: list[tuple[str, str, str | None]] = field(default_factory=list)  # (source, param, target)
    snapshot: int | None = None
    after: int | None = None  # keyset cursor (default order)
    offset: int = 0  # offset cursor (explicit _sort)
    ignored: list[str] = field(default_factory=list)
    summary: str | None = None  # _summary mode
    elements: list[str] = field(default_factory=list)  # _elements


# --- parsing ------------------------------------------------------------------------------------
def parse(resource_type: str, params: list[tuple[str, str]], *, strict: bool = False) -> Query:
    q = Query(resource_type, [], strict=strict)
    allowed = TYPE_PARAMS[resource_type] | COMMON_PARAMS
    if len(params) > MAX_PARAMS:
        raise SearchError(400, f"too many search parameters ({len(params)}; at most {MAX_PARAMS})")
    for name, value in params:
        if "\x00" in name or "\x00" in value:
            raise SearchError(400, f"parameter {name!r} contains a NUL character")
        base = name.split(":", 1)[0]
        if name == "_count":
            if not (value.isascii() and value.isdigit()):
                raise SearchError(400, "_count must be a non-negative integer")
            q.count = MAX_COUNT if len(value) > 4 else min(int(value), MAX_COUNT)
        elif name == "_summary":
            if value not in SUMMARY_MODES:
                raise SearchError(400, f"_summary must be one of {', '.join(sorted(SUMMARY_MODES))}")
            q.summary = None if value == "false" else value
        elif name == "_elements":
            q.elements += [e.strip() for e in value.split(",") if e.strip()]
        elif name == "_sort":
            for key in value.split(","):
                desc = key.startswith("-")
                key = key.lstrip("-")
                if key not in SORTS:
                    raise SearchError(422, f"cannot sort by {key!r} (supported: {', '.join(SORTS)})")
                q.sort.append((key, desc))
        elif name == "_include":
            if len(q.includes) >= len(INCLUDES.get(resource_type, {})) + 1:
                raise SearchError(400, "too many _include parameters")
            parts = value.split(":")
            if len(parts) not in (2, 3) or parts[0] not in INCLUDES or parts[1] not in INCLUDES[parts[0]]:
                raise SearchError(422, f"unsupported _include {value!r}")
            target = parts[2] if len(parts) == 3 else INCLUDES[parts[0]][parts[1]]
            q.includes.append((parts[0], parts[1], target))
        elif name == "_page":
            q.snapshot, q.after, q.offset = _decode_page(value)
        elif name in CONTROL_PARAMS:
            continue
        elif base in allowed and name == base:
            if value.count(",") >= MAX_VALUES:
                raise SearchError(400, f"{name}: at most {MAX_VALUES} comma-separated values")
            q.params.append((name, value))
        else:
            if strict:
                raise SearchError(400, f"unknown or unsupported search parameter {name!r} for {resource_type}")
            q.ignored.append(name)
    if q.sort and q.after is not None:
        raise SearchError(400, "_page token does not match _sort")
    return q


def encode_page(snapshot: int, *, after: int | None = None, offset: int | None = None) -> str:
    body = {"s": snapshot} | ({"a": after} if after is not None else {"o": offset or 0})
    return base64.urlsafe_b64encode(json.dumps(body, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_page(token: str) -> tuple[int, int | None, int]:
    try:
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        snapshot, after, offset = _cursor(body["s"]), body.get("a"), _cursor(body.get("o", 0))
        return snapshot, (None if after is None else _cursor(after)), offset
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise SearchError(400, "invalid _page token") from exc


def _cursor(value: Any) -> int:
    """A seq or offset from a (client-held, so untrusted) _page token: an int in [0, MAX_CURSOR)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_CURSOR:
        raise ValueError("cursor out of range")
    return value


# --- values -------------------------------------------------------------------------------------
def parse_date(value: str) -> tuple[datetime, datetime]:
    """The [start, end) UTC instant range a FHIR date/dateTime value of any precision denotes (UTC if no
    zone). Ranges that reach past year 1 or 9999 (e.g. ``9999-12-31``, ``0001-01-01T00:00:00+14:00``)
    are clamped to what a datetime can hold."""
    if not value.isascii() or len(value) < 4 or not value[:4].isdigit():
        raise SearchError(400, f"invalid date {value!r}")
    try:
        if len(value) == 4:
            start = datetime(int(value), 1, 1, tzinfo=timezone.utc)
            return start, _shift(start, year=1)
        if len(value) == 7 and value[4] == "-" and value[5:].isdigit():
            start = datetime(int(value[:4]), int(value[5:7]), 1, tzinfo=timezone.utc)
            return start, _shift(start, month=1)
        if len(value) == 10:
            start = datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
            return start, _shift(start, days=1)
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise SearchError(400, f"invalid date {value!r}") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    try:
        dt = dt.astimezone(timezone.utc)
    except OverflowError:  # the offset moves it below year 1 or above 9999
        dt = MIN_INSTANT if dt.utcoffset() > timedelta(0) else MAX_INSTANT  # type: ignore[operator]
    return dt, _shift(dt, **({"microseconds": 1} if dt.microsecond else {"seconds": 1}))


def _shift(start: datetime, *, year: int = 0, month: int = 0, **delta: int) -> datetime:
    """``start`` plus a year, a month or a timedelta, clamped at the largest datetime."""
    try:
        if year:
            return start.replace(year=start.year + 1)
        if month:
            return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
        return start + timedelta(**delta)
    except (ValueError, OverflowError):
        return MAX_INSTANT


def _date_clause(column: Any, raw: str) -> ColumnElement[bool]:
    prefix, value = (raw[:2], raw[2:]) if raw[:2] in ("eq", "ne", "gt", "ge", "lt", "le") else ("eq", raw)
    start, end = parse_date(value)
    return {
        "eq": and_(column >= start, column < end),
        "ne": or_(column < start, column >= end),
        "gt": column >= end,
        "ge": column >= start,
        "lt": column < start,
        "le": column < end,
    }[prefix]


def _token_clause(column: Any, raw: str) -> ColumnElement[bool]:
    clauses = []
    for value in raw.split(","):
        if "|" not in value:
            clauses.append(column.like(f"%|{_escape(value)}", escape="\\"))
        elif value.endswith("|"):
            clauses.append(column.like(f"{_escape(value)}%", escape="\\"))
        elif value.startswith("|"):
            clauses.append(column == value)
        else:
            clauses.append(column == value)
    return or_(*clauses)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _patient_ids(raw: str) -> list[uuid.UUID]:
    ids = []
    for value in raw.split(","):
        value = value.removeprefix("Patient/").rsplit("/Patient/", 1)[-1]
        try:
            ids.append(uuid.UUID(value))
        except ValueError:
            continue  # not one of ours: matches nothing
    return ids


# --- SQL ----------------------------------------------------------------------------------------
_NEWER = aliased(FhirResource, name="newer")  # built once: a fresh alias re-adapts every column it touches


def snapshot_select(resource_type: str, snapshot: int) -> Select[tuple[FhirResource]]:
    """Each resource of the type at its newest version with seq <= snapshot (not deleted, not erased)."""
    newer = _NEWER
    return select(FhirResource).where(
        FhirResource.resource_type == resource_type,
        FhirResource.seq <= snapshot,
        FhirResource.deleted.is_(False),
        ~exists().where(newer.resource_type == FhirResource.resource_type, newer.id == FhirResource.id,
                        newer.seq > FhirResource.seq, newer.seq <= snapshot),
        # not erased: a correlated EXISTS probes patient_keys' primary key per row (an IN over the
        # whole table made PostgreSQL hash all of patient_keys for every search)
        or_(FhirResource.patient_id.is_(None),
            select(PatientKey.patient_id).where(PatientKey.patient_id == FhirResource.patient_id)
            .correlate_except(PatientKey).exists()),
    )


def current_snapshot(session: Session) -> int:
    return int(session.scalar(select(snapshot_column())) or 0)


def snapshot_column() -> Any:
    """The highest seq (0 when nothing is published) as a scalar subquery, to fold into another query."""
    return select(func.coalesce(func.max(FhirResource.seq), 0)).scalar_subquery()


def filtered(q: Query, snapshot: int) -> Select[tuple[FhirResource]]:
    stmt = snapshot_select(q.resource_type, snapshot)
    for name, raw in q.params:
        if name in PATIENT_PARAMS:
            column = FhirResource.id if q.resource_type == "Patient" else FhirResource.patient_id
            ids = _patient_ids(raw)
            stmt = stmt.where(column.in_([str(i) for i in ids]) if q.resource_type == "Patient"
                              else column.in_(ids))
        elif name == "_id":
            stmt = stmt.where(FhirResource.id.in_(raw.split(",")))
        elif name == "status":
            stmt = stmt.where(FhirResource.status.in_(raw.split(",")))
        elif name in DATE_COLUMNS:
            stmt = stmt.where(_date_clause(DATE_COLUMNS[name], raw))
        elif name in TOKEN_COLUMNS:
            stmt = stmt.where(_token_clause(TOKEN_COLUMNS[name], raw))
        else:  # pragma: no cover - parse() only lets known parameters through
            raise SearchError(400, f"unsupported parameter {name}")
    return stmt


@dataclass
class Page:
    rows: list[FhirResource]
    total: int
    snapshot: int
    next_page: str | None
    keys: list[Any] = field(default_factory=list)  # the rows' PatientKeys: held so the session keeps them


def run(session: Session, q: Query, snapshot: int | None = None) -> Page:
    """One page of matches. Round trips: the first page of a search is one query (rows, their patients'
    data keys for decryption, and the total via a window count); later pages add a count query.
    ``snapshot``: the current highest seq when the caller already read it."""
    if q.snapshot is not None:
        snapshot = q.snapshot
    elif snapshot is None:
        snapshot = current_snapshot(session)
    stmt = filtered(q, snapshot)
    first_page = q.after is None and q.offset == 0
    if q.count == 0 or q.summary == "count" or not first_page:
        total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
        if q.count == 0 or q.summary == "count":
            return Page([], total, snapshot, None)
    if q.sort:
        stmt = stmt.order_by(*[SORTS[k].desc() if desc else SORTS[k].asc() for k, desc in q.sort],
                             FhirResource.seq.asc()).offset(q.offset)
    else:
        if q.after is not None:
            stmt = stmt.where(FhirResource.seq > q.after)
        stmt = stmt.order_by(FhirResource.seq.asc())
    # the patients' data keys come along (into the session, where Vault.data_key finds them)
    stmt = stmt.outerjoin(PatientKey, PatientKey.patient_id == FhirResource.patient_id).add_columns(PatientKey)
    if first_page:
        stmt = stmt.add_columns(func.count().over().label("total"))
    result = session.execute(stmt.limit(q.count + 1)).all()
    if first_page:
        total = int(result[0].total) if result else 0
    rows = [r[0] for r in result]
    keys = [r[1] for r in result]
    more = len(rows) > q.count
    rows = rows[: q.count]
    if q.sort:
        nxt = encode_page(snapshot, offset=q.offset + q.count) if more else None
    else:
        nxt = encode_page(snapshot, after=rows[-1].seq) if more and rows else None
    return Page(rows, total, snapshot, nxt, keys)


def references(resource: dict[str, Any], param: str) -> list[str]:
    """Literal references a resource holds for an _include search parameter."""
    rtype = resource.get("resourceType")
    if rtype == "DiagnosticReport":
        if param == "result":
            return [r["reference"] for r in resource.get("result", [])]
        if param == "media":
            return [m["link"]["reference"] for m in resource.get("media", [])]
        if param == "performer":
            return [r["reference"] for r in resource.get("performer", [])]
        if param == "results-interpreter":
            return [r["reference"] for r in resource.get("resultsInterpreter", [])]
    if rtype == "Observation" and param == "device" and "device" in resource:
        return [resource["device"]["reference"]]
    if rtype == "Provenance":
        if param == "target":
            return [t["reference"] for t in resource.get("target", [])]
        if param == "patient":
            return []
    if param in ("subject", "patient") and "subject" in resource:
        return [resource["subject"]["reference"]]
    return []
