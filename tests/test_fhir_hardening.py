"""Regression tests for the FHIR API's hardening (issue 20): each test is one verified problem, tried
over real HTTP against the app, as an EHR integrator (or an attacker) found it."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
import uvicorn
from sqlalchemy import func, select

from clinic_db.models import BulkExportFile, BulkExportJob, UsedJti
from fhir import bulk
from skinbridge.settings import reset_settings_cache
from tests.support import free_port
from tests.test_fhir_support import export_worker, make_case, make_clinician, serve_ehr, sign, use_test_broker


def expect_outcome(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/fhir+json"), resp.headers
    body = resp.json()
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["diagnostics"], body
    return body


def page_token(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@contextlib.contextmanager
def serve_web_app() -> Iterator[str]:
    """The whole web app (skinbridge.web.create_app) as `skinbridge api` serves it: HttpProtocol."""
    from skinbridge.web import HttpProtocol, create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning",
                                           http=HttpProtocol))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "web app did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- 1. inputs that used to raise inside the server (500, plain text, dropped connection) -------
def test_calendar_limits_page_tokens_versions_and_long_value_lists_never_500(any_clinic):
    """Both backends: SQLite ("Expression tree is too large", INTEGER overflow) and PostgreSQL
    (BIGINT overflow, negative OFFSET, NUL bytes) failed differently."""
    clinic = any_clinic
    with clinic.session() as s:
        case = make_case(clinic, s, 2001)
    with serve_ehr(clinic) as ehr, httpx.Client(headers=ehr.headers(), timeout=30) as http:
        dr = f"{ehr.fhir}/DiagnosticReport"

        def ids(**params: str) -> list[str]:
            resp = http.get(dr, params=params)
            assert resp.status_code == 200, resp.text
            return [e["resource"]["id"] for e in resp.json().get("entry", [])]

        # valid dates at the calendar's ends are answered, with the right meaning
        assert ids(date="le9999-12-31") == [str(case.id)]
        assert ids(date="9999-12-31") == []
        assert ids(issued="ge9999-12-31T23:59:59Z") == []
        assert ids(issued="gt0001-01-01T00:00:00+14:00") == [str(case.id)]
        assert ids(_lastUpdated="lt9999") == [str(case.id)]
        assert ids(_lastUpdated="ge9999-12") == []
        # ... and nonsense dates are a 400 OperationOutcome
        for bad in ("10000-01-01", "2026-13", "9999-12-31T25:00:00Z", "²⁰²⁶", "2026-01-01T00:00:00+25:00"):
            expect_outcome(http.get(dr, params={"date": bad}), 400)
        since = http.get(f"{ehr.fhir}/$export", params={"_since": "9999-12-31T23:59:59Z"},
                         headers={"Prefer": "respond-async"})
        assert since.status_code == 202, since.text
        assert http.delete(since.headers["Content-Location"]).status_code == 202
        expect_outcome(http.get(f"{ehr.fhir}/$export", params={"_since": "0000-00-00"},
                                headers={"Prefer": "respond-async"}), 400)

        # crafted _page tokens: huge, infinite, negative, wrong shape
        for raw in ('{"s":1e400}', '{"s":%d}' % 10**30, '{"s":%d}' % 2**63, '{"s":1,"o":-5}',
                    '{"s":1,"a":-1}', '{"s":true}', '[1]', '"s"', '{"s":1.5}'):
            expect_outcome(http.get(dr, params={"_page": page_token(raw), "_sort": "date"}
                                    if '"o"' in raw else {"_page": page_token(raw)}), 400)
        expect_outcome(http.get(dr, params={"_page": "%%%not-base64"}), 400)

        # vread: non-ASCII digits, versions beyond INTEGER, ids that cannot be FHIR ids
        for version in ("²", "١", "0", str(2**31), str(2**63), "9" * 40):
            expect_outcome(http.get(f"{dr}/{case.id}/_history/{version}"), 404)
        assert http.get(f"{dr}/{case.id}/_history/1").status_code == 200
        expect_outcome(http.get(f"{dr}/bad%00id"), 404)
        expect_outcome(http.get(f"{dr}/{'x' * 65}/_history"), 404)
        expect_outcome(http.get(dr, params={"status": "final\x00"}), 400)

        # long value lists and many parameters are refused before they reach SQL
        expect_outcome(http.get(dr, params={"code": ",".join(f"c{i}" for i in range(1000))}), 400)
        expect_outcome(http.get(dr, params=[("date", "ge2000")] * 200), 400)
        assert ids(code=",".join(["http://loinc.org|11488-4"] + [f"c{i}" for i in range(99)])) == [str(case.id)]
        assert len(http.get(dr, params={"_count": "9" * 5000}).json()["entry"]) == 1  # capped, not parsed
        # the same keep-alive connection still works after all of that
        assert http.get(f"{dr}/{case.id}").status_code == 200


# --- 2. the Host header decides nothing once a public base URL is configured -------------------
def test_public_base_url_is_the_only_audience_and_base(clinic, monkeypatch, caplog):
    public = "https://skinbridge.example.org"
    from skinbridge.web import create_app

    with caplog.at_level(logging.WARNING, logger="skinbridge.web"):
        create_app()
    assert "SKINBRIDGE_PUBLIC_BASE_URL is not set" in caplog.text  # development: said at start-up

    monkeypatch.setenv("SKINBRIDGE_PUBLIC_BASE_URL", public)
    reset_settings_cache()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="skinbridge.web"):
        create_app()
    assert "PUBLIC_BASE_URL" not in caplog.text

    with clinic.session() as s:
        make_case(clinic, s, 2010)
        make_case(clinic, s, 2011)
    with serve_ehr(clinic) as ehr:
        evil = ehr.key.assertion(ehr.client_id, "http://evil.example/auth/token")
        resp = httpx.post(ehr.token_url, headers={"Host": "evil.example"}, data={
            "grant_type": "client_credentials", "scope": "system/*.rs", "client_assertion": evil,
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"})
        assert resp.status_code == 401 and resp.json()["error"] == "invalid_client", resp.text
        # the address the server happens to listen on is not an audience either
        local = ehr.token_response(ehr.key.assertion(ehr.client_id, ehr.token_url))
        assert local.status_code == 401 and "aud" in local.json()["error_description"]
        token = ehr.token_response(ehr.key.assertion(ehr.client_id, public + "/auth/token"))
        assert token.status_code == 200, token.text
        h = {"Authorization": f"Bearer {token.json()['access_token']}", "Host": "evil.example"}
        bundle = httpx.get(f"{ehr.fhir}/DiagnosticReport", params={"_count": "1"}, headers=h).json()
        urls = [e["fullUrl"] for e in bundle["entry"]] + [link["url"] for link in bundle["link"]]
        assert len(urls) == 3 and all(u.startswith(public + "/fhir/DiagnosticReport") for u in urls), urls
        meta = httpx.get(f"{ehr.fhir}/metadata", headers={"Host": "evil.example"}).json()
        assert meta["implementation"]["url"] == public + "/fhir"


# --- 3. _include: each referenced version once, at the version the reference names -------------
def test_include_serves_each_referenced_version_once(clinic):
    with clinic.session() as s:
        case = make_case(clinic, s, 2020)
        sign(clinic, s, case, make_clinician(s))  # report v2; the AI Provenance still targets v1
    with serve_ehr(clinic) as ehr:
        bundle = httpx.get(f"{ehr.fhir}/Provenance", headers=ehr.headers(), params={
            "patient": str(case.patient_id), "_include": "Provenance:target:DiagnosticReport"}).json()
        matches = [e for e in bundle["entry"] if e["search"]["mode"] == "match"]
        wanted = {r["reference"] for e in matches for r in e["resource"]["target"]
                  if r["reference"].startswith("DiagnosticReport/")}
        assert wanted == {f"DiagnosticReport/{case.id}/_history/1", f"DiagnosticReport/{case.id}/_history/2"}
        included = [e for e in bundle["entry"] if e["search"]["mode"] == "include"]
        assert sorted(e["resource"]["meta"]["versionId"] for e in included) == ["1", "2"]
        assert {e["resource"]["status"] for e in included} == {"preliminary", "final"}
        keys = [(e["fullUrl"], e["resource"].get("meta", {}).get("versionId")) for e in bundle["entry"]]
        assert len(keys) == len(set(keys))  # bdl-7: fullUrl unique per versionId


# --- 4. _summary, _elements and the self link's _count -------------------------------------------
def test_summary_elements_and_count_in_self_link(clinic):
    with clinic.session() as s:
        for i in range(3):
            make_case(clinic, s, 2030 + i)
    with serve_ehr(clinic) as ehr, httpx.Client(headers=ehr.headers(), timeout=30) as http:
        dr = f"{ehr.fhir}/DiagnosticReport"
        count = http.get(dr, params={"_summary": "count"}).json()
        assert count["total"] == 3 and "entry" not in count

        full = http.get(dr).json()["entry"][0]["resource"]
        assert "presentedForm" in full and "conclusion" in full
        summary = http.get(dr, params={"_summary": "true"}).json()["entry"]
        assert len(summary) == 3
        for entry in summary:
            r = entry["resource"]
            assert {"code": "SUBSETTED"}.items() <= r["meta"]["tag"][-1].items()
            assert "presentedForm" not in r and "conclusion" not in r  # not summary elements
            assert r["status"] and r["code"] and r["subject"]

        elements = http.get(dr, params={"_elements": "status,issued"}).json()["entry"][0]["resource"]
        assert set(elements) == {"resourceType", "id", "meta", "status", "issued", "code"}  # code: mandatory
        assert elements["meta"]["tag"][-1]["code"] == "SUBSETTED"
        read = http.get(f"{dr}/{full['id']}", params={"_elements": "status"}).json()
        assert set(read) == {"resourceType", "id", "meta", "status", "code"}

        capped = http.get(dr, params={"_count": "1000"}).json()
        assert len(capped["entry"]) == 3
        assert parse_qs(urlparse(capped["link"][0]["url"]).query)["_count"] == ["100"]
        paged = http.get(dr, params={"_count": "2"}).json()
        assert parse_qs(urlparse(paged["link"][1]["url"]).query)["_count"] == ["2"]
        expect_outcome(http.get(dr, params={"_summary": "everything"}), 400)
        expect_outcome(http.get(f"{dr}/{full['id']}", params={"_summary": "count"}), 400)


# --- 5. $export cannot be amplified --------------------------------------------------------------
def test_export_amplification_is_bounded(clinic, monkeypatch):
    with clinic.session() as s:
        cases = [make_case(clinic, s, 2040 + i) for i in range(3)]
    use_test_broker()
    with serve_ehr(clinic) as ehr:
        h = ehr.headers()
        async_h = {**h, "Prefer": "respond-async"}
        # no worker yet: the kick-off only records the job, nothing runs inside the API process
        first = httpx.get(f"{ehr.fhir}/$export", params={"_type": ",".join(["DiagnosticReport"] * 500)},
                          headers=async_h)
        assert first.status_code == 202, first.text
        second = httpx.get(f"{ehr.fhir}/$export", headers=async_h)
        assert second.status_code == 202
        time.sleep(0.5)
        assert httpx.get(first.headers["Content-Location"], headers=h).headers["X-Progress"] == "accepted"
        third = httpx.get(f"{ehr.fhir}/$export", headers=async_h)
        expect_outcome(third, 429)
        assert int(third.headers["Retry-After"]) > 0
        assert httpx.delete(second.headers["Content-Location"], headers=h).status_code == 202

        monkeypatch.setattr(bulk, "MAX_FILE_BYTES", 1)  # every resource in a file of its own
        with export_worker():
            deadline = time.monotonic() + 60
            while (status := httpx.get(first.headers["Content-Location"], headers=h)).status_code == 202:
                assert time.monotonic() < deadline, "the export did not finish"
                time.sleep(0.2)
        assert status.status_code == 200, status.text
        manifest = status.json()
        assert [o["type"] for o in manifest["output"]] == ["DiagnosticReport"] * 3  # de-duplicated _type
        assert [o["count"] for o in manifest["output"]] == [1, 1, 1]
        got = {json.loads(httpx.get(o["url"], headers=h).text)["id"] for o in manifest["output"]}
        assert got == {str(c.id) for c in cases}

        # files expire: an hour after completion they are gone, and so is the job for its client
        with clinic.session() as s:
            for job in s.scalars(select(BulkExportJob).where(BulkExportJob.status == "complete")):
                job.completed_at -= bulk.FILE_TTL + timedelta(minutes=1)
            s.commit()
        expect_outcome(httpx.get(first.headers["Content-Location"], headers=h), 404)
        expect_outcome(httpx.get(manifest["output"][0]["url"], headers=h), 404)
        with clinic.session() as s:
            assert s.scalar(select(func.count()).select_from(BulkExportFile)) == 0


# --- 6. wrong routes and methods, oversized headers, long jtis -----------------------------------
def test_wrong_routes_huge_headers_and_long_jtis(clinic):
    with serve_web_app() as base, serve_ehr(clinic) as ehr:
        for method, path, status in [("OPTIONS", "/fhir/metadata", 405), ("OPTIONS", "/fhir/DiagnosticReport", 405),
                                     ("HEAD", "/fhir", 405), ("GET", "/fhir", 405), ("HEAD", "/nowhere", 404),
                                     ("GET", "/nowhere", 404), ("GET", "/fhir/a/b/c/d/e", 404),
                                     ("GET", "/fhir/$export-status/x", 401)]:
            resp = httpx.request(method, base + path)
            assert resp.status_code == status, (method, path, resp.status_code, resp.text)
            assert resp.headers["content-type"].startswith("application/fhir+json"), (method, path)
            if method != "HEAD":
                expect_outcome(resp, status)
        token_get = httpx.get(base + "/auth/token")
        assert token_get.status_code == 405 and token_get.json()["error"] == "invalid_request"
        assert httpx.get(base + "/console/nowhere").headers["content-type"].startswith("application/json")

        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**20 + b"\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431"), head
        assert json.loads(body)["resourceType"] == "OperationOutcome"

        # jtis longer than the column: two that share 255 characters are different jtis
        prefix = "j" * 300
        one, two = prefix + "-one", prefix + "-two"
        assert ehr.token_response(ehr.key.assertion(ehr.client_id, ehr.token_url, jti=one)).status_code == 200
        assert ehr.token_response(ehr.key.assertion(ehr.client_id, ehr.token_url, jti=two)).status_code == 200
        replay = ehr.token_response(ehr.key.assertion(ehr.client_id, ehr.token_url, jti=two))
        assert replay.status_code == 401 and "replay" in replay.json()["error_description"]
        with clinic.session() as s:
            assert s.scalar(select(func.count()).select_from(UsedJti)) == 2


@pytest.fixture(autouse=True)
def _fresh_settings():  # type: ignore[no-untyped-def]
    yield
    reset_settings_cache()
