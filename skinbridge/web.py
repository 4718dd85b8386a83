"""The one web application: FHIR API for EHRs (with SMART auth) and the dermatologists' console."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from skinbridge.settings import get_settings


def create_app() -> FastAPI:
    settings = get_settings()
    settings.check_safe()
    app = FastAPI(title="SkinBridge", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        from sqlalchemy import text

        from clinic_db.db import get_clinic

        with get_clinic().engine.connect() as conn:
            conn.execute(text("select 1"))
        return {"status": "ok"}

    from console.app import build_router as console_router
    from fhir.api import build_router as fhir_router

    app.include_router(fhir_router())
    app.include_router(console_router(), prefix="/console")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/console/")

    return app
