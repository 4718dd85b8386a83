"""The dermatologist's sign-off of explanation pictures: stored and audited in the clinic database,
bound to the explainer's weights and settings, and given in the console over real HTTP."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import select

from clinic_db import cases, clinicians, explainer_review, patients
from clinic_db.audit import Actor
from clinic_db.models import AuditEvent, Case, Clinician, ExplainerReview
from clinic_db.states import CaseStatus
from console.app import build_router
from inference.engines.base import read_ai_marker
from inference.engines.clinical_review import ReviewSubject, generator_subject
from inference.explainer_tasks import draw_review_pictures
from skinbridge.celery_app import app as celery, configure
from skinbridge.settings import get_settings, reset_settings_cache
from tests.e2e_support import console_login, csrf_token
from tests.support import serve_app
from tests.tiny_models import build_tiny_classifier, build_tiny_generator

CODES = ["melanoma", "nevus", "acne"]
PASSWORD = "correct horse battery"
SUBJECT = ReviewSubject(tuple(CODES), "a" * 64, {"guidance_scale": 3.0, "num_inference_steps": 20})


def _account(clinic, username: str, role: str = "dermatologist") -> Clinician:  # type: ignore[no-untyped-def]
    with clinic.session() as s:
        clinicians.create(clinic, s, username, display_name=f"Dr. {username.title()}", role=role, password=PASSWORD)
        s.commit()
    with clinic.session() as s:
        return s.scalars(select(Clinician).where(Clinician.username == username)).one()


def test_a_review_is_in_force_only_for_the_weights_and_settings_it_saw(clinic) -> None:  # type: ignore[no-untyped-def]
    ada = _account(clinic, "ada")
    with clinic.session() as s:
        assert explainer_review.approved_codes(s, SUBJECT) == set()  # nobody looked yet: no pictures
        reviewer = s.get(Clinician, ada.id)
        explainer_review.record(s, reviewer, SUBJECT, explainer_id="gen@1", approve=["melanoma"],
                                reject={"acne": "looks like a burn"})
        s.commit()
    with clinic.session() as s:
        assert explainer_review.approved_codes(s, SUBJECT) == {"melanoma"}
        review = explainer_review.in_force(s, SUBJECT)
        assert review.reviewer.display_name == "Dr. Ada" and review.rejected == {"acne": "looks like a burn"}
        # other weights, or the same weights drawn with other settings, are not covered
        assert explainer_review.approved_codes(s, dataclasses.replace(SUBJECT, weights_sha256="b" * 64)) == set()
        retuned = dataclasses.replace(SUBJECT, settings={**SUBJECT.settings, "guidance_scale": 7.5})
        assert explainer_review.approved_codes(s, retuned) == set()
        # the newest review of the same pictures is in force; the older one stays on record
        explainer_review.record(s, s.get(Clinician, ada.id), SUBJECT, explainer_id="gen@1", approve=["nevus"],
                                reject={})
        s.commit()
        assert explainer_review.approved_codes(s, SUBJECT) == {"nevus"}
        assert len(explainer_review.history(s)) == 2
        events = s.scalars(select(AuditEvent).where(AuditEvent.action == "explainer.review")).all()
        assert [(e.actor_id, e.detail["approved"]) for e in events] == [(str(ada.id), ["melanoma"]),
                                                                         (str(ada.id), ["nevus"])]
        # reviews are append-only: the record of who approved what cannot be rewritten
        first = s.scalars(select(ExplainerReview).order_by(ExplainerReview.created_at)).first()
        first.approved = ["melanoma", "nevus", "acne"]
        with pytest.raises(PermissionError, match="append-only"):
            s.flush()


def test_a_sign_off_must_come_from_a_dermatologist_and_name_known_conditions(clinic) -> None:  # type: ignore[no-untyped-def]
    ada, ops = _account(clinic, "ada"), _account(clinic, "ops", role="admin")
    with clinic.session() as s:
        derm, admin = s.get(Clinician, ada.id), s.get(Clinician, ops.id)
        cases = [
            (admin, ["melanoma"], {}, "only an active dermatologist"),
            (derm, ["psoriasis"], {}, "does not draw psoriasis; it draws melanoma, nevus, acne"),
            (derm, ["acne"], {"acne": "no"}, "both approved and rejected: acne"),
            (derm, [], {}, "at least one condition"),
            (derm, ["melanoma"], {"acne": " ", "nevus": "blurry"}, "say why .* not fit to show: acne$"),
        ]
        for who, approve, reject, message in cases:
            with pytest.raises(explainer_review.ReviewError, match=message):
                explainer_review.record(s, who, SUBJECT, explainer_id="gen@1", approve=approve, reject=reject)
        derm.active = False
        with pytest.raises(explainer_review.ReviewError, match="only an active dermatologist"):
            explainer_review.record(s, derm, SUBJECT, explainer_id="gen@1", approve=["melanoma"], reject={})
        s.rollback()
        assert explainer_review.history(s) == []  # a refused sign-off records nothing


# --- the console ------------------------------------------------------------------------------------
@dataclass
class Console:
    base: str
    generator: Path


@pytest.fixture
def console(clinic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Console]:  # type: ignore[no-untyped-def]
    generator = build_tiny_generator(tmp_path / "generator", CODES)
    monkeypatch.setenv("SKINBRIDGE_GENERATOR_PATH", str(generator))
    monkeypatch.setenv("SKINBRIDGE_CLASSIFIER_PATH", str(build_tiny_classifier(tmp_path / "classifier", CODES)))
    reset_settings_cache()
    configure(celery, get_settings())  # this test's var dir: the filesystem broker the page asks workers through
    _account(clinic, "ada")
    _account(clinic, "ops", role="admin")
    app = FastAPI()
    app.include_router(build_router(), prefix="/console")
    with serve_app(app) as base:
        yield Console(base, generator)
    reset_settings_cache()


def _decisions(page: str, **fields: str) -> dict[str, str]:
    return {"csrf_token": csrf_token(page), "subject": re.search(r'name="subject" value="([^"]+)"', page).group(1),
            **fields}


def _queued_draw_requests() -> list[str]:
    """The digests the page asked gpu workers to draw (messages waiting in the filesystem broker)."""
    out = get_settings().broker_folder / "out"
    bodies = [json.loads(base64.b64decode(json.loads(f.read_text())["body"])) for f in sorted(out.glob("*.msg"))]
    return [b[0][0] for b in bodies]


def _draw_all(digest: str) -> list[str]:
    """What gpu workers do with the request: one condition per task until none is left."""
    drawn = []
    while (code := draw_review_pictures.run(digest)) is not None:
        drawn.append(code)
    return drawn


def test_dermatologist_signs_off_pictures_drawn_by_a_worker(console: Console, clinic) -> None:  # type: ignore[no-untyped-def]
    # as measured by evaluate-generator: acne just below the bar
    (console.generator / "metrics.json").write_text(json.dumps({"recognition": {
        "overall": 0.85, "per_class": {"melanoma": 0.9, "nevus": 0.85, "acne": 0.797}}}))
    anon = httpx.Client(base_url=console.base)
    assert anon.get("/console/explainer", follow_redirects=False).status_code == 303
    assert console_login(console.base, "ops", PASSWORD).get("/console/explainer").status_code == 403

    ada = console_login(console.base, "ada", PASSWORD)
    page = ada.get("/console/explainer")
    assert page.status_code == 200
    assert "No sign-off covers these weights and settings yet: patients get no pictures." in page.text
    subject = generator_subject(console.generator)
    digest = explainer_review.subject_digest(subject)
    assert subject.weights_sha256[:16] in page.text and "tiny-generator@test" in page.text
    # the page answered before anything was drawn: a slot per picture, and a worker was asked, once
    assert "Drawing the sample pictures: <span id=\"drawn-count\">0</span> of 12" in page.text
    for code in CODES:
        assert page.text.count(f'data-src="/console/explainer/pictures/{digest}/{code}/') == 4
    assert anon.get(f"/console/explainer/pictures/{digest}/melanoma/0", follow_redirects=False).status_code == 303
    assert ada.get(f"/console/explainer/pictures/{digest}/melanoma/0").status_code == 404  # not drawn yet
    assert ada.get("/console/explainer").status_code == 200
    assert _queued_draw_requests() == [digest]  # a second load did not ask again
    # the measured recognition, precise enough not to read "80 %, below the 80 % bar"
    assert re.search(r"79\.7%<br><small>below the 80% bar: never sent", page.text)
    assert "90.0%" in page.text and page.text.count("below the 80% bar") == 1

    # a worker draws one condition per task, in order; the progress poll and the page follow
    assert draw_review_pictures.run(digest) == "melanoma"
    progress = ada.get(f"/console/explainer/progress/{digest}").json()
    assert progress == {"counts": {"melanoma": 4}, "drawn": 4, "total": 12, "done": False, "problem": None}
    assert ada.get("/console/explainer").text.count(f'<img src="/console/explainer/pictures/{digest}/melanoma/') == 4
    assert _draw_all(digest) == ["nevus", "acne"]
    assert ada.get(f"/console/explainer/progress/{digest}").json()["done"] is True
    assert ada.get("/console/explainer/progress/" + "0" * 32).status_code == 409
    picture = ada.get(f"/console/explainer/pictures/{digest}/nevus/3")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert read_ai_marker(picture.content)["caption"].startswith("AI-generated example of")
    assert Image.open(io.BytesIO(picture.content)).size[0] == 256
    assert ada.get(f"/console/explainer/pictures/{digest}/psoriasis/0").status_code == 404
    assert ada.get(f"/console/explainer/pictures/{digest}/nevus/4").status_code == 404
    page = ada.get("/console/explainer")
    assert "All 12 sample pictures are drawn." in page.text and "data-src=" not in page.text

    # a rejection needs a reason; nothing is recorded and the choices are kept
    r = ada.post("/console/explainer/review", data=_decisions(page.text, **{
        "decision-melanoma": "approve", "decision-acne": "reject", "reason-acne": " "}))
    assert r.status_code == 400 and "Say why the pictures are not fit to show: Acne." in r.text
    assert 'name="decision-melanoma" value="approve" checked' in r.text
    # below the bar: cannot be approved, so "approved" never stands beside "never sent"
    assert 'name="decision-acne" value="approve" disabled' in page.text
    r = ada.post("/console/explainer/review", data=_decisions(page.text, **{
        "decision-melanoma": "approve", "decision-acne": "approve"}))
    assert r.status_code == 400 and "Acne: the classifier recognised too few of these pictures (below the 80% bar)" \
        in r.text
    # no CSRF token: refused
    assert ada.post("/console/explainer/review", data={"decision-melanoma": "approve"}).status_code == 403
    with clinic.session() as s:
        assert explainer_review.history(s) == []

    r = ada.post("/console/explainer/review", data=_decisions(page.text, **{
        "decision-melanoma": "approve", "decision-acne": "reject", "reason-acne": "looks like a burn"}))
    assert r.status_code == 303 and r.headers["location"] == "/console/explainer?done=signed"
    with clinic.session() as s:
        assert explainer_review.approved_codes(s, subject) == {"melanoma"}
        review = explainer_review.in_force(s, subject)
        assert review.reviewer.username == "ada" and review.explainer_id == "tiny-generator@test"
        assert review.rejected == {"acne": "looks like a burn"}
    after = ada.get("/console/explainer?done=signed").text
    assert "Sign-off recorded" in after and "In force: sign-off by Dr. Ada" in after
    assert 'data-state="approved">approved' in after and "rejected: looks like a burn" in after

    # the form starts from the decisions in force: signing again, adding nevus, keeps melanoma and acne
    assert 'name="decision-melanoma" value="approve" checked' in after
    assert 'name="decision-acne" value="reject" checked' in after and 'value="looks like a burn"' in after
    assert 'name="decision-nevus" value="" checked' in after
    form = dict(re.findall(r'<input type="radio" name="(decision-[a-z_]+)" value="([a-z]*)" checked', after))
    form |= dict(re.findall(r'name="(reason-[a-z_]+)" maxlength="500" value="([^"]*)"', after))
    r = ada.post("/console/explainer/review", data=_decisions(after, **(form | {"decision-nevus": "approve"})))
    assert r.status_code == 303
    with clinic.session() as s:
        assert explainer_review.approved_codes(s, subject) == {"melanoma", "nevus"}
        assert explainer_review.in_force(s, subject).rejected == {"acne": "looks like a burn"}


def test_drawing_steps_aside_while_a_patients_case_is_in_the_pipeline(console: Console, clinic) -> None:  # type: ignore[no-untyped-def]
    digest = explainer_review.subject_digest(generator_subject(console.generator))
    with clinic.session() as s:
        patient = patients.register(clinic, s, 4242, consent_version="test")
        case = cases.open_case(clinic, s, patient)
        cases.transition(s, case, CaseStatus.queued, Actor.system("test"))
        s.commit()
    assert draw_review_pictures.run(digest) is None  # the case goes first
    with clinic.session() as s:
        assert explainer_review.drawn_counts(s, digest) == {}
        assert "progress_at" in explainer_review.drawing_state(s, digest)  # not taken for a lost request
        cases.transition(s, s.get(Case, case.id), CaseStatus.analysing, Actor.system("test"))
        s.commit()
    assert draw_review_pictures.run(digest) is None
    with clinic.session() as s:
        cases.transition(s, s.get(Case, case.id), CaseStatus.preliminary, Actor.system("test"))
        s.commit()
    assert draw_review_pictures.run(digest) == "melanoma"  # the case is through: drawing goes on


def test_a_worker_serving_another_generator_says_so_on_the_page(  # type: ignore[no-untyped-def]
        console: Console, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ada = console_login(console.base, "ada", PASSWORD)
    digest = explainer_review.subject_digest(generator_subject(console.generator))
    assert ada.get("/console/explainer").status_code == 200
    # the worker was deployed with other weights than the web app
    monkeypatch.setenv("SKINBRIDGE_GENERATOR_PATH", str(build_tiny_generator(tmp_path / "other", CODES, seed=1)))
    reset_settings_cache()
    assert draw_review_pictures.run(digest) is None
    monkeypatch.setenv("SKINBRIDGE_GENERATOR_PATH", str(console.generator))
    reset_settings_cache()
    problem = ada.get(f"/console/explainer/progress/{digest}").json()["problem"]
    assert problem.startswith("the gpu worker serves tiny-generator@test with other weights or settings")
    assert "SKINBRIDGE_GENERATOR_PATH" in ada.get("/console/explainer").text
    # once a worker with the right generator draws, the problem is over
    assert draw_review_pictures.run(digest) == "melanoma"
    assert ada.get(f"/console/explainer/progress/{digest}").json()["problem"] is None


def test_a_sign_off_is_refused_when_the_generator_changed_since_the_page_was_read(  # type: ignore[no-untyped-def]
        console: Console, clinic, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ada = console_login(console.base, "ada", PASSWORD)
    page = ada.get("/console/explainer").text
    # the deployment now serves other weights (a retrained generator)
    retrained = build_tiny_generator(tmp_path / "retrained", CODES, seed=1)
    monkeypatch.setenv("SKINBRIDGE_GENERATOR_PATH", str(retrained))
    reset_settings_cache()
    r = ada.post("/console/explainer/review", data=_decisions(page, **{"decision-melanoma": "approve"}))
    assert r.status_code == 409 and "Look at its pictures again before signing off." in r.text
    with clinic.session() as s:
        assert explainer_review.history(s) == []
