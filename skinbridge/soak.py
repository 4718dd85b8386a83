"""``skinbridge bench soak``: the embedded worker under a steady stream of cases, for minutes or hours.

Runs in a fresh var dir of its own (SQLite, generated keys, the ``filesystem://`` broker): one
``skinbridge worker --queues gpu,cpu --beat`` process with the shipped models, and this process
submitting a case (a synthetic photo, a complete history) at a steady rate. A worker that exits is
counted as a crash (with the last lines of its log) and started again, so one crash does not end the
soak. At the end the stream stops, the queue drains, and the report counts what a patient would
notice: cases without a result (lost), results sent twice (duplicated), failed cases, chains that ran
more than once, and the broker files that were set aside as unreadable (skinbridge.fs_broker).
"""

from __future__ import annotations

import io
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

SCHEMA = "skinbridge.bench.soak/1"
CRASH_MARKERS = ("Unrecoverable error", "CRITICAL")


def _photo(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(90, 200, size=3)
    pixels = np.clip(base + rng.normal(0, 25, size=(240, 320, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _submit_one(clinic: Any, n: int) -> uuid.UUID:
    from clinic_db import cases, patients
    from inference.pipeline import mark_history_complete, submit_case
    from inference.quality import sanitize

    with clinic.session() as s:
        patient = patients.register(clinic, s, 9_000_000_000 + n, consent_version="soak")
        case = cases.open_case(clinic, s, patient)
        cases.add_image(clinic, s, case, sanitize(_photo(n)), source_ref=f"soak:{n}")
        cases.set_history(clinic, s, case, body_site="back", duration="months", bleeding=False, growth=True)
        mark_history_complete(s, case)
        s.commit()
        case_id = case.id
    submit_case(case_id)
    return case_id


class _Worker:
    def __init__(self, env: dict[str, str], log: Path):
        self.env, self.log, self.proc = env, log, None
        self.crashes: list[dict[str, Any]] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "skinbridge", "worker", "--queues", "gpu,cpu", "--beat"],
            env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def check(self) -> None:
        """A worker that exited on its own is a crash: record it and start another."""
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace").splitlines()[-5:]
            self.crashes.append({"at": datetime.now(UTC).isoformat(timespec="seconds"),
                                 "exit_code": self.proc.returncode, "log_tail": tail})
            self._kill_group()
            self.start()

    def _kill_group(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()


def _outcome(clinic: Any, submitted: dict[uuid.UUID, float]) -> dict[str, Any]:
    from sqlalchemy import select

    from clinic_db.models import AuditEvent, Case, OutboxMessage

    ids = list(submitted)
    with clinic.session() as s:
        status = dict(s.execute(select(Case.id, Case.status).where(Case.id.in_(ids))).all())
        reasons = Counter(s.scalars(select(Case.failure_reason).where(Case.id.in_(ids), Case.status == "failed")))
        results = Counter()
        first_result: dict[str, datetime] = {}
        for key, created in s.execute(select(OutboxMessage.dedup_key, OutboxMessage.created_at)
                                      .where(OutboxMessage.dedup_key.like("result:%"))):
            results[key] += 1
            first_result.setdefault(key, created)
        runs = Counter(entity for entity, detail in s.execute(select(AuditEvent.entity_id, AuditEvent.detail).where(
            AuditEvent.action == "case.transition", AuditEvent.entity_id.in_([str(i) for i in ids])))
            if (detail or {}).get("to_status") == "analysing")
        created = dict(s.execute(select(Case.id, Case.created_at).where(Case.id.in_(ids))).all())
    with_result = [i for i in ids if results.get(f"result:{i}")]
    latencies = sorted((first_result[f"result:{i}"] - created[i]).total_seconds() for i in with_result)
    return {
        "cases_submitted": len(ids),
        "cases_with_result": len(with_result),
        "lost": sum(1 for i in ids if status.get(i) != "failed" and not results.get(f"result:{i}")),
        "duplicated_results": sum(results[f"result:{i}"] - 1 for i in with_result),
        "failed": sum(reasons.values()),
        "failure_reasons": dict(reasons),
        "chains_run_more_than_once": sum(1 for i in ids if runs.get(str(i), 0) > 1),
        "statuses": dict(Counter(status.values())),
        "result_latency_s": {
            "p50": round(statistics.median(latencies), 2) if latencies else None,
            "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else None,
            "max": round(latencies[-1], 2) if latencies else None,
        },
    }


def run_soak(minutes: float, rate_per_min: float, drain_s: float, var_dir: Path, burst: int = 0,
             progress=lambda m: None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Soak the embedded worker in ``var_dir`` (made empty first); return the report. ``burst`` cases are
    submitted at once first: a backlog (SKINBRIDGE_STUCK_AFTER_S in the environment reaches the worker)."""
    import celery
    import kombu

    from clinic_db import db as clinic_db_module
    from clinic_db.migrate import upgrade
    from skinbridge.celery_app import app, configure
    from skinbridge.settings import get_settings, reset_settings_cache

    if var_dir.exists():
        shutil.rmtree(var_dir)
    var_dir.mkdir(parents=True)
    overrides = {"SKINBRIDGE_VAR_DIR": str(var_dir), "SKINBRIDGE_PROFILE": "embedded"}
    drop = ("SKINBRIDGE_DATABASE_URL", "SKINBRIDGE_BROKER_URL", "SKINBRIDGE_KEY_DIR", "SKINBRIDGE_MASTER_KEY",
            "SKINBRIDGE_FAULT_DELAY_S")
    saved = {k: os.environ.get(k) for k in (*overrides, *drop)}
    os.environ.update(overrides)
    for k in drop:
        os.environ.pop(k, None)
    reset_settings_cache()
    clinic_db_module.get_clinic.cache_clear()
    settings = get_settings()
    configure(app, settings)
    clinic = clinic_db_module.get_clinic()  # creates the key files
    upgrade(settings.resolved_database_url)
    repo = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    worker = _Worker(env, var_dir / "worker.log")
    submitted: dict[uuid.UUID, float] = {}
    started = datetime.now(UTC)
    t0 = time.monotonic()
    try:
        worker.start()
        for n in range(burst):
            submitted[_submit_one(clinic, n)] = time.monotonic()
        if burst:
            progress(f"{burst} cases submitted at once")
        interval = 60.0 / rate_per_min
        next_at = time.monotonic()
        n = burst
        while time.monotonic() - t0 < minutes * 60:
            worker.check()
            if time.monotonic() >= next_at:
                submitted[_submit_one(clinic, n)] = time.monotonic()
                n += 1
                next_at += interval
                if n % 50 == 0:
                    progress(f"{n} cases submitted, {len(worker.crashes)} worker crashes")
            time.sleep(min(0.2, max(0.0, next_at - time.monotonic())))
        stream_s = time.monotonic() - t0
        progress(f"stream over: {n} cases; draining (at most {drain_s:.0f} s)")
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline:
            worker.check()
            outcome = _outcome(clinic, submitted)
            if outcome["lost"] == 0:
                break
            time.sleep(2)
        outcome = _outcome(clinic, submitted)
    finally:
        worker.stop()
        clinic.dispose()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_settings_cache()
        clinic_db_module.get_clinic.cache_clear()
        configure(app, get_settings())
    log_text = (var_dir / "worker.log").read_text(errors="replace")
    unreadable = settings.broker_folder / "out" / ".unreadable"
    return {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "minutes": minutes,
        "stream_s": round(stream_s, 1),
        "rate_per_min": rate_per_min,
        "burst": burst,
        "settings": {"stuck_after_s": settings.stuck_after_s, "sweeper_interval_s": settings.sweeper_interval_s,
                     "max_pipeline_attempts": settings.max_pipeline_attempts},
        "broker": "filesystem:// (skinbridge.fs_broker)",
        "worker": "skinbridge worker --queues gpu,cpu --beat (embedded profile, shipped models)",
        "worker_crashes": len(worker.crashes),
        "crashes": worker.crashes,
        "critical_log_lines": [line for line in log_text.splitlines() if any(m in line for m in CRASH_MARKERS)],
        "unreadable_broker_files": len(os.listdir(unreadable)) if unreadable.is_dir() else 0,
        **outcome,
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                     "celery": celery.__version__, "kombu": kombu.__version__},
    }


@click.command("soak")
@click.option("--minutes", type=float, default=60.0, show_default=True, help="How long the stream of cases runs.")
@click.option("--rate", "rate_per_min", type=float, default=12.0, show_default=True, help="Cases submitted per minute.")
@click.option("--drain", "drain_s", type=float, default=300.0, show_default=True,
              help="Seconds to wait for the queue to drain after the stream.")
@click.option("--burst", type=int, default=0, show_default=True,
              help="Cases submitted at once before the stream: a backlog (try with SKINBRIDGE_STUCK_AFTER_S=5).")
@click.option("--var-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Scratch var dir, emptied first (default: a new temporary folder, removed afterwards).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here (default: print it).")
def soak_command(minutes: float, rate_per_min: float, drain_s: float, burst: int, var_dir: Path | None,
                 json_path: Path | None) -> None:
    """The embedded worker under a steady stream of cases: worker crashes, lost and duplicated results.
    Exits 1 when anything was lost, duplicated or crashed."""
    if minutes <= 0 or rate_per_min <= 0 or burst < 0:
        raise click.BadParameter("--minutes and --rate must be positive, --burst not negative")
    scratch = var_dir or Path(tempfile.mkdtemp(prefix="skinbridge-soak-"))
    try:
        report = run_soak(minutes, rate_per_min, drain_s, scratch, burst,
                          progress=lambda m: click.echo(m, err=True))
    finally:
        if var_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    from inference.bench import emit_report

    emit_report(report, json_path)
    if report["worker_crashes"] or report["lost"] or report["duplicated_results"] or report["critical_log_lines"]:
        sys.exit(1)
