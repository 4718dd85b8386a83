"""The console over real HTTP (uvicorn on a loopback port, httpx as the browser): authentication,
CSRF, roles, security headers, photos, claims and signing."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from clinic_db import clinicians
from clinic_db.models import AIResult, AuditEvent, Case, OutboxMessage, ReviewTask
from console import demo
from console.app import build_router
from tests.e2e_support import console_login, csrf_token
from tests.support import serve_app

PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class Seeded:
    """Ids of a seeded review case (ORM rows cannot outlive their session)."""

    task_id: uuid.UUID
    case_id: uuid.UUID
    image_id: uuid.UUID
    ai_id: uuid.UUID


@dataclass
class World:
    base: str
    clinic: object
    cases: list[Seeded]


@pytest.fixture
def world(clinic) -> Iterator[World]:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        clinicians.create(clinic, s, "ada", display_name="Dr. Ada Weber", role="dermatologist", password=PASSWORD)
        clinicians.create(clinic, s, "bob", display_name="Dr. Bob Brandt", role="dermatologist", password=PASSWORD)
        clinicians.create(clinic, s, "ops", display_name="Ops", role="admin", password=PASSWORD)
        made = [Seeded(rc.task.id, rc.case.id, rc.case.images[0].id, rc.case.ai_results[0].id)
                for rc in demo.seed_queue(clinic, s)]
        s.commit()
    app = FastAPI()
    app.include_router(build_router(), prefix="/console")
    with serve_app(app) as base:
        yield World(base=base, clinic=clinic, cases=made)


_csrf = csrf_token


def _login(base: str, username: str, password: str = PASSWORD) -> httpx.Client:
    return console_login(base, username, password)


def test_pages_need_a_login_and_carry_security_headers(world: World) -> None:
    anon = httpx.Client(base_url=world.base)
    r = anon.get("/console/queue", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    task_id = world.cases[0].task_id
    assert anon.get(f"/console/tasks/{task_id}", follow_redirects=False).status_code == 303
    image_id = world.cases[0].image_id
    assert anon.get(f"/console/images/{image_id}", follow_redirects=False).status_code == 303

    login = anon.get("/console/login")
    assert login.headers["x-frame-options"] == "DENY"
    csp = login.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "<script>" not in login.text and " style=" not in login.text  # nothing inline for the CSP to block

    ada = _login(world.base, "ada")
    session_cookie = next(c for c in ada.cookies.jar if c.name == "sb_console")
    assert session_cookie.has_nonstandard_attr("HttpOnly")
    queue = ada.get("/console/queue")
    assert queue.status_code == 200 and queue.headers["cache-control"] == "no-store"


def test_queue_is_ordered_by_urgency_then_due_time_with_overdue_marked(world: World) -> None:
    ada = _login(world.base, "ada")
    html = ada.get("/console/queue").text
    order = re.findall(r'data-task="([0-9a-f-]+)"', html)
    urgent, soon, routine = world.cases[1], world.cases[2], world.cases[0]
    assert order == [str(urgent.task_id), str(soon.task_id), str(routine.task_id)]
    row = html[html.index(f'data-task="{urgent.task_id}"') - 40:]
    assert 'class="overdue"' in row[:80]
    assert "1 overdue" in html
    only_routine = ada.get("/console/queue", params={"reason": "patient_requested"}).text
    assert re.findall(r'data-task="([0-9a-f-]+)"', only_routine) == [str(routine.task_id)]
    long_waits = ada.get("/console/queue", params={"waited": "24h"}).text
    assert re.findall(r'data-task="([0-9a-f-]+)"', long_waits) == [str(urgent.task_id)]


def test_post_without_csrf_token_is_refused(world: World) -> None:
    ada = _login(world.base, "ada")
    task_id = world.cases[1].task_id
    r = ada.post(f"/console/tasks/{task_id}/claim", data={})
    assert r.status_code == 403
    r = ada.post(f"/console/tasks/{task_id}/claim", data={"csrf_token": "forged"})
    assert r.status_code == 403
    # a login POST without the login form's token is refused too
    fresh = httpx.Client(base_url=world.base)
    assert fresh.post("/console/login", data={"username": "ada", "password": PASSWORD}).status_code == 403
    with world.clinic.session() as s:  # nothing was claimed
        assert s.get(ReviewTask, task_id).claimed_by is None


def test_second_dermatologist_cannot_claim_a_claimed_case(world: World) -> None:
    ada, bob = _login(world.base, "ada"), _login(world.base, "bob")
    task_id = world.cases[1].task_id
    ada_token = _csrf(ada.get("/console/queue").text)
    bob_token = _csrf(bob.get("/console/queue").text)
    r = ada.post(f"/console/tasks/{task_id}/claim", data={"csrf_token": ada_token})
    assert r.status_code == 303 and r.headers["location"] == f"/console/tasks/{task_id}"
    r = bob.post(f"/console/tasks/{task_id}/claim", data={"csrf_token": bob_token})
    assert r.status_code == 409
    assert "Dr. Ada Weber is already reviewing this case" in r.text
    # and bob cannot sign it either
    r = bob.post(f"/console/tasks/{task_id}/decision", data={"csrf_token": bob_token, "decision": "accept",
                                                             "recommendation": "see_gp"})
    assert r.status_code == 409
    with world.clinic.session() as s:
        assert s.get(Case, world.cases[1].case_id).status == "in_review"


def test_lockout_after_five_bad_passwords(world: World) -> None:
    client = httpx.Client(base_url=world.base)
    token = _csrf(client.get("/console/login").text)
    for _ in range(4):
        r = client.post("/console/login", data={"username": "bob", "password": "guess", "csrf_token": token})
        assert r.status_code == 401 and "Wrong username or password" in r.text
    r = client.post("/console/login", data={"username": "bob", "password": "guess", "csrf_token": token})
    assert r.status_code == 423 and "locked" in r.text
    r = client.post("/console/login", data={"username": "bob", "password": PASSWORD, "csrf_token": token})
    assert r.status_code == 423  # the right password does not help while locked
    assert "sb_console" not in client.cookies


def test_photos_are_decrypted_per_request_never_cached_and_audited(world: World) -> None:
    ada = _login(world.base, "ada")
    rc = world.cases[1]
    r = ada.get(f"/console/images/{rc.image_id}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.headers["cache-control"] == "no-store"
    assert r.content == demo.lesion_photo(20).data  # the decrypted original
    with world.clinic.session() as s:
        reads = s.scalars(select(AuditEvent).where(AuditEvent.action == "image.read",
                                                   AuditEvent.entity_id == str(rc.image_id))).all()
        assert len(reads) == 1 and reads[0].actor_type == "clinician"
    sal = ada.get(f"/console/saliency/{rc.ai_id}")
    assert sal.status_code == 200 and sal.content.startswith(b"\x89PNG") and sal.headers["cache-control"] == "no-store"


def test_case_view_is_audited_and_shows_the_ai_assessment(world: World) -> None:
    ada = _login(world.base, "ada")
    rc = world.cases[1]
    html = ada.get(f"/console/tasks/{rc.task_id}").text
    assert "preliminary" in html and "62%" in html and "31%" in html
    assert "skinbridge-classifier" in html and "version 1.0.0" in html
    assert "Asymmetric pigmented lesion" in html
    assert f"/console/saliency/{rc.ai_id}" in html
    assert html.count("/console/explanations/") == 2
    with world.clinic.session() as s:
        views = s.scalars(select(AuditEvent).where(AuditEvent.action == "case.view")).all()
        assert [(v.entity_id, v.purpose, v.actor_type) for v in views] == [(str(rc.case_id), "treatment", "clinician")]


def test_a_shipped_classifier_result_shows_the_known_limits_of_exactly_those_weights(world: World) -> None:
    from inference.engines.limits import classifier_limits

    limits = classifier_limits(None)
    assert limits is not None and len(limits["lines"]) >= 3  # written from the shipped card's numbers
    shipped, other = world.cases[1], world.cases[0]
    with world.clinic.session() as s:
        s.get(AIResult, shipped.ai_id).weights_sha256 = limits["weights_sha256"]
        s.commit()
    ada = _login(world.base, "ada")
    html = ada.get(f"/console/tasks/{shipped.task_id}").text
    assert "Known limits of this classifier" in html
    assert all(line in html for line in limits["lines"])
    assert "light skin" in html and "does not rule cancer out" in html
    # a result of other weights (a clinic's own model, an older version) gets no numbers that are not its own
    assert "Known limits" not in ada.get(f"/console/tasks/{other.task_id}").text


def test_roles_are_enforced(world: World) -> None:
    ops = _login(world.base, "ops")
    assert ops.get("/console/queue").status_code == 403
    assert ops.get(f"/console/images/{world.cases[0].image_id}").status_code == 403
    assert ops.get("/console/admin").status_code == 200
    ada = _login(world.base, "ada")
    assert ada.get("/console/admin").status_code == 403


def test_claim_amend_sign_over_http(world: World) -> None:
    ada = _login(world.base, "ada")
    rc = world.cases[2]
    token = _csrf(ada.get("/console/queue").text)
    assert ada.post(f"/console/tasks/{rc.task_id}/claim", data={"csrf_token": token}).status_code == 303
    form = {"csrf_token": token, "decision": "amend", "condition_code": "actinic_keratosis", "urgency": "soon",
            "recommendation": "dermatologist_within_days", "days": "21", "note": "Not urgent, but have it looked at."}
    # "soon" (3 days) with "within 21 days" would tell the patient two timeframes: refused, form kept
    r = ada.post(f"/console/tasks/{rc.task_id}/decision", data=form)
    assert r.status_code == 400 and "contradicts urgency soon" in r.text and "Not urgent, but have" in r.text
    r = ada.post(f"/console/tasks/{rc.task_id}/decision", data=form | {"urgency": "routine"})
    assert r.status_code == 303 and r.headers["location"] == "/console/queue?done=signed"
    with world.clinic.session() as s:
        case = s.get(Case, rc.case_id)
        task = s.get(ReviewTask, rc.task_id)
        assert (case.status, case.condition_code) == ("final", "actinic_keratosis")  # first signature: final
        assert task.recommendation == "dermatologist_within_days:21"
        assert s.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.kind == "final")) == 1
    # signing again is refused: the task is decided
    again = ada.post(f"/console/tasks/{rc.task_id}/decision", data={"csrf_token": token, "decision": "accept",
                                                                    "recommendation": "see_gp"})
    assert again.status_code == 409


def test_logout_ends_the_session_server_side(world: World) -> None:
    ada = _login(world.base, "ada")
    token = _csrf(ada.get("/console/queue").text)
    stolen = dict(ada.cookies)
    assert ada.post("/console/logout", data={"csrf_token": token}).status_code == 303
    replay = httpx.Client(base_url=world.base, cookies=stolen)
    assert replay.get("/console/queue", follow_redirects=False).status_code == 303


def _visible_text(html: str) -> str:
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S | re.I)
    return re.sub(r"<[^>]+>", " ", html)


def test_the_case_page_shows_words_never_stored_codes(world: World) -> None:
    """Issue 22: the AI's flags read "suspect:melanoma" and "vlm error:RuntimeError", statuses "in_review"."""
    rc = world.cases[1]
    with world.clinic.session() as s:
        s.get(AIResult, rc.ai_id).flags = ["suspect:melanoma", "vlm_error", "vlm_error:RuntimeError", "vlm_repaired"]
        s.commit()
    ada = _login(world.base, "ada")
    text = _visible_text(ada.get(f"/console/tasks/{rc.task_id}").text)
    assert "AI rates Melanoma above its validated threshold" in text
    assert "vision-language model failed (classifier result used) (RuntimeError)" in text
    assert not re.findall(r"\b[a-z]+_[a-z_]+\b|\b[a-z]+:[A-Za-z]", text), re.findall(r".{30}\b[a-z]+_[a-z_]+\b.{10}", text)
    queue = _visible_text(ada.get("/console/queue").text)
    assert not re.findall(r"\b[a-z]+_[a-z_]+\b", queue)
