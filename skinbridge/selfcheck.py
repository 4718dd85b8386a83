"""`skinbridge check`: what an operator (and the entry-point tests) need to know works."""

from __future__ import annotations

from pathlib import Path

from skinbridge.settings import ENV_FILE_VARIABLE, Settings, settings_file

UPGRADE = "run `skinbridge db upgrade`"


def where(settings: Settings) -> list[str]:
    """Where this configuration keeps its data, for `skinbridge check` and `skinbridge up`."""
    keys = "SKINBRIDGE_MASTER_KEY (inline)" if settings.master_key is not None else str(settings.resolved_key_dir)
    found = settings_file()
    lines = [f"data folder: {settings.resolved_var_dir}", f"database:    {_safe_url(settings.resolved_database_url)}",
             f"keys:        {keys}",
             f"settings:    environment and {found}" if found else
             f"settings:    environment only (no {settings.resolved_var_dir / '.env'}, {ENV_FILE_VARIABLE} unset)"]
    for note in (legacy_var_note(settings), ignored_env_note(found)):
        if note:
            lines.append(f"note: {note}")
    return lines


def ignored_env_note(used: Path | None, cwd: Path | None = None) -> str | None:
    """Older versions read ./.env of the folder they ran from; say so when one is here and not the one read."""
    here = (cwd or Path.cwd()) / ".env"
    if not here.is_file() or (used is not None and here.resolve() == used):
        return None
    return (f"{here} is not read (settings do not depend on the folder a command runs from): move it to the data "
            f"folder or set {ENV_FILE_VARIABLE}={here.resolve()}.")


def legacy_var_note(settings: Settings, cwd: Path | None = None) -> str | None:
    """Older versions kept the data in ./var of the folder they ran from; say so when one is here."""
    old = (cwd or Path.cwd()) / "var"
    if not (old / "skinbridge.db").is_file() or old.resolve() == settings.resolved_var_dir:
        return None
    return (f"{old} holds data of an older SkinBridge, which used the folder it ran from; this configuration uses "
            f"{settings.resolved_var_dir}. To keep the old data, set SKINBRIDGE_VAR_DIR={old.resolve()} "
            "(or move the folder there).")


def schema_problem(settings: Settings) -> str | None:
    """Why the configured database does not match this code (with what to run), or None."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from clinic_db.db import get_clinic
    from clinic_db.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(settings.resolved_database_url)).get_current_head()
    with get_clinic().engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current == head:
        return None
    if current is None:
        return f"the database {_safe_url(settings.resolved_database_url)} has no SkinBridge tables yet: {UPGRADE}"
    return f"database at revision {current}, code expects {head}: {UPGRADE}"


def run_checks(settings: Settings) -> list[str]:
    problems: list[str] = []
    try:
        import fhir.resources.R4B.diagnosticreport  # noqa: F401 - the library half of `fhir`
        import fhir.mapping  # noqa: F401 - the project's half of `fhir`
    except ImportError as exc:
        problems.append(f"the `fhir` namespace is broken ({exc}); see fhir/__init__.py")
    try:
        if problem := schema_problem(settings):
            problems.append(problem)
    except Exception as exc:  # noqa: BLE001 - report, don't crash the checker
        problems.append(f"database or keys: {type(exc).__name__}: {exc}")
    return problems


def _safe_url(url: str) -> str:
    """The database URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


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
