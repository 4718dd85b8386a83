"""Engine and session set-up, plus the per-process :class:`Clinic` handle (engine + vault)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from clinic_db.keys import KeyRing, keyring_from_settings
from clinic_db.vault import Vault


def make_engine(url: str, *, pool_size: int = 10, pre_ping: bool = False, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=pre_ping, pool_size=pool_size, max_overflow=pool_size, **kwargs)


@dataclass
class Clinic:
    """What every process needs to touch clinical data: an engine, sessions and the vault."""

    engine: Engine
    sessions: sessionmaker[Session]
    vault: Vault

    @classmethod
    def open(cls, database_url: str, keyring: KeyRing, **engine_options: Any) -> "Clinic":
        engine = make_engine(database_url, **engine_options)
        return cls(engine=engine, sessions=sessionmaker(engine, expire_on_commit=False), vault=Vault(keyring))

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        self.engine.dispose()


@functools.lru_cache(maxsize=1)
def get_clinic() -> Clinic:
    """The process-wide Clinic built from settings (after fork, call ``get_clinic().engine.dispose()``)."""
    from skinbridge.settings import get_settings

    settings = get_settings()
    return Clinic.open(settings.resolved_database_url, keyring_from_settings(settings),
                       pool_size=settings.db_pool_size, pre_ping=settings.db_pre_ping)
