"""`skinbridge check`: what an operator (and the entry-point tests) need to know works."""

from __future__ import annotations

from skinbridge.settings import Settings


def run_checks(settings: Settings) -> list[str]:
    problems: list[str] = []
    try:
        import fhir.resources.R4B.diagnosticreport  # noqa: F401 - the library half of `fhir`
        import fhir.mapping  # noqa: F401 - the project's half of `fhir`
    except ImportError as exc:
        problems.append(f"the `fhir` namespace is broken ({exc}); see fhir/__init__.py")
    try:
        from clinic_db.db import get_clinic

        clinic = get_clinic()
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        from clinic_db.migrate import alembic_config

        head = ScriptDirectory.from_config(alembic_config(settings.resolved_database_url)).get_current_head()
        with clinic.engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
        if current != head:
            problems.append(f"database at revision {current}, code expects {head}: run `skinbridge db upgrade`")
    except Exception as exc:  # noqa: BLE001 - report, don't crash the checker
        problems.append(f"database or keys: {type(exc).__name__}: {exc}")
    return problems


def record_worker_check() -> list[str]:
    """Run the checks inside a worker process and keep the outcome in the database (KeyValue)."""
    import os
    import socket

    from clinic_db.db import get_clinic
    from clinic_db.models import KeyValue
    from skinbridge.settings import get_settings

    problems = run_checks(get_settings())
    with get_clinic().session() as session:
        key = f"{socket.gethostname()}:{os.getpid()}"
        session.merge(KeyValue(namespace="selfcheck", key=key, value={"problems": problems}))
        session.commit()
    return problems
