"""R4 Subscriptions: rest-hook with id-only notifications, written with the publication, delivered
to a real HTTP endpoint with retries."""

from __future__ import annotations

from datetime import timedelta

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import select

from clinic_db.models import FhirSubscription, SubscriptionNotification, utcnow
from fhir.subscriptions import deliver_due
from tests.support import serve_app
from tests.test_fhir_support import make_case, make_clinician, serve_ehr, sign

SCOPES = ["system/*.rs", "system/Subscription.cruds"]


def receiver():  # type: ignore[no-untyped-def]
    """The EHR's notification endpoint: records what arrives; fails while ``state['fail']`` > 0."""
    app = FastAPI()
    state = {"fail": 0, "got": []}

    @app.post("/hook")
    async def hook(request: Request) -> Response:
        if state["fail"] > 0:
            state["fail"] -= 1
            return Response(status_code=503)
        state["got"].append({"auth": request.headers.get("authorization"), "body": await request.json(),
                             "type": request.headers.get("content-type")})
        return Response(status_code=200)

    return app, state


def test_rest_hook_id_only_notifications_with_retries(clinic):
    hook_app, state = receiver()
    with serve_app(hook_app) as hook_base, serve_ehr(clinic, scopes=SCOPES) as ehr:
        h = ehr.headers(scope=" ".join(SCOPES))
        sub = {"resourceType": "Subscription", "status": "requested", "reason": "signed reports",
               "criteria": "DiagnosticReport?status=final",
               "channel": {"type": "rest-hook", "endpoint": f"{hook_base}/hook",
                           "header": ["Authorization: Bearer ehr-endpoint-secret"]}}
        created = httpx.post(f"{ehr.fhir}/Subscription", json=sub, headers=h)
        assert created.status_code == 201, created.text
        res = created.json()
        assert res["status"] == "active" and created.headers["Location"].endswith(f"/Subscription/{res['id']}")
        assert res["channel"]["_payload"]["extension"][0]["valueCode"] == "id-only"
        assert "header" not in res["channel"]  # the endpoint's secret is never echoed

        bad = dict(sub, criteria="Unicorn?x=1")
        assert httpx.post(f"{ehr.fhir}/Subscription", json=bad, headers=h).status_code == 422
        email = dict(sub, channel={"type": "email", "endpoint": "mailto:a@b.c"})
        assert httpx.post(f"{ehr.fhir}/Subscription", json=email, headers=h).status_code == 422
        text = httpx.post(f"{ehr.fhir}/Subscription", content="x", headers={**h, "Content-Type": "text/plain"})
        assert text.status_code == 415
        read_only = ehr.headers(scope="system/*.rs")
        assert httpx.post(f"{ehr.fhir}/Subscription", json=sub, headers=read_only).status_code == 403

        with clinic.session() as s:
            case = make_case(clinic, s, 1101)  # preliminary: does not match status=final
            assert s.scalars(select(SubscriptionNotification)).all() == []
            sign(clinic, s, case, make_clinician(s))
            pending = s.scalars(select(SubscriptionNotification)).all()
            assert [n.resource_ref for n in pending] == [f"DiagnosticReport/{case.id}/_history/2"]

        state["fail"] = 1
        assert deliver_due(clinic, base=ehr.fhir) == 0  # the endpoint is down: retried later
        with clinic.session() as s:
            note = s.scalars(select(SubscriptionNotification)).one()
            assert note.status == "pending" and note.attempts == 1 and note.next_attempt_at > utcnow()
        assert deliver_due(clinic, base=ehr.fhir) == 0  # not due yet
        assert deliver_due(clinic, base=ehr.fhir, now=utcnow() + timedelta(minutes=5)) == 1
        [got] = state["got"]
        assert got["auth"] == "Bearer ehr-endpoint-secret" and got["type"] == "application/fhir+json"
        bundle = got["body"]
        assert bundle["type"] == "history"
        params = {p["name"]: p for p in bundle["entry"][0]["resource"]["parameter"]}
        focus = params["notification-event"]["part"][1]["valueReference"]["reference"]
        assert focus == f"{ehr.fhir}/DiagnosticReport/{case.id}/_history/2"
        assert "resource" not in bundle["entry"][1]  # id-only: no clinical content leaves this way
        # the EHR follows up with its token
        assert httpx.get(focus, headers=read_only).json()["status"] == "final"

        listed = httpx.get(f"{ehr.fhir}/Subscription", headers=h).json()
        assert [e["resource"]["id"] for e in listed["entry"]] == [res["id"]]
        assert httpx.delete(f"{ehr.fhir}/Subscription/{res['id']}", headers=h).status_code == 204
        assert httpx.get(f"{ehr.fhir}/Subscription/{res['id']}", headers=h).status_code == 404
        with clinic.session() as s:
            sign(clinic, s, s.merge(case), make_clinician(s, "dr.b", "Dr. B"), decision="amend",
                 condition_code="nevus")
            assert len(s.scalars(select(SubscriptionNotification)).all()) == 1  # nothing new once off
            row = s.scalars(select(FhirSubscription)).one()
            assert "ehr-endpoint-secret" not in str(row.headers) and row.endpoint == f"{hook_base}/hook"


def test_failing_endpoint_puts_subscription_in_error_and_gives_up(clinic):
    hook_app, state = receiver()
    with serve_app(hook_app) as hook_base, serve_ehr(clinic, scopes=SCOPES) as ehr:
        h = ehr.headers(scope=" ".join(SCOPES))
        created = httpx.post(f"{ehr.fhir}/Subscription", headers=h, json={
            "resourceType": "Subscription", "status": "requested", "reason": "all reports",
            "criteria": "DiagnosticReport", "channel": {"type": "rest-hook", "endpoint": f"{hook_base}/hook"}})
        assert created.status_code == 201, created.text
        with clinic.session() as s:
            make_case(clinic, s, 1102)
        state["fail"] = 100
        now = utcnow()
        for step in range(8):
            deliver_due(clinic, base=ehr.fhir, now=now + timedelta(hours=2 * step))
        with clinic.session() as s:
            note = s.scalars(select(SubscriptionNotification)).one()
            assert note.status == "dead" and note.attempts == 8 and note.last_error == "HTTP 503"
            assert s.scalars(select(FhirSubscription)).one().status == "error"
        assert httpx.get(created.headers["Location"], headers=h).json()["status"] == "error"
