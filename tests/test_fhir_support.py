"""Builders shared by the FHIR tests: real cases made through clinic_db, real SMART clients and keys.

(Named test_fhir_* to stay inside the FHIR test files; it holds no tests itself.)
"""

from __future__ import annotations

import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from PIL import Image as PILImage

from clinic_db import cases, patients, review
from clinic_db.audit import Actor
from clinic_db.cases import CleanImage
from clinic_db.db import Clinic
from clinic_db.models import Case, Clinician, ReviewTask, utcnow

BOT = Actor.system("test")
DEFAULT_DIFFERENTIAL = [
    {"code": "melanoma", "probability": 0.71},
    {"code": "nevus", "probability": 0.2},
    {"code": "basal_cell_carcinoma", "probability": 0.09},
]


def png(color: tuple[int, int, int] = (180, 120, 100), size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_case(
    clinic: Clinic,
    session,  # type: ignore[no-untyped-def]
    telegram_id: int,
    *,
    name: str | None = None,
    differential: list[dict[str, Any]] | None = None,
    photos: int = 1,
    publish: bool = True,
) -> Case:
    """A case that went through the AI pipeline: photo, history, AI result, explanation image."""
    from fhir.publish import publish_case

    patient = patients.register(clinic, session, telegram_id, consent_version="v1", name=name)
    case = cases.open_case(clinic, session, patient)
    cases.set_history(clinic, session, case, body_site="left forearm", duration="months")
    for i in range(photos):
        data = png((100 + 20 * i, 90, 80))
        cases.add_image(clinic, session, case, CleanImage(data=data, mime="image/png", width=48, height=40))
    cases.transition(session, case, "queued", BOT)
    cases.transition(session, case, "analysing", BOT)
    cases.add_ai_result(clinic, session, case, engine="classifier", model_id="skinbridge/derm-cnn",
                        model_version="1.2.0", weights_sha256="ab" * 32,
                        differential=differential or DEFAULT_DIFFERENTIAL, description="asymmetric pigmented lesion")
    cases.add_explanation_image(clinic, session, case, condition_code="melanoma", png=png((60, 40, 30)),
                                model_id="skinbridge/explainer", seed=7)
    cases.transition(session, case, "preliminary", BOT)
    if publish:
        publish_case(clinic, session, case.id)
    session.commit()
    return case


def make_clinician(session, username: str = "dr.weiss", display: str = "Dr. Anna Weiss") -> Clinician:  # type: ignore[no-untyped-def]
    doc = Clinician(username=username, display_name=display, password_hash="x")
    doc.ensure_id()
    session.add(doc)
    session.flush()
    return doc


def sign(
    clinic: Clinic,
    session,  # type: ignore[no-untyped-def]
    case: Case,
    clinician: Clinician,
    *,
    decision: str = "accept",
    condition_code: str | None = None,
    note: str | None = None,
) -> ReviewTask:
    """What the console does when a dermatologist signs (or amends) a case, then re-publish."""
    from fhir.publish import publish_case

    task = review.open_task(session, case, urgency="soon", reasons=["malignancy_suspected"])
    task.status, task.decision, task.decision_condition_code = "decided", decision, condition_code
    task.decided_by, task.decided_at = clinician.id, utcnow()
    clinic.vault.set_text(session, task, "note", note, owner=case.patient_id)
    doctor = Actor("clinician", str(clinician.id))
    if case.status == "preliminary":
        cases.transition(session, case, "in_review", doctor)
    cases.transition(session, case, "final" if case.status == "in_review" else "amended", doctor)
    publish_case(clinic, session, case.id)
    session.commit()
    return task


# --- SMART client keys ------------------------------------------------------------------------
@dataclass
class ClientKey:
    kid: str
    alg: str
    private: Any
    public_jwk: dict[str, Any]

    def assertion(self, client_id: str, aud: str, **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": now + 240, "iat": now,
                  "jti": uuid.uuid4().hex}
        claims.update(overrides)
        headers = {"kid": overrides.pop("_kid", self.kid), "typ": "JWT"}
        claims.pop("_kid", None)
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=headers)


def rsa_key(kid: str = "rsa-1") -> ClientKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid=kid, alg="RS384", use="sig")
    return ClientKey(kid, "RS384", private, jwk)


def ec_key(kid: str = "ec-1") -> ClientKey:
    private = ec.generate_private_key(ec.SECP384R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid=kid, alg="ES384", use="sig")
    return ClientKey(kid, "ES384", private, jwk)


# --- a real FHIR server with a registered client ----------------------------------------------
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Ehr:
    """A running API (real uvicorn) plus one registered SMART client."""

    base: str  # http://127.0.0.1:port
    client_id: str
    key: ClientKey

    @property
    def fhir(self) -> str:
        return self.base + "/fhir"

    @property
    def token_url(self) -> str:
        return self.base + "/auth/token"

    def token_response(self, assertion: str | None = None, scope: str = "system/*.rs", **form: str):  # type: ignore[no-untyped-def]
        import httpx

        data = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion or self.key.assertion(self.client_id, self.token_url), "scope": scope}
        data.update(form)
        return httpx.post(self.token_url, data=data, timeout=30)

    def token(self, scope: str = "system/*.rs") -> str:
        resp = self.token_response(scope=scope)
        assert resp.status_code == 200, resp.text
        return resp.json()["access_token"]

    def headers(self, scope: str = "system/*.rs") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(scope)}", "Accept": "application/fhir+json"}


def serve_ehr(clinic: Clinic, scopes: list[str] | None = None, key: ClientKey | None = None):  # type: ignore[no-untyped-def]
    """Context manager: FastAPI() + fhir.api router on a real server, one client registered."""
    import contextlib

    from fastapi import FastAPI

    from fhir.api import build_router, install_error_handlers
    from fhir.smart import register_client
    from tests.support import serve_app

    key = key or rsa_key()
    client_id = register_client(clinic, "Test EHR", {"keys": [key.public_jwk]}, scopes or ["system/*.rs"])
    app = FastAPI()
    app.include_router(build_router())
    install_error_handlers(app)

    @contextlib.contextmanager
    def running():  # type: ignore[no-untyped-def]
        with serve_app(app) as base:
            yield Ehr(base, client_id, key)

    return running()


def use_test_broker():  # type: ignore[no-untyped-def]
    """Point the Celery app at this test's settings (the filesystem broker under its var dir)."""
    from skinbridge.celery_app import app, configure
    from skinbridge.settings import get_settings

    return configure(app, get_settings())


def export_worker():  # type: ignore[no-untyped-def]
    """Context manager: a real Celery worker (solo pool, in a thread) on the test's broker, cpu queue,
    so $export jobs run as they do in production (the fhir.export task)."""
    from celery.contrib.testing.worker import start_worker

    app = use_test_broker()
    return start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, queues=["cpu"],
                        loglevel="WARNING", shutdown_timeout=15)
