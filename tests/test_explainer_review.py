"""The dermatologist's sign-off of explanation pictures: stored and audited in the clinic database,
bound to the explainer's weights and settings, and given in the console over real HTTP."""

from __future__ import annotations

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

from clinic_db import clinicians, explainer_review
from clinic_db.models import AuditEvent, Clinician, ExplainerReview
from console.app import build_router
from inference.engines.base import read_ai_marker
from inference.engines.clinical_review import ReviewSubject, generator_subject
from skinbridge.settings import reset_settings_cache
from tests.e2e_support import console_login, csrf_token
from tests.support import serve_app
from tests.tiny_models import build_tiny_generator

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
    reset_settings_cache()
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


def test_dermatologist_signs_off_pictures_in_the_console(console: Console, clinic) -> None:  # type: ignore[no-untyped-def]
    # as measured by evaluate-generator: acne just below the bar
    (console.generator / "metrics.json").write_text(json.dumps({"recognition": {
        "overall": 0.85, "per_class": {"melanoma": 0.9, "nevus": 0.85, "acne": 0.797}}}))
    anon = httpx.Client(base_url=console.base)
    assert anon.get("/console/explainer", follow_redirects=False).status_code == 303
    assert anon.get("/console/explainer/pictures/melanoma/0", follow_redirects=False).status_code == 303
    assert console_login(console.base, "ops", PASSWORD).get("/console/explainer").status_code == 403

    ada = console_login(console.base, "ada", PASSWORD)
    page = ada.get("/console/explainer")
    assert page.status_code == 200
    assert "No sign-off covers these weights and settings yet: patients get no pictures." in page.text
    subject = generator_subject(console.generator)
    assert subject.weights_sha256[:16] in page.text and "tiny-generator@test" in page.text
    for code in CODES:  # every condition with its samples, drawn as patients would get them
        assert page.text.count(f'src="/console/explainer/pictures/{code}/') == 4
    # the measured recognition, precise enough not to read "80 %, below the 80 % bar"
    assert re.search(r"79\.7%<br><small>below the 80% bar: never sent", page.text)
    assert "90.0%" in page.text and page.text.count("below the 80% bar") == 1
    picture = ada.get("/console/explainer/pictures/nevus/3")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
    assert read_ai_marker(picture.content)["caption"].startswith("AI-generated example of")
    assert Image.open(io.BytesIO(picture.content)).size[0] == 256
    assert ada.get("/console/explainer/pictures/psoriasis/0").status_code == 404
    assert ada.get("/console/explainer/pictures/nevus/4").status_code == 404

    # a rejection needs a reason; nothing is recorded and the choices are kept
    r = ada.post("/console/explainer/review", data=_decisions(page.text, **{
        "decision-melanoma": "approve", "decision-acne": "reject", "reason-acne": " "}))
    assert r.status_code == 400 and "say why the pictures are not fit to show: Acne" in r.text
    assert 'name="decision-melanoma" value="approve" checked' in r.text
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
