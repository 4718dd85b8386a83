"""Chaos suite (issue 24): patients consult while processes die; nothing is lost, nothing is doubled.

Real parts only: the Telegram emulator (in this process), the bot and a Celery worker as separate
processes with tiny models, on the embedded shape (SQLite + the filesystem broker) and on the
production shape (PostgreSQL + Redis). Several patients go through consent, photo and the eight
history questions at once, each in its own thread. Once half of them are half-way through the
questions, the test SIGKILLs the bot and the whole worker (pool and beat), restarts the Redis broker
(a server the test starts on its own port, with no persistence: every queued task is gone), crashes
and restarts PostgreSQL (a cluster the test makes with initdb), or rotates the master key with
--retire; the half-way patients send their other answers into the breakage. Each scenario reports
lost (no result), duplicated (more than one result message) and stuck cases (not preliminary/in
review) — all must be 0 — and the time from the restart to the last result, written to
test-artifacts/chaos-*.json. Last, the API is SIGKILLed right after answering an EHR's reads: every
answered read has its audit record.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from clinic_db import patients
from clinic_db.models import Case, OutboxMessage, Patient
from clinic_db.states import CaseStatus
from tests.e2e_support import HISTORY, REPO, Chat, System, answer_history, consent, running_system, \
    tiny_model_env
from tests.support import free_port, wait_for
from tests.test_bot_conversation import lesion_photo

pytestmark = pytest.mark.slow

PATIENTS = 6
DONE = {CaseStatus.preliminary.value, CaseStatus.in_review.value}
RECOVERY_S = 240.0  # worker restart (torch import, tiny models) plus the sweeper, on a busy 2-core machine
# short sweeper clock so a lost step is found within seconds, not the production default (120 s)
FAST_SWEEPER = {"SKINBRIDGE_SWEEPER_INTERVAL_S": "1", "SKINBRIDGE_STUCK_AFTER_S": "6"}


class _Load:
    """Where the patients are: how many are half-way through the questions, and the signal that the
    chaos has struck, which the half-way patients wait for before they answer the rest. Counting
    (rather than looking for question buttons on screen, which vanish once answered) cannot miss
    patients who are quicker than the poll."""

    def __init__(self) -> None:
        self.halfway = 0
        self.lock = threading.Lock()
        self.struck = threading.Event()
        self.errors: list[BaseException] = []

    def reached_halfway(self) -> None:
        with self.lock:
            self.halfway += 1


def _consult(chat: Chat, load: _Load) -> None:
    fields = list(HISTORY)
    first, rest = fields[:len(fields) // 2], fields[len(fields) // 2:]
    try:
        consent(chat)
        chat.photo(lesion_photo(chat.user_id % 97))
        saved = chat.expect_text("saved", timeout=60)
        chat.tap(saved, "photos:done")
        answer_history(chat, {f: HISTORY[f] for f in first})
        load.reached_halfway()
        # the rest of the answers reach the bot while things are broken
        load.struck.wait(timeout=RECOVERY_S)
        answer_history(chat, {f: HISTORY[f] for f in rest})
    except BaseException as exc:  # noqa: BLE001 - reported by the main thread
        load.errors.append(exc)


def _patients(emulator: str, first_id: int) -> list[Chat]:
    chats = [Chat(emulator, first_id + i) for i in range(PATIENTS)]
    for chat in chats:  # a patient waiting on the bot's answer waits through a bot restart too
        chat.http.timeout = 60
    return chats


def _result_messages(chat: Chat) -> int:
    """The preliminary result is the one message with the 'ask a dermatologist' button."""
    return sum("c:doc:" in json.dumps(m.get("reply_markup") or {}) for m in chat.messages())


def _report(clinic, chats: list[Chat], name: str, recovery_s: float) -> dict:  # type: ignore[no-untyped-def]
    clinic.engine.dispose()  # the test's own pooled connections may predate a database restart (no pre-ping)
    with clinic.session() as session:
        cases = session.scalars(select(Case)).all()
        results = session.scalars(select(OutboxMessage).where(OutboxMessage.kind == "result")).all()
        statuses = [c.status for c in cases]
    per_chat = [_result_messages(chat) for chat in chats]
    report = {
        "scenario": name, "patients": len(chats), "cases": len(statuses),
        "lost": sum(n == 0 for n in per_chat),
        "duplicated": sum(max(0, n - 1) for n in per_chat) + max(0, len(results) - len({r.case_id for r in results})),
        "stuck": sum(s not in DONE for s in statuses),
        "failed": sum(s == CaseStatus.failed.value for s in statuses),
        "recovery_s": round(recovery_s, 1),
    }
    out = REPO / "test-artifacts"
    out.mkdir(exist_ok=True)
    (out / f"chaos-{name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return report


def _run(clinic, system: System, first_id: int, name: str, chaos: Callable[[], Callable[[], None]]) -> None:  # type: ignore[no-untyped-def]
    """Start the patients, let ``chaos()`` break things mid-load (it returns the repair), repair, and
    wait until every patient has exactly one result."""
    chats = _patients(system.emulator, first_id)
    load = _Load()
    threads = [threading.Thread(target=_consult, args=(chat, load), daemon=True) for chat in chats]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    # break things once the load is under way: half the patients are half-way through the questions
    wait_for(lambda: load.halfway >= PATIENTS // 2 or load.errors, timeout=120, interval=0.1,
             message="patients half-way through the questions")
    repair = chaos()
    load.struck.set()
    repair()
    restarted = time.monotonic()
    for thread in threads:
        thread.join(timeout=RECOVERY_S)
    assert not load.errors, f"a patient's conversation broke: {load.errors[0]!r}\n{system.logs()}"
    try:
        wait_for(lambda: all(_result_messages(c) >= 1 for c in chats), timeout=RECOVERY_S,
                 message="a result for every patient")
    finally:
        recovery = time.monotonic() - restarted
    time.sleep(3)  # a duplicate would arrive within the sender's next rounds
    report = _report(clinic, chats, name, recovery)
    assert (report["lost"], report["duplicated"], report["stuck"], report["failed"]) == (0, 0, 0, 0), \
        f"{report}\n{system.logs()}"


def _kill_bot_and_worker(system: System) -> Callable[[], Callable[[], None]]:
    def chaos() -> Callable[[], None]:
        system.bot.kill()
        system.worker.kill_all()

        def repair() -> None:
            time.sleep(1.0)
            system.worker.start()
            system.bot.start(system.emulator)

        return repair

    return chaos


# --- the embedded shape -------------------------------------------------------------------------
@pytest.fixture
def embedded(clinic, tmp_path: Path) -> Iterator[System]:  # type: ignore[no-untyped-def]
    env = {**tiny_model_env(tmp_path / "models", clinic), **FAST_SWEEPER}
    with running_system(tmp_path, env, web=False) as running:
        yield running


def test_embedded_bot_and_worker_killed_mid_load(clinic, embedded: System) -> None:  # type: ignore[no-untyped-def]
    _run(clinic, embedded, 5100, "embedded-kill", _kill_bot_and_worker(embedded))


def test_embedded_key_rotation_with_retire_under_load(clinic, embedded: System) -> None:  # type: ignore[no-untyped-def]
    """`keys rotate --retire` while patients register (new data keys) and the worker reads their photos:
    every process takes up the new key, the old one is deleted, and no patient's data becomes unreadable."""
    old_kid = clinic.vault.keyring.active_kid
    rotation: list[subprocess.CompletedProcess] = []

    def chaos() -> Callable[[], None]:
        rotation.append(subprocess.run([sys.executable, "-m", "skinbridge", "keys", "rotate", "--retire"],
                                       env=embedded.bot.env, cwd=REPO, capture_output=True, text=True, timeout=180))
        return lambda: None

    _run(clinic, embedded, 5400, "embedded-rotate-retire", chaos)
    assert rotation[0].returncode == 0, rotation[0].stdout + rotation[0].stderr
    assert old_kid in rotation[0].stdout  # named as retired
    clinic.vault.keyring.reload()
    assert old_kid not in clinic.vault.keyring.masters
    with clinic.session() as session:  # every patient's wrapped data key opens under the remaining key
        for patient in session.scalars(select(Patient)):
            assert patients.telegram_id(clinic, session, patient) >= 5400


# --- the production shape ---------------------------------------------------------------------------
@contextlib.contextmanager
def own_redis(port: int) -> Iterator[Callable[[], subprocess.Popen]]:
    """A redis-server of this test's own (no persistence), restartable on the same port."""
    binary = shutil.which("redis-server")
    if binary is None:
        from tests.conftest import service_missing

        service_missing("redis-server", "not installed")
    procs: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                 "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        procs.append(proc)
        import redis

        wait_for(lambda: _pings(redis.Redis(port=port)), timeout=20, message="redis-server up")
        return proc

    try:
        yield start
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def _pings(client) -> bool:  # type: ignore[no-untyped-def]
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def production(pg_clinic, tmp_path: Path) -> Iterator[tuple[System, Callable[[], subprocess.Popen], list]]:  # type: ignore[no-untyped-def]
    port = free_port()
    with own_redis(port) as start_redis:
        servers = [start_redis()]
        env = {**tiny_model_env(tmp_path / "models", pg_clinic), **FAST_SWEEPER,
               "SKINBRIDGE_BROKER_URL": f"redis://127.0.0.1:{port}/0"}
        with running_system(tmp_path, env, web=False) as running:
            yield running, start_redis, servers


def test_production_bot_and_worker_killed_mid_load(pg_clinic, production) -> None:  # type: ignore[no-untyped-def]
    system, _, _ = production
    _run(pg_clinic, system, 5200, "production-kill", _kill_bot_and_worker(system))


def test_production_broker_restart_loses_no_case(pg_clinic, production) -> None:  # type: ignore[no-untyped-def]
    system, start_redis, servers = production

    def chaos() -> Callable[[], None]:
        servers[-1].kill()  # every queued task and the worker's connection are gone
        servers[-1].wait(timeout=10)

        def repair() -> None:
            time.sleep(3.0)
            servers.append(start_redis())

        return repair

    _run(pg_clinic, system, 5300, "production-broker-restart", chaos)


# --- a PostgreSQL restart ---------------------------------------------------------------------------
class OwnPostgres:
    """A PostgreSQL cluster of this test's own (initdb + pg_ctl as the postgres user, its own port and
    folder), so the test can crash and restart it without touching the machine's server."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        runuser = shutil.which("runuser")
        if not bins or runuser is None:
            from tests.conftest import service_missing

            service_missing("PostgreSQL server binaries (initdb, pg_ctl)", "not installed")
        self.bin = bins[-1].parent
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="sb-chaos-pg-"))
        shutil.chown(self.folder, "postgres")
        self.data = self.folder / "data"
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"), "-w",
                          "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1", "start")

    def crash(self) -> None:
        """Immediate shutdown: no checkpoint, every connection cut, as in a crash."""
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def remove(self) -> None:
        with contextlib.suppress(Exception):
            self.crash()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    server.start()
    try:
        yield server
    finally:
        server.remove()


def test_postgres_crash_and_restart_mid_load(clinic_on, own_postgres: OwnPostgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    clinic = clinic_on(own_postgres.url)
    env = {**tiny_model_env(tmp_path / "models", clinic), **FAST_SWEEPER}
    with running_system(tmp_path, env, web=False) as system:
        def chaos() -> Callable[[], None]:
            own_postgres.crash()

            def repair() -> None:
                time.sleep(3.0)
                own_postgres.start()

            return repair

        _run(clinic, system, 5500, "postgres-restart", chaos)


# --- the API ------------------------------------------------------------------------------------
def test_api_killed_after_answering_loses_no_audit_record(clinic, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An EHR pulls reports; the API process is SIGKILLed right after answering. Every read it answered
    has its audit record (written in the read's own transaction before the answer), and a new API
    process serves the same token."""
    import httpx

    from clinic_db.models import AuditEvent
    from fhir.smart import register_client
    from tests.test_fhir_processes import PUBLIC, api_process
    from tests.test_fhir_support import ASSERTION_TYPE, make_case, rsa_key

    key = rsa_key()
    client_id = register_client(clinic, "EHR", {"keys": [key.public_jwk]}, ["system/*.rs"])
    with clinic.session() as s:
        case = make_case(clinic, s, 4101)
    form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": key.assertion(client_id, PUBLIC + "/auth/token"), "scope": "system/*.rs"}
    answered = 0
    with api_process(1, tmp_path / "api-1.log") as (base, proc):
        token = httpx.post(base + "/auth/token", data=form, timeout=30).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=base, headers=headers, timeout=30) as ehr:
            for _ in range(25):
                assert ehr.get(f"/fhir/DiagnosticReport/{case.id}").status_code == 200
                answered += 1
        proc.kill()  # SIGKILL: no shutdown hook, nothing flushed after the last answer
        proc.wait(timeout=10)
    with clinic.session() as s:
        audited = s.scalars(select(AuditEvent).where(AuditEvent.action == "fhir.read",
                                                     AuditEvent.entity_id == str(case.id))).all()
    assert len(audited) >= answered, (len(audited), answered)
    with api_process(1, tmp_path / "api-2.log") as (base, _):
        again = httpx.get(f"{base}/fhir/DiagnosticReport/{case.id}", headers=headers, timeout=30)
        assert again.status_code == 200 and again.json()["id"] == str(case.id)
