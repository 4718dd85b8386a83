"""Celery tasks of the FHIR API: work that must not run inside an API process (``cpu`` queue)."""

from __future__ import annotations

import uuid

from clinic_db.db import get_clinic
from skinbridge.celery_app import app


@app.task(name="fhir.export", acks_late=True)  # queued on "cpu" by the kick-off
def export(job_id: str) -> None:
    """Run one Bulk Data export job recorded by the $export kick-off (fhir.bulk.run_export)."""
    from fhir.bulk import run_export

    run_export(get_clinic(), uuid.UUID(job_id))
