"""The Alembic head and the models agree (no autogenerate drift), on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.command import downgrade, upgrade
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from clinic_db.db import make_engine
from clinic_db.migrate import alembic_config, upgrade as upgrade_head
from clinic_db.models import Base


def test_migration_head_matches_models(db_url):
    upgrade_head(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations disagree: {diff}"


def test_downgrade_to_base_and_back(db_url):
    cfg = alembic_config(db_url)
    upgrade(cfg, "head")
    downgrade(cfg, "base")
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    upgrade(cfg, "head")
    engine = make_engine(db_url)
    assert "patients" in inspect(engine).get_table_names()
    engine.dispose()
