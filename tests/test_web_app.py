"""The assembled web app serves the FHIR API, SMART discovery and the console from one process."""

from __future__ import annotations

import httpx

from skinbridge.web import create_app
from tests.support import serve_app


def test_one_app_serves_everything(clinic):
    with serve_app(create_app()) as base:
        assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
        meta = httpx.get(f"{base}/fhir/metadata")
        assert meta.status_code == 200 and meta.json()["fhirVersion"] == "4.0.1"
        smart = httpx.get(f"{base}/.well-known/smart-configuration").json()
        assert smart["token_endpoint"].endswith("/auth/token")
        login = httpx.get(f"{base}/console/login")
        assert login.status_code == 200 and "password" in login.text.lower()
        # patient data needs authentication everywhere
        assert httpx.get(f"{base}/fhir/DiagnosticReport").status_code == 401
        queue = httpx.get(f"{base}/console/", follow_redirects=False)
        assert queue.status_code in (302, 303, 307) and "login" in queue.headers["location"]
