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
    """Settings, or exit 2 with what to set when a production configuration is unsafe (or the named
    settings file is missing)."""
    try:
        settings = get_settings()
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
    """Show the active master key, how many data keys each master key wraps, and which live
    processes wrap new data keys with which key."""
    from sqlalchemy import func, select

    from clinic_db import heartbeat
    from clinic_db.db import get_clinic
    from clinic_db.models import PatientKey
    from clinic_db.rotation import pending

    settings = get_settings()
    clinic = get_clinic()
    ring = clinic.vault.keyring
    with clinic.session() as s:
        counts = dict(s.execute(select(PatientKey.master_kid, func.count()).group_by(PatientKey.master_kid)).all())
    users: dict[str, int] = {}
    for proc in heartbeat.alive(clinic, within_s=settings.heartbeat_stale_s):
        users[proc.master_kid or "?"] = users.get(proc.master_kid or "?", 0) + 1
    click.echo(f"active: {ring.current_kid()}")
    for kid in sorted(set(ring.masters) | set(counts) | set(users)):
        click.echo(f"  {kid}: {counts.get(kid, 0)} data keys, {users.get(kid, 0)} live processes"
                   f"{'' if kid in ring.masters else ' (KEY MISSING)'}")
    journal = pending(ring)
    if journal is not None:
        click.echo(f"unfinished rotation to {journal['new_kid']}: run `skinbridge keys rotate` to finish it")


@keys.command("rotate")
@click.option("--retire/--keep-old", default=False,
              help="Delete old master key files once no data key and no live process uses them.")
@click.option("--wait", "wait_s", type=float, default=None,
              help="With --retire: seconds to wait for live processes to take up the new key before refusing "
                   "(default: two heartbeat intervals).")
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True,
              help="Data keys re-wrapped per transaction.")
def keys_rotate(retire: bool, wait_s: float | None, batch_size: int) -> None:
    """Create a new master key and re-wrap every data key under it (no re-encryption of data).

    Resumable: after a crash, run it again; it finishes the same rotation."""
    from clinic_db.db import get_clinic
    from clinic_db.keys import KeyUnavailable
    from clinic_db.rotation import RetireRefused, RotationBusy, rotate

    settings = checked_settings()
    if wait_s is None:
        wait_s = 2 * settings.heartbeat_interval_s + 1
    try:
        report = rotate(get_clinic(), retire_old=retire, wait_s=wait_s, batch=batch_size)
    except RetireRefused as exc:
        click.echo(f"{exc}\nThe new key is active and every readable data key is re-wrapped; run "
                   "`skinbridge keys rotate --retire` again once these are gone.", err=True)
        sys.exit(1)
    except (RotationBusy, KeyUnavailable) as exc:  # another rotation runs; inline keys; a key file missing
        click.echo(str(exc), err=True)
        sys.exit(1)
    click.echo(
        f"{'finished interrupted rotation to' if report.resumed else 'new master key'} {report.new_kid}; "
        f"re-wrapped {report.rewrapped} data keys; retired: {', '.join(report.retired) or 'none'}"
    )
    if report.unreadable:
        click.echo(f"WARNING: {len(report.unreadable)} data key(s) could not be unwrapped and keep their old "
                   f"master key: {', '.join(report.unreadable[:10])}", err=True)


# --- processes ------------------------------------------------------------------------------
@main.command()
@click.option("--queues", default="gpu,cpu", show_default=True, help="Celery queues to consume.")
@click.option("--concurrency", type=int, default=None,
              help="Processes (one per GPU on GPU workers); threads when batching (SKINBRIDGE_BATCH_SLOTS).")
@click.option("--beat/--no-beat", default=False, help="Also run the periodic sweeper (one per deployment).")
def worker(queues: str, concurrency: int | None, beat: bool) -> None:
    """Run a Celery worker (models load once per process after the fork)."""
    from skinbridge.celery_app import app

    import os

    import logging

    from skinbridge import logs

    settings = checked_settings()
    os.environ["SKINBRIDGE_WORKER_QUEUES"] = queues  # tells worker_process_init whether to load models
    level = logs.for_worker()  # one line per case step; periodic tasks at DEBUG
    argv = [
        *(["--quiet"] if level > logging.DEBUG else []),  # no start-up banner; "ready" is still logged
        "worker", f"--loglevel={logging.getLevelName(level)}", f"--pool={settings.worker_pool}", "-Q", queues,
        f"--concurrency={concurrency or settings.worker_slots}", "-E",
        f"--hostname=skinbridge-{queues.replace(',', '-')}@%h",
    ]
    if beat:  # the beat worker also consumes the sweeper's own queue (skinbridge.celery_app.SWEEPER_QUEUE)
        from skinbridge.celery_app import SWEEPER_QUEUE

        argv[argv.index("-Q") + 1] = f"{queues},{SWEEPER_QUEUE}"
        argv += ["-B", f"--schedule={settings.resolved_var_dir / 'celerybeat-schedule'}"]
    app.worker_main(argv)


@main.command()
@click.option("--host", default=None, help="Default: SKINBRIDGE_HTTP_HOST (127.0.0.1).")
@click.option("--port", type=int, default=None, help="Default: SKINBRIDGE_HTTP_PORT (8000).")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="API processes on the one port. Default: the CPUs this process may use.")
def api(host: str | None, port: int | None, workers: int | None) -> None:
    """Serve the web app: FHIR API, SMART token endpoint, dermatologist console.

    Every process keeps its shared state in the database (SMART jti replay cache, export jobs,
    console sessions and lockouts), so any number of them may serve one deployment.
    """
    import os

    import uvicorn

    from skinbridge.web import HttpProtocol

    settings = checked_settings()
    uvicorn.run("skinbridge.web:create_app", factory=True, host=host or settings.http_host,
                port=port or settings.http_port, log_level="info", proxy_headers=True, http=HttpProtocol,
                workers=workers or len(os.sched_getaffinity(0)), access_log=False)


@main.command()
@click.option("--liveness", "component", default=None, metavar="COMPONENT",
              help="Only check that a COMPONENT process (bot, worker, api) beat within SKINBRIDGE_HEARTBEAT_STALE_S.")
def check(component: str | None) -> None:
    """Check configuration, keys, database schema and imports; exit 1 on a problem."""
    from skinbridge.selfcheck import run_checks, where

    settings = checked_settings()
    if component is not None:
        from clinic_db import heartbeat
        from clinic_db.db import get_clinic

        live = heartbeat.alive(get_clinic(), component, within_s=settings.heartbeat_stale_s)
        if not live:
            click.echo(f"PROBLEM: no {component} process beat in the last {settings.heartbeat_stale_s:.0f} s "
                       "(stuck or not running)", err=True)
            sys.exit(1)
        click.echo(f"{component}: {len(live)} live process(es)")
        return
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
    from inference.models_cli import models_command

    for command in (bot_command, sandbox_command, clinician_command, fhir_client_command, fhir_subscription_command,
                    bench_command, train_command, models_command):
        main.add_command(command)
    from inference.bench_pipeline import bench_pipeline

    bench_command.add_command(bench_pipeline)  # skinbridge bench pipeline
    from fhir.bench import bench_fhir

    bench_command.add_command(bench_fhir)  # skinbridge bench fhir
    from skinbridge.soak import soak_command

    bench_command.add_command(soak_command)  # skinbridge bench soak


_register_components()

if __name__ == "__main__":
    main()
