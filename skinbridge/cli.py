"""The `skinbridge` command line: one entry point for every process and admin task."""

from __future__ import annotations

import sys

import click

from skinbridge.settings import UnsafeConfiguration, get_settings


class _Group(click.Group):
    """A command that hits a database without SkinBridge's tables (or at an older revision) says what to
    run instead of ending in an SQL traceback ("no such table")."""

    def invoke(self, ctx: click.Context):  # type: ignore[no-untyped-def]
        from sqlalchemy.exc import OperationalError, ProgrammingError

        try:
            return super().invoke(ctx)
        except (OperationalError, ProgrammingError):
            from skinbridge.selfcheck import schema_problem

            try:
                problem = schema_problem(get_settings())
            except Exception:  # noqa: BLE001 - the database itself is unreachable: the original error says more
                problem = None
            if problem is None:
                raise
            click.echo(f"PROBLEM: {problem}", err=True)
            sys.exit(1)


@click.group(cls=_Group)
def main() -> None:
    """SkinBridge: teledermatology bot, AI workers, review console and FHIR API."""


def checked_settings():  # type: ignore[no-untyped-def]
    """Settings, or exit 2 with what to set when a production configuration is unsafe."""
    settings = get_settings()
    try:
        settings.check_safe()
    except UnsafeConfiguration as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    return settings


# --- database -------------------------------------------------------------------------------
@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations to the configured database."""
    from clinic_db.migrate import upgrade

    settings = checked_settings()
    upgrade(settings.resolved_database_url, revision)
    click.echo(f"database at {revision}")


# --- keys -----------------------------------------------------------------------------------
@main.group()
def keys() -> None:
    """Master keys and data-key wrapping."""


@keys.command("status")
def keys_status() -> None:
    """Show the active master key and how many data keys each master key wraps."""
    from sqlalchemy import func, select

    from clinic_db.db import get_clinic
    from clinic_db.models import PatientKey

    clinic = get_clinic()
    ring = clinic.vault.keyring
    with clinic.session() as s:
        counts = dict(s.execute(select(PatientKey.master_kid, func.count()).group_by(PatientKey.master_kid)).all())
    click.echo(f"active: {ring.active_kid}")
    for kid in sorted(set(ring.masters) | set(counts)):
        click.echo(f"  {kid}: {counts.get(kid, 0)} data keys{'' if kid in ring.masters else ' (KEY MISSING)'}")


@keys.command("rotate")
@click.option("--retire/--keep-old", default=False, help="Delete old master key files once nothing uses them.")
def keys_rotate(retire: bool) -> None:
    """Create a new master key, re-wrap every data key under it (no re-encryption of data)."""
    from clinic_db.db import get_clinic
    from clinic_db.rotation import rotate

    checked_settings()
    report = rotate(get_clinic(), retire_old=retire)
    click.echo(
        f"new master key {report.new_kid}; re-wrapped {report.rewrapped} data keys; "
        f"retired: {', '.join(report.retired) or 'none'}"
    )


# --- processes ------------------------------------------------------------------------------
@main.command()
@click.option("--queues", default="gpu,cpu", show_default=True, help="Celery queues to consume.")
@click.option("--concurrency", type=int, default=None, help="Processes (one per GPU on GPU workers).")
@click.option("--beat/--no-beat", default=False, help="Also run the periodic sweeper (one per deployment).")
def worker(queues: str, concurrency: int | None, beat: bool) -> None:
    """Run a Celery worker (models load once per process after the fork)."""
    from skinbridge.celery_app import app

    import os

    settings = checked_settings()
    os.environ["SKINBRIDGE_WORKER_QUEUES"] = queues  # tells worker_process_init whether to load models
    argv = [
        "worker", "--loglevel=INFO", "--pool=prefork", "-Q", queues,
        f"--concurrency={concurrency or settings.worker_concurrency}", "-E",
        f"--hostname=skinbridge-{queues.replace(',', '-')}@%h",
    ]
    if beat:
        argv += ["-B", f"--schedule={settings.resolved_var_dir / 'celerybeat-schedule'}"]
    app.worker_main(argv)


@main.command()
@click.option("--host", default=None, help="Default: SKINBRIDGE_HTTP_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: SKINBRIDGE_HTTP_PORT (8000).")
def api(host: str | None, port: int | None) -> None:
    """Serve the web app: FHIR API, SMART token endpoint, dermatologist console."""
    import uvicorn

    settings = checked_settings()
    uvicorn.run("skinbridge.web:create_app", factory=True, host=host or settings.http_host,
                port=port or settings.http_port, log_level="info", proxy_headers=True)


@main.command()
def check() -> None:
    """Check configuration, keys, database schema and imports; exit 1 on a problem."""
    from skinbridge.selfcheck import run_checks, where

    settings = checked_settings()
    for line in where(settings):
        click.echo(line)
    problems = run_checks(settings)
    for line in problems:
        click.echo(f"PROBLEM: {line}", err=True)
    if problems:
        sys.exit(1)
    click.echo("all checks passed")


@main.command()
def up() -> None:
    """Start the whole system on embedded defaults (migrate, worker, web app, bot sandbox)."""
    from skinbridge.supervisor import run_all

    settings = checked_settings()
    sys.exit(run_all(settings))


def _register_components() -> None:
    """Commands that live with their component (each module keeps its own options)."""
    from bot.cli import bot_command
    from bot.emulator.cli import sandbox_command
    from console.cli import clinician_command
    from fhir.smart import fhir_client_command
    from fhir.subscriptions import fhir_subscription_command
    from inference.bench import bench_command
    from inference.training.cli import train_command

    for command in (bot_command, sandbox_command, clinician_command, fhir_client_command, fhir_subscription_command,
                    bench_command, train_command):
        main.add_command(command)


_register_components()

if __name__ == "__main__":
    main()
