"""Shared fixtures: real SQLite and PostgreSQL databases, the Clinic handle, Redis.

PostgreSQL and Redis tests skip when the server is missing, unless SKINBRIDGE_TEST_REQUIRE_SERVICES=1
(set by .ci/run), in which case a missing service fails the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from clinic_db import db as clinic_db_module
from clinic_db.db import Clinic
from clinic_db.migrate import upgrade
from skinbridge.settings import Settings, get_settings, reset_settings_cache

PG_ADMIN_URL = os.environ.get("SKINBRIDGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("SKINBRIDGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REQUIRE_SERVICES = os.environ.get("SKINBRIDGE_TEST_REQUIRE_SERVICES") == "1"
# The backend of the `clinic` fixture, which most tests use: `make test` runs the suite once per backend.
BACKEND = os.environ.get("SKINBRIDGE_TEST_BACKEND", "sqlite")
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("SKINBRIDGE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def service_missing(what: str, exc: Exception | str) -> None:
    """Skip a test whose outside tool or service is missing; under CI (REQUIRE_SERVICES) fail instead."""
    message = f"{what} is not reachable: {exc}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (SKINBRIDGE_TEST_REQUIRE_SERVICES=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    try:
        engine = create_engine(PG_ADMIN_URL)
        with engine.connect() as conn:
            conn.execute(text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        service_missing("PostgreSQL", exc)
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """A brand-new PostgreSQL database for one test, dropped afterwards."""
    name = f"sb_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'var' / 'skinbridge.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


def _configure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Settings:
    monkeypatch.setenv("SKINBRIDGE_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SKINBRIDGE_DATABASE_URL", database_url)
    monkeypatch.setenv("SKINBRIDGE_PROFILE", "embedded")
    for name in ("SKINBRIDGE_MASTER_KEY", "SKINBRIDGE_KEY_DIR", "SKINBRIDGE_BROKER_URL", "SKINBRIDGE_TELEGRAM_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    reset_settings_cache()
    clinic_db_module.get_clinic.cache_clear()
    return get_settings()


def _open_clinic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> Iterator[Clinic]:
    _configure(monkeypatch, tmp_path, database_url)
    upgrade(database_url)
    clinic = clinic_db_module.get_clinic()  # the process-wide handle, as the app code sees it
    try:
        yield clinic
    finally:
        clinic.dispose()
        clinic_db_module.get_clinic.cache_clear()
        reset_settings_cache()


@pytest.fixture
def clinic(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Clinic]:
    """A migrated clinic with its own key directory (SQLite, or PostgreSQL when
    SKINBRIDGE_TEST_BACKEND=postgresql); also what get_clinic() returns."""
    url = request.getfixturevalue("pg_url" if BACKEND == "postgresql" else "sqlite_url")
    yield from _open_clinic(monkeypatch, tmp_path, url)


@pytest.fixture
def any_clinic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_url: str) -> Iterator[Clinic]:
    """Like ``clinic`` but once on SQLite and once on PostgreSQL."""
    yield from _open_clinic(monkeypatch, tmp_path, db_url)


@pytest.fixture
def clinic_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """A factory: ``clinic_on(url)`` migrates the database at ``url`` (e.g. a server the test started
    itself) and returns the process-wide Clinic on it, like the ``clinic`` fixture."""
    opened: list[Iterator[Clinic]] = []

    def make(url: str) -> Clinic:
        handle = _open_clinic(monkeypatch, tmp_path, url)
        opened.append(handle)
        return next(handle)

    yield make
    for handle in opened:
        handle.close()


@pytest.fixture
def pg_clinic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, pg_url: str) -> Iterator[Clinic]:
    yield from _open_clinic(monkeypatch, tmp_path, pg_url)


@pytest.fixture(scope="session")
def redis_url() -> str:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL)
        client.ping()
        client.flushdb()
    except Exception as exc:  # noqa: BLE001
        service_missing("Redis", exc)
    return REDIS_URL


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "ham10000").is_dir():
        pytest.fail(f"the shared data set is missing at {SHARED_DATA} (set SKINBRIDGE_SHARED_DATA)")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The PostgreSQL pass (SKINBRIDGE_TEST_BACKEND=postgresql) re-runs every test that stores data
    through the `clinic` fixture; tests without a database, or already parametrized over both
    backends (`any_clinic`, `db_url`), ran in the first pass."""
    if BACKEND != "postgresql":
        return
    keep = [i for i in items if "clinic" in getattr(i, "fixturenames", ()) and "db_url" not in i.fixturenames]
    deselected = [i for i in items if i not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep
