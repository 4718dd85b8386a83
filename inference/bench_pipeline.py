"""``skinbridge bench pipeline``: where a patient's wait goes, stage by stage, through the real processes.

It starts what a deployment runs — the Telegram Bot API emulator (``skinbridge sandbox``), ``skinbridge
bot`` and ``skinbridge worker --beat`` — on a fresh clinic: SQLite and the filesystem broker in a
temporary data folder (``--shape embedded``), or a fresh PostgreSQL database and a spare Redis db number
(``--shape redis``). Patients are played over the emulator's HTTP control API exactly as the tests play
them (consent, one photo, the history answers); one warm-up patient goes first and is not counted.

Nothing is instrumented for the benchmark: the timestamps are the ones the system records anyway —
the inbox row of the last answer (``bot_inbox``), the case's status changes (``audit_events``), every
pipeline step's lease (``task_leases``: taken when a step starts, released once its successor is in
the broker), the outbox rows (``created_at``/``sent_at``) and the emulator's call log (the moment the
bot's ``sendMessage``/``sendMediaGroup`` reached "Telegram"). Every clock is this machine's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import httpx

SCHEMA = "skinbridge.bench.pipeline/1"
CONTROL = {"X-Emulator-Control": "1"}  # the emulator's state-changing control calls need it
HISTORY = {"body_site": "back", "duration": "months", "itch": "no", "bleeding": "no", "growth": "yes",
           "pain": "no", "prior_treatment": "none", "fitzpatrick": "skip"}
WARMUP_USER = 990_000
FIRST_USER = 991_000
RESULT_BUTTON = "c:doc:"  # the preliminary result is the message with the 'ask a dermatologist' button
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # child processes run this same code
# settings of the surrounding shell that would point the processes at another clinic
OWN_SETTINGS = ("SKINBRIDGE_VAR_DIR", "SKINBRIDGE_DATABASE_URL", "SKINBRIDGE_BROKER_URL", "SKINBRIDGE_RESULT_BACKEND",
                "SKINBRIDGE_TELEGRAM_TOKEN", "SKINBRIDGE_TELEGRAM_BASE_URL", "SKINBRIDGE_TELEGRAM_BASE_FILE_URL",
                "SKINBRIDGE_WEBHOOK_URL", "SKINBRIDGE_KEY_DIR", "SKINBRIDGE_MASTER_KEY", "SKINBRIDGE_MASTER_KEY_ID",
                "SKINBRIDGE_BLIND_INDEX_KEY", "SKINBRIDGE_PROFILE")


# --- the patient's photo ------------------------------------------------------------------------------
def lesion_photo(seed: int, size: tuple[int, int] = (900, 700)) -> bytes:
    """A sharp synthetic phone photo of a dark irregular lesion on skin (passes the quality gate)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array([214, 170, 140], dtype=np.float32) + rng.normal(0, 9, (h, w, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    cx, cy = w // 2 + int(rng.integers(-40, 40)), h // 2 + int(rng.integers(-40, 40))
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    draw.polygon([(cx + r * np.cos(a), cy + r * np.sin(a)) for a, r in zip(angles, rng.uniform(70, 130, 24))],
                 fill=(92, 55, 40))
    for _ in range(40):
        x, y = cx + rng.integers(-60, 60), cy + rng.integers(-60, 60)
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=(40, 25, 20))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92)
    return out.getvalue()


# --- a patient, played over the emulator's control API ------------------------------------------------
class Patient:
    def __init__(self, base: str, user_id: int, photo: bytes, poll_s: float):
        self.user_id, self.photo, self.poll_s = user_id, photo, poll_s
        self.http = httpx.Client(base_url=base, headers=CONTROL, timeout=120)
        self.seen: set[tuple[int, int]] = set()
        self.last_answer_at: float | None = None  # when the last history answer reached "Telegram"
        self.last_update_id: int | None = None
        self.error: str | None = None

    def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        r = self.http.post(f"/_emulator/users/{self.user_id}/{path}", **kwargs)
        r.raise_for_status()
        return r.json()

    def _expect(self, match: Callable[[dict[str, Any]], bool], what: str, timeout: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.http.get(f"/_emulator/users/{self.user_id}/messages")
            r.raise_for_status()
            for message in r.json():
                key = (message["message_id"], message["seq"])
                if key not in self.seen and match(message):
                    self.seen.add(key)
                    return message
            time.sleep(self.poll_s)
        raise TimeoutError(f"patient {self.user_id}: no bot message {what}")

    def _with_button(self, prefix: str) -> Callable[[dict[str, Any]], bool]:
        return lambda m: prefix in json.dumps(m.get("reply_markup") or {})

    def _press(self, message: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Tap the button whose callback data starts with ``prefix``."""
        data = next(b["callback_data"] for row in (message.get("reply_markup") or {}).get("inline_keyboard", [])
                    for b in row if b.get("callback_data", "").startswith(prefix))
        return self._post("press", json={"message_id": message["message_id"], "data": data, "language_code": "en"})

    def consult(self) -> None:
        """Consent, one photo, the eight history answers (as tests/e2e_support.py plays a patient)."""
        try:
            self._post("text", json={"text": "/start", "language_code": "en"})
            self._press(self._expect(self._with_button("consent:yes"), "with the consent buttons"), "consent:yes")
            self._expect(lambda m: "/new" in (m.get("text") or ""), "after consent")
            self._post("photo", files={"file": ("p.jpg", self.photo, "image/jpeg")}, data={"language_code": "en"})
            self._press(self._expect(self._with_button("photos:done"), "'photo saved'"), "photos:done")
            for name, value in HISTORY.items():
                question = self._expect(self._with_button(f"h:{name}:"), f"question {name}")
                # the clock starts before the press: the bot may fetch and store the update before the
                # emulator's HTTP answer to the press is back here
                pressed_at = time.time()
                sent = self._press(question, f"h:{name}:{value}")
            self.last_answer_at, self.last_update_id = pressed_at, int(sent["update_id"])
        except Exception as exc:  # noqa: BLE001 - reported per patient
            self.error = f"{type(exc).__name__}: {exc}"


# --- processes ------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child: SIGTERM when the benchmark dies, even by SIGKILL (Linux), so nothing is left running."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Processes:
    folder: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("ab")
        proc = subprocess.Popen([sys.executable, "-m", "skinbridge", *argv], cwd=self.folder,
                                env={**self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
        self.procs[name] = proc
        return proc

    def alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise click.ClickException(f"{name} exited ({proc.returncode}):\n{self.log(name)}")

    def log(self, name: str, chars: int = 3000) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM each leader (a worker shuts its pool down itself), then SIGKILL what is left of its group."""
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _cpu_seconds(procs: Processes) -> dict[str, float]:
    """CPU seconds used so far by each process the run started (with its pool children: its session),
    by the PostgreSQL and Redis servers, and by this process (the played patients), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    sessions = {proc.pid: name for name, proc in procs.procs.items()}
    used: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        command, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        session, cpu = int(fields[3]), (int(fields[11]) + int(fields[12])) / tick  # stat fields 6, 14 and 15
        label = (sessions.get(session) or ("bench: played patients" if int(entry.name) == os.getpid() else None)
                 or next((name for name in ("postgres", "redis") if command.startswith(name)), None))
        if label is not None:
            used[label] = used.get(label, 0.0) + cpu
    return used


def _cpu_report(start: dict[str, float], started_at: float, results: tuple[float, dict[str, float]] | None,
                ) -> dict[str, Any] | None:
    """Where the CPU went from the crowd's start until its last result was delivered: is the wait the cores'?"""
    if results is None:
        return None
    at, end = results
    used = {k: v - start.get(k, 0.0) for k, v in sorted(end.items())}
    return {"window_s": round(at - started_at, 2), "cores_busy": round(sum(used.values()) / (at - started_at), 2),
            "seconds": {k: round(v, 2) for k, v in used.items()}}


def _wait(predicate: Callable[[], Any], timeout: float, what: str, procs: Processes | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs is not None:
            procs.alive()
        with contextlib.suppress(httpx.HTTPError):
            value = predicate()
            if value:
                return value
        time.sleep(0.2)
    raise click.ClickException(f"timed out after {timeout:.0f} s waiting for {what}")


@contextlib.contextmanager
def _backing_services(shape: str, admin_url: str, redis_url: str, folder: Path) -> Iterator[dict[str, str]]:
    """The settings of a fresh clinic: SQLite + filesystem broker in ``folder``, or a new PostgreSQL
    database and an empty Redis db number, dropped and flushed afterwards."""
    if shape == "embedded":
        yield {"SKINBRIDGE_DATABASE_URL": f"sqlite:///{folder / 'skinbridge.db'}"}
        return
    import redis
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"skinbridge_bench_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = redis_url.rstrip("/")
    # claim an empty db number atomically: two benchmarks started at once must not share a broker
    claim = secrets.token_hex(8)
    db = next((n for n in range(14, 0, -1) if redis.Redis.from_url(f"{base}/{n}").dbsize() == 0
               and redis.Redis.from_url(f"{base}/{n}").set("skinbridge:bench:claim", claim, nx=True, ex=7200)),
              None)
    if db is None:
        raise click.ClickException(f"no empty Redis database number at {base} (1..14)")
    try:
        yield {"SKINBRIDGE_DATABASE_URL": make_url(admin_url).set(database=name).render_as_string(hide_password=False),
               "SKINBRIDGE_BROKER_URL": f"{base}/{db}"}
    finally:
        redis.Redis.from_url(f"{base}/{db}").flushdb()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _prepare_clinic(env: dict[str, str]) -> None:
    """Migrate, make the keys, and have a dermatologist approve the explainer the workers will serve, as
    a clinic does once in the console, so patients get example pictures (what the benchmark times)."""
    from skinbridge.settings import get_settings, reset_settings_cache

    os.environ.update(env)
    reset_settings_cache()
    from clinic_db.db import get_clinic

    get_clinic.cache_clear()
    from clinic_db.migrate import upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url)
    if settings.sd_path is not None:
        return  # an SD explainer is signed off per adapter in the console; not done here
    from sqlalchemy import select

    from clinic_db import clinicians, explainer_review
    from clinic_db.models import Clinician
    from inference.engines.clinical_review import generator_subject
    from inference.engines.generator_net import GeneratorConfig
    from inference.engines.paths import DEFAULT_GENERATOR

    folder = settings.generator_path or DEFAULT_GENERATOR
    config, subject = GeneratorConfig.load(folder), generator_subject(folder)
    clinic = get_clinic()
    with clinic.session() as session:
        reviewer = session.scalar(select(Clinician).where(Clinician.username == "bench"))
        if reviewer is None:
            reviewer, _ = clinicians.create(clinic, session, "bench", display_name="Benchmark sign-off",
                                            role="dermatologist", password=secrets.token_urlsafe(16))
        explainer_review.record(session, reviewer, subject, explainer_id=f"{config.model_id}@{config.model_version}",
                                approve=list(subject.codes), reject={})
        session.commit()


# --- the record ------------------------------------------------------------------------------------------
def _epoch(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _deliveries(base: str) -> dict[int, dict[str, list[float]]]:
    """chat id -> {'result': [...], 'pictures': [...], 'progress': [...]} times from the emulator's call log."""
    calls = httpx.get(f"{base}/_emulator/calls", timeout=60).json()
    out: dict[int, dict[str, list[float]]] = {}
    for call in calls:
        params, method = call.get("params") or {}, call["method"]
        try:
            chat = int(params.get("chat_id"))
        except (TypeError, ValueError):
            continue
        slot = out.setdefault(chat, {"result": [], "pictures": [], "progress": []})
        if method == "sendMessage" and RESULT_BUTTON in json.dumps(params.get("reply_markup") or {}):
            slot["result"].append(call["at"])
        elif method in ("sendMediaGroup", "sendPhoto"):
            slot["pictures"].append(call["at"])
        elif method == "editMessageText" and "ready" in str(params.get("text", "")):
            slot["progress"].append(call["at"])
    return out


def _case_record(clinic: Any, user_id: int, patient: Patient, delivered: dict[str, list[float]]) -> dict[str, Any]:
    from sqlalchemy import select

    from clinic_db import patients
    from sqlalchemy import func

    from clinic_db.models import AIResult, AuditEvent, Case, InboxUpdate, OutboxMessage, TaskLease

    with clinic.session() as session:
        row = patients.find_by_telegram(clinic, session, user_id)
        case = session.scalar(select(Case).where(Case.patient_id == row.id)) if row is not None else None
        if case is None:
            return {"user": user_id, "error": patient.error or "no case"}
        inbox = session.get(InboxUpdate, patient.last_update_id) if patient.last_update_id is not None else None
        transitions = {e.detail.get("to_status"): _epoch(e.at) for e in session.scalars(
            select(AuditEvent).where(AuditEvent.action == "case.transition", AuditEvent.entity_id == str(case.id))
            .order_by(AuditEvent.id))}
        steps = [{"step": lease.step.removeprefix("skinbridge."), "start": _epoch(lease.acquired_at),
                  "end": _epoch(lease.released_at)}
                 for lease in session.scalars(select(TaskLease).where(TaskLease.case_id == case.id)
                                              .order_by(TaskLease.acquired_at))]
        outbox = {m.dedup_key.split(":")[0] + (":" + m.dedup_key.split(":")[2] if m.kind == "progress" else ""):
                  {"created": _epoch(m.created_at), "sent": _epoch(m.sent_at)}
                  for m in session.scalars(select(OutboxMessage).where(OutboxMessage.case_id == case.id))}
        return {
            "user": user_id, "case": str(case.id), "status": case.status, "error": patient.error,
            "t": {
                "last_answer": patient.last_answer_at,
                "inbox_stored": _epoch(inbox.received_at) if inbox else None,
                "inbox_handled": _epoch(inbox.handled_at) if inbox else None,
                **{f"status_{k}": v for k, v in transitions.items()},
                "ai_result_stored": _epoch(session.scalar(select(func.min(AIResult.created_at))
                                                          .where(AIResult.case_id == case.id))),
                "result_delivered": min(delivered["result"], default=None),
                "pictures_delivered": min(delivered["pictures"], default=None),
            },
            "steps": steps,
            # photos in the classifier pass that diagnosed this case (above its own: batched with others)
            "classifier_batch_photos": (session.scalar(select(AIResult.timings).where(
                AIResult.case_id == case.id, AIResult.engine == "classifier")) or {}).get("batch_photos"),
            "outbox": outbox,
            "result_messages": len(delivered["result"]),
        }


def _bot_intake(clinic: Any, since: float) -> dict[str, Any]:
    """How the bot's one consumer kept up with the crowd: every update stored after ``since``."""
    from sqlalchemy import select

    from clinic_db.models import InboxUpdate

    with clinic.session() as session:
        rows = [(_epoch(a), _epoch(b)) for a, b in session.execute(
            select(InboxUpdate.received_at, InboxUpdate.handled_at)) if _epoch(a) and _epoch(a) >= since]
    done = [(a, b) for a, b in rows if b is not None]
    if not done:
        return {"updates": len(rows)}
    span = max(b for _, b in done) - min(a for a, _ in done)
    waits = [b - a for a, b in done]
    return {"updates": len(rows), "handled": len(done), "span_s": round(span, 3),
            "handled_per_s": round(len(done) / span, 1) if span > 0 else None,
            "stored_to_handled_s": {"p50": _pct(waits, 50), "p95": _pct(waits, 95)}}


def _segments(case: dict[str, Any]) -> dict[str, float]:
    """The case's wait cut into consecutive stages (seconds), last answer to pictures delivered.

    Between the bot's hand-off and the result message the cut follows the pipeline steps the case
    really ran (from their leases): 'broker' is a step waiting in the queue, '<step>' its run."""
    t, out = case["t"], {}
    def put(name: str, start: float | None, end: float | None) -> None:
        if start is not None and end is not None:
            out[name] = out.get(name, 0.0) + max(0.0, end - start)
    put("bot: fetch + store update", t.get("last_answer"), t.get("inbox_stored"))
    put("bot: handle + submit", t.get("inbox_stored"), t.get("status_queued"))
    cursor = t.get("status_queued")
    result_at = t.get("result_delivered")
    # the step that writes the result message ends, for the patient, at that commit
    written = (case.get("outbox") or {}).get("result", {}).get("created")
    for step in case["steps"]:
        if step["step"] == "handoff" or step["start"] is None or (written and step["start"] >= written):
            continue
        end = min(step["end"], written) if step["end"] and written else step["end"]
        put("broker wait (hops)", cursor, step["start"])
        if step["step"] == "analyse" and t.get("status_analysing") and t.get("ai_result_stored"):
            # one task, three transactions: the gate commits 'analysing', the models their result
            put("task: analyse / quality gate", step["start"], t["status_analysing"])
            put("task: analyse / models", t["status_analysing"], t["ai_result_stored"])
            put("task: analyse / report + result", t["ai_result_stored"], end)
        else:
            put(f"task: {step['step']}", step["start"], end)
        cursor = end or cursor
    put("outbox: wait + send result", cursor, result_at)
    put("pictures after the result", result_at, t.get("pictures_delivered"))
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100  # linear interpolation between the closest ranks
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return round(ordered[low] + (ordered[high] - ordered[low]) * (pos - low), 3)


def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [c for c in cases if c.get("t", {}).get("result_delivered") and c["t"].get("last_answer")]
    e2e = [c["t"]["result_delivered"] - c["t"]["last_answer"] for c in ok]
    pictures = [c["t"]["pictures_delivered"] - c["t"]["result_delivered"] for c in ok
                if c["t"].get("pictures_delivered")]
    picture_wait = [c["t"]["pictures_delivered"] - c["t"]["last_answer"] for c in ok if c["t"].get("pictures_delivered")]
    stages: dict[str, list[float]] = {}
    for case in ok:
        for name, seconds in _segments(case).items():
            stages.setdefault(name, []).append(seconds)
    # the pipeline's pace: cases analysed per minute, first case queued -> last result written
    written = [c["outbox"]["result"]["created"] for c in ok if (c.get("outbox") or {}).get("result")]
    queued = [c["t"]["status_queued"] for c in ok if c["t"].get("status_queued")]
    span = max(written) - min(queued) if written and queued else 0.0
    batched = [float(c["classifier_batch_photos"]) for c in ok if c.get("classifier_batch_photos")]
    return {
        "cases": len(cases), "with_result": len(ok), "with_pictures": len(pictures),
        # the others' top condition is one the generator does not draw: no pictures, by design
        "expecting_pictures": sum(bool(c.get("pictures_expected", True)) for c in ok),
        "results_per_minute": round(60 * len(written) / span, 1) if span > 0 and len(written) > 1 else None,
        "duplicated_results": sum(max(0, c.get("result_messages", 0) - 1) for c in cases),
        # photos per classifier pass, as each case saw it (1 everywhere: no batching)
        "classifier_batch_photos": {"p50": _pct(batched, 50), "max": _pct(batched, 100)} if batched else None,
        "end_to_end_s": {
            "last_answer_to_result": {"p50": _pct(e2e, 50), "p95": _pct(e2e, 95), "max": _pct(e2e, 100)},
            "result_to_pictures": {"p50": _pct(pictures, 50), "p95": _pct(pictures, 95), "max": _pct(pictures, 100)},
            "last_answer_to_pictures": {"p50": _pct(picture_wait, 50), "p95": _pct(picture_wait, 95)},
        },
        "stages_s": {name: {"p50": _pct(v, 50), "p95": _pct(v, 95), "mean": round(statistics.fmean(v), 3),
                            "n": len(v)} for name, v in stages.items()},
    }


def _process_env(folder: Path, services: dict[str, str], **extra: str) -> dict[str, str]:
    """The environment of the processes a run starts: this one's, less its own clinic's settings, on ``folder``."""
    env = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
    env.update(services)
    env.update({"SKINBRIDGE_VAR_DIR": str(folder), "SKINBRIDGE_PROFILE": "embedded",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
                **extra})
    return env


# settings (environment variables) that shape the pipeline's pace: a rerun needs them as they were
PACE_SETTINGS = ("SKINBRIDGE_BATCH_WINDOW_MS", "SKINBRIDGE_BATCH_SLOTS", "SKINBRIDGE_BOT_CONCURRENCY",
                 "SKINBRIDGE_BOT_MAX_RATE")


def _command() -> str:
    """The command line that reruns this benchmark, with the pace settings set in the environment."""
    args = sys.argv[3:] if sys.argv[1:3] == ["bench", "pipeline"] else sys.argv[1:]
    env = "".join(f"{k}={os.environ[k]} " for k in PACE_SETTINGS if k in os.environ)
    return env + "skinbridge bench pipeline " + " ".join(args)


# --- the workers' pace: a backlog straight into the queue ------------------------------------------------------
def _backlog_cases(clinic: Any, n: int, first: int = 0) -> list[str]:
    """``n`` cases as the bot leaves them (consented patient, one photo, history complete), not yet submitted."""
    from clinic_db import cases, patients
    from inference.pipeline import mark_history_complete
    from inference.quality import sanitize

    ids = []
    with clinic.session() as session:
        for i in range(first, first + n):  # a patient and a photo of their own each
            patient = patients.register(clinic, session, FIRST_USER + 10_000 + i, consent_version="bench")
            case = cases.open_case(clinic, session, patient)
            cases.add_image(clinic, session, case, sanitize(lesion_photo(i + 1)), source_ref=f"bench:{i}")
            mark_history_complete(session, case)
            ids.append(str(case.id))
        session.commit()
    return ids


def run_backlog(*, cases_n: int, shape: str, admin_url: str, redis_url: str, workers: int, timeout_s: float,
                echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    """Submit ``cases_n`` cases at once (no bot, no patients: nothing but the workers competes for the CPUs)
    and time how fast the workers write their results: the pipeline's capacity in cases per minute."""
    from sqlalchemy import func, select

    folder = Path(tempfile.mkdtemp(prefix="sb-bench-backlog-"))
    try:
        with _backing_services(shape, admin_url, redis_url, folder) as services:
            env = _process_env(folder, services)
            _prepare_clinic(env)
            from clinic_db.db import get_clinic
            from clinic_db.models import Case, OutboxMessage
            from inference.pipeline import submit_case

            clinic = get_clinic()
            procs = Processes(folder, env)
            try:
                from skinbridge.settings import get_settings

                for i in range(workers):  # as `skinbridge up` starts them (skinbridge.supervisor)
                    procs.start(f"worker{i}", "worker", "--queues", "gpu,cpu", *(["--beat"] if i == 0 else []),
                                env=get_settings().worker_env(workers))
                warm = _backlog_cases(clinic, 1)  # the workers have loaded their models once this is done
                submit_case(warm[0])

                def results(ids: list[str]) -> int:
                    with clinic.session() as session:
                        return session.scalar(select(func.count()).select_from(OutboxMessage).where(
                            OutboxMessage.dedup_key.in_([f"result:{c}" for c in ids])))

                _wait(lambda: results(warm) == 1, timeout_s, "the warm-up case's result", procs)
                time.sleep(5.0)  # every worker process up and idle (the warm-up case's pictures drawn)
                ids = _backlog_cases(clinic, cases_n, first=1)
                echo(f"{cases_n} cases submitted at once to {workers} worker process(es), shape {shape}")
                load_start, started = os.getloadavg(), time.time()
                for case_id in ids:
                    submit_case(case_id)
                _wait(lambda: results(ids) == cases_n, timeout_s, "every case's result", procs)
                with clinic.session() as session:
                    written = session.scalars(select(OutboxMessage.created_at).where(
                        OutboxMessage.dedup_key.in_([f"result:{c}" for c in ids]))).all()
                    failed = session.scalar(select(func.count()).select_from(Case).where(
                        Case.id.in_([uuid.UUID(c) for c in ids]), Case.status == "failed"))
                load_end = os.getloadavg()
            finally:
                procs.stop()
                clinic.dispose()
                get_clinic.cache_clear()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    span = max(_epoch(t) for t in written) - started
    return {
        "schema": SCHEMA + "#backlog",
        "command": _command(),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "shape": shape, "backlog": cases_n, "worker_processes": workers, "worker_env": _worker_env(workers),
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_at_start": [round(x, 2) for x in load_start],
                    "loadavg_at_end": [round(x, 2) for x in load_end]},
        "models": _models(),
        "failed": failed, "drain_s": round(span, 2), "cases_per_minute": round(60 * cases_n / span, 1),
    }


# --- the run ---------------------------------------------------------------------------------------------------
def run_benchmark(*, patients: int, shape: str, admin_url: str, redis_url: str, workers: int, timeout_s: float,
                  poll_s: float, rounds: int = 1, keep: Path | None = None, echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="sb-bench-pipeline-"))
    load_before = os.getloadavg()
    started = time.time()
    try:
        with _backing_services(shape, admin_url, redis_url, folder) as services:
            port = _free_port()
            emulator = f"http://127.0.0.1:{port}"
            env = _process_env(folder, services, SKINBRIDGE_TELEGRAM_BASE_URL=f"{emulator}/bot",
                               SKINBRIDGE_TELEGRAM_BASE_FILE_URL=f"{emulator}/file/bot")
            _prepare_clinic(env)
            procs = Processes(folder, env)
            try:
                procs.start("emulator", "sandbox", "--port", str(port))
                _wait(lambda: httpx.get(f"{emulator}/_emulator/calls", timeout=5).status_code == 200, 60,
                      "the emulator", procs)
                from skinbridge.settings import get_settings

                for i in range(workers):  # the first runs beat (the sweeper), as `skinbridge up` does
                    procs.start(f"worker{i}", "worker", "--queues", "gpu,cpu", *(["--beat"] if i == 0 else []),
                                env=get_settings().worker_env(workers))
                procs.start("bot", "bot")
                _wait(lambda: httpx.get(f"{emulator}/_emulator/calls", params={"method": "getUpdates"},
                                        timeout=5).json(), 120, "the bot's first poll", procs)
                echo(f"processes up; warm-up patient (shape {shape}, {workers} worker process(es))")
                warm = Patient(emulator, WARMUP_USER, lesion_photo(0), poll_s)
                warm.consult()
                if warm.error:
                    raise click.ClickException(f"warm-up patient: {warm.error}\n{procs.log('bot')}")
                _wait(lambda: _deliveries(emulator).get(WARMUP_USER, {}).get("result"), timeout_s,
                      "the warm-up patient's result", procs)
                drawable = _drawable_codes()
                if _pictures_expected(WARMUP_USER, drawable):
                    _wait(lambda: _deliveries(emulator).get(WARMUP_USER, {}).get("pictures"), timeout_s,
                          "the warm-up patient's pictures", procs)
                load_start, load_start_at = os.getloadavg(), time.time()
                cpu_start = _cpu_seconds(procs)
                # whether a patient gets pictures is fixed once their result is out: asked once, not every poll
                expected: dict[int, bool] = {}

                def pictures_expected(user_id: int) -> bool:
                    if user_id not in expected:
                        expected[user_id] = _pictures_expected(user_id, drawable)
                    return expected[user_id]

                crowd: list[Patient] = []
                results_at: list[tuple[float, dict[str, float]]] = []
                for r in range(rounds):  # each round starts once the previous one has everything
                    echo(f"{patients} patient(s) at once" + (f", round {r + 1} of {rounds}" if rounds > 1 else ""))
                    group = [Patient(emulator, FIRST_USER + r * patients + i, lesion_photo(r * patients + i + 1),
                                     poll_s) for i in range(patients)]
                    crowd += group
                    threads = [threading.Thread(target=p.consult, daemon=True) for p in group]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join(timeout=timeout_s)

                    def all_done() -> bool:
                        seen = _deliveries(emulator)
                        if rounds == 1 and not results_at and all(
                                p.error or seen.get(p.user_id, {}).get("result") for p in crowd):
                            results_at.append((time.time(), _cpu_seconds(procs)))  # the CPU the results took

                        def done(p: Patient) -> bool:
                            got = seen.get(p.user_id, {})
                            return bool(p.error) or bool(got.get("result")) and (
                                bool(got.get("pictures")) or not pictures_expected(p.user_id))

                        return all(done(p) for p in group)

                    try:
                        _wait(all_done, timeout_s, "every patient's result and pictures", procs)
                    except click.ClickException as exc:
                        echo(f"WARNING: {exc.message}; reporting what arrived")
                    time.sleep(1.0)  # a duplicate result would show up in the sender's next round
                load_end = os.getloadavg()
                cpu = _cpu_report(cpu_start, load_start_at, results_at[0] if results_at else None)
                from clinic_db.db import get_clinic

                seen = _deliveries(emulator)
                empty: dict[str, list[float]] = {"result": [], "pictures": [], "progress": []}
                records = [_case_record(get_clinic(), p.user_id, p, seen.get(p.user_id, empty)) for p in crowd]
                for record, p in zip(records, crowd):
                    record["pictures_expected"] = pictures_expected(p.user_id)
                warm_record = _case_record(get_clinic(), WARMUP_USER, warm, seen.get(WARMUP_USER, empty))
                intake = _bot_intake(get_clinic(), load_start_at)
            finally:
                procs.stop()
                from clinic_db.db import get_clinic

                get_clinic().dispose()
                get_clinic.cache_clear()
                if keep is not None:
                    shutil.copytree(folder, keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    from skinbridge.settings import get_settings

    return {
        "schema": SCHEMA,
        "command": _command(),
        "started": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "shape": shape, "patients": patients, "rounds": rounds, "worker_processes": workers,
        "worker_env": _worker_env(workers),
        "batching": {"window_ms": get_settings().batch_window_ms, "slots": get_settings().batch_slots}
        if get_settings().batch_window_ms > 0 else None,
        "machine": {"cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_at_start": [round(x, 2) for x in load_start],
                    "loadavg_at_end": [round(x, 2) for x in load_end]},
        "models": _models(),
        "summary": summarise(records),
        "cpu_until_last_result": cpu,
        "bot_intake": intake,
        "warmup": {"segments": _segments(warm_record) if "t" in warm_record else {}, **warm_record},
        "cases": records,
    }


def _worker_env(workers: int) -> dict[str, str]:
    """The settings each worker process got beyond the run's own (its share of the cores)."""
    from skinbridge.settings import get_settings

    return {"SKINBRIDGE_TORCH_THREADS": str(get_settings().torch_threads)} if get_settings().torch_threads \
        else get_settings().worker_env(workers)


def _expects_pictures() -> bool:
    from skinbridge.settings import get_settings

    return get_settings().explanation_images > 0


def _drawable_codes() -> set[str]:
    """Conditions the served generator draws (all approved by _prepare_clinic); empty without pictures."""
    from inference.engines.clinical_review import generator_subject
    from inference.engines.paths import DEFAULT_GENERATOR
    from skinbridge.settings import get_settings

    settings = get_settings()
    if not _expects_pictures() or settings.sd_path is not None:
        return set()
    return set(generator_subject(settings.generator_path or DEFAULT_GENERATOR).codes)


def _pictures_expected(user_id: int, drawable: set[str]) -> bool:
    """Whether this patient's case gets example pictures: only when its top condition is one the generator
    draws and likely enough (inference.tasks); a patient whose result names another gets none, by design."""
    from sqlalchemy import select

    from clinic_db import cases, patients
    from clinic_db.db import get_clinic
    from clinic_db.models import Case
    from inference.tasks import sure_enough_for_pictures

    clinic = get_clinic()
    with clinic.session() as session:
        row = patients.find_by_telegram(clinic, session, user_id)
        case = session.scalar(select(Case).where(Case.patient_id == row.id)) if row is not None else None
        preferred = cases.preferred_result(session, case) if case is not None else None
        return preferred is None or (preferred.top_condition_code in drawable and sure_enough_for_pictures(preferred))


def _models() -> dict[str, Any]:
    from inference.engines.paths import DEFAULT_CLASSIFIER, DEFAULT_GENERATOR
    from skinbridge.settings import get_settings

    s = get_settings()
    return {"classifier": str(s.classifier_path or DEFAULT_CLASSIFIER),
            "generator": str(s.generator_path or DEFAULT_GENERATOR),
            "vlm": str(s.vlm_path) if s.vlm_path else None, "sd": str(s.sd_path) if s.sd_path else None,
            "device": s.device, "explanation_images": s.explanation_images}


def print_report(report: dict[str, Any], echo: Callable[[str], None] = click.echo) -> None:
    s = report["summary"]
    e2e = s["end_to_end_s"]
    m = report["machine"]
    rounds = f" x {report['rounds']} rounds" if report.get("rounds", 1) > 1 else ""
    echo(f"{report['patients']} patient(s){rounds}, shape {report['shape']}, {report['worker_processes']} worker process(es); "
         f"load average at start {m['loadavg_at_start'][0]}, at end {m['loadavg_at_end'][0]} "
         f"({m['usable_cpus']} CPUs)")
    echo(f"cases with a result: {s['with_result']}/{s['cases']}, with pictures: {s['with_pictures']} "
         f"(of {s.get('expecting_pictures')} whose condition the generator draws), "
         f"duplicated results: {s['duplicated_results']}, results per minute: {s['results_per_minute']}")
    if report.get("batching"):
        passes = s.get("classifier_batch_photos") or {}
        echo(f"batching: window {report['batching']['window_ms']} ms, {report['batching']['slots']} slots; photos per "
             f"classifier pass p50 {passes.get('p50')}, max {passes.get('max')}")
    for name, v in e2e.items():
        echo(f"  {name:28s} p50 {v['p50']} s  p95 {v['p95']} s")
    if cpu := report.get("cpu_until_last_result"):
        echo(f"  CPU from the crowd's start to its last result ({cpu['window_s']} s, {cpu['cores_busy']} cores busy): "
             + ", ".join(f"{k} {v} s" for k, v in sorted(cpu["seconds"].items(), key=lambda kv: -kv[1])))
    intake = report.get("bot_intake") or {}
    if intake.get("handled_per_s"):
        echo(f"  bot: {intake['handled']} updates at {intake['handled_per_s']}/s, stored -> handled p50 "
             f"{intake['stored_to_handled_s']['p50']} s, p95 {intake['stored_to_handled_s']['p95']} s")
    echo("  stage                          p50 s    p95 s")
    for name, v in s["stages_s"].items():
        echo(f"  {name:30s} {v['p50']!s:>7}  {v['p95']!s:>7}")


@click.command("pipeline")
@click.option("--patients", type=click.IntRange(1, 200), default=1, show_default=True,
              help="Patients who consult at once (after one warm-up patient).")
@click.option("--shape", type=click.Choice(["embedded", "redis"]), default="embedded", show_default=True,
              help="embedded: SQLite + filesystem broker; redis: PostgreSQL + Redis.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the full record (every case's timestamps) here.")
@click.option("--workers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="`skinbridge worker` processes.")
@click.option("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", show_default=True,
              help="redis shape: a server where a fresh database is created (and dropped afterwards).")
@click.option("--redis-url", default="redis://127.0.0.1:6379", show_default=True,
              help="redis shape: the server; an empty db number (14 down to 1) is used and flushed afterwards.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Seconds to wait for the patients' results.")
@click.option("--poll", "poll_s", type=float, default=0.2, show_default=True,
              help="How often a played patient looks for the bot's next question (does not enter the timings).")
@click.option("--rounds", type=click.IntRange(1, 200), default=1, show_default=True,
              help="Groups of --patients played one after another (each once the last has everything): "
                   "with --patients 1, a p95 for one patient alone.")
@click.option("--backlog", type=click.IntRange(1, 5000), default=None,
              help="Instead of patients: this many cases submitted at once straight to the queue (no bot), "
                   "timed until every result is written: the workers' capacity in cases per minute.")
def bench_pipeline(patients: int, shape: str, json_path: Path | None, workers: int, postgres_url: str,
                   redis_url: str, timeout_s: float, poll_s: float, rounds: int, backlog: int | None) -> None:
    """Time a consultation through the real processes, stage by stage (last answer -> result -> pictures)."""
    if backlog is not None:
        report = run_backlog(cases_n=backlog, shape=shape, admin_url=postgres_url, redis_url=redis_url,
                             workers=workers, timeout_s=timeout_s)
        click.echo(f"{backlog} cases drained in {report['drain_s']} s: {report['cases_per_minute']} cases per minute, "
                   f"{report['failed']} failed (load average {report['machine']['loadavg_at_start'][0]} -> "
                   f"{report['machine']['loadavg_at_end'][0]})")
    else:
        report = run_benchmark(patients=patients, shape=shape, admin_url=postgres_url, redis_url=redis_url,
                               workers=workers, timeout_s=timeout_s, poll_s=poll_s, rounds=rounds)
        print_report(report)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {json_path}")
    if (report["failed"] if backlog is not None else report["summary"]["with_result"] < report["patients"]):
        sys.exit(1)


# --- the picture of where the time goes ---------------------------------------------------------------
def plot_stages(reports: list[tuple[str, dict[str, Any]]], out: Path) -> None:
    """A stacked bar per run: the median of each stage, last answer -> result -> pictures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    for _, report in reports:
        for name in report["summary"]["stages_s"]:
            if name not in names:
                names.append(name)
    # the chain's order: the bot, the broker and the tasks, the outbox, then the pictures
    first = ("bot: fetch + store update", "bot: handle + submit", "broker wait (hops)")
    last = ("outbox: wait + send result", "pictures after the result")
    names = [n for n in first if n in names] + [n for n in names if n not in first + last] \
        + [n for n in last if n in names]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.7 * len(reports)))
    colours = plt.get_cmap("tab20").colors
    for row, (label, report) in enumerate(reports):
        left = 0.0
        for i, name in enumerate(names):
            value = (report["summary"]["stages_s"].get(name) or {}).get("p50") or 0.0
            ax.barh(row, value, left=left, color=colours[i % len(colours)], label=name if row == 0 else None,
                    edgecolor="white", linewidth=0.5)
            left += value
        e2e = report["summary"]["end_to_end_s"]
        after = e2e["result_to_pictures"]["p50"]
        pictures = f"pictures +{after} s" if after and after > 0 else "pictures sent with it"
        ax.text(left, row, f"  result {e2e['last_answer_to_result']['p50']} s, {pictures} (p50)", va="center",
                fontsize=8)
    ax.set_yticks(range(len(reports)), [label for label, _ in reports])
    ax.invert_yaxis()
    ax.set_xlabel("seconds after the patient's last answer (the median of each stage, stacked)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=130, bbox_inches="tight")


if __name__ == "__main__":  # python -m inference.bench_pipeline plot OUT.png LABEL=run.json ...
    if len(sys.argv) < 4 or sys.argv[1] != "plot":
        raise SystemExit("usage: python -m inference.bench_pipeline plot OUT.png LABEL=run.json [LABEL=run.json ...]")
    runs = [(label, json.loads(Path(path).read_text())) for label, _, path in (a.partition("=") for a in sys.argv[3:])]
    plot_stages(runs, Path(sys.argv[2]))
