"""Several API processes serve one deployment: `skinbridge api --workers N` processes on two ports,
sharing only the database. A client assertion replayed against the other process is refused."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from clinic_db import heartbeat
from fhir.bench import child_processes
from fhir.smart import register_client
from tests.support import free_port, wait_for
from tests.test_fhir_support import ASSERTION_TYPE, make_case, rsa_key

REPO = Path(__file__).resolve().parent.parent
PUBLIC = "https://skinbridge.example.org"


@contextlib.contextmanager
def api_process(workers: int, log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SKINBRIDGE_PUBLIC_BASE_URL": PUBLIC}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "skinbridge", "api", "--port", str(port),
                                 "--workers", str(workers)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(base + "/healthz", timeout=2).status_code == 200
        return False

    try:
        wait_for(ready, timeout=90, interval=0.2, message=f"skinbridge api on {port}")
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_two_api_processes_share_the_replay_cache_and_tokens(clinic, tmp_path):
    key = rsa_key()
    client_id = register_client(clinic, "EHR", {"keys": [key.public_jwk]}, ["system/*.rs"])
    with clinic.session() as s:
        case = make_case(clinic, s, 4001)
    with api_process(2, tmp_path / "a.log") as (a, proc_a), api_process(1, tmp_path / "b.log") as (b, _):
        wait_for(lambda: len(child_processes(proc_a.pid)) >= 2, timeout=60, message="two worker processes")
        # every serving process beats: `skinbridge check --liveness api` sees three
        wait_for(lambda: len(heartbeat.alive(clinic, "api")) == 3, timeout=30, message="three API heartbeats")
        check = subprocess.run([sys.executable, "-m", "skinbridge", "check", "--liveness", "api"], cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and "3 live process(es)" in check.stdout, check.stdout + check.stderr
        # one assertion, addressed to the public token URL that both processes answer for
        assertion = key.assertion(client_id, PUBLIC + "/auth/token")
        form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": assertion, "scope": "system/*.rs"}
        first = httpx.post(a + "/auth/token", data=form, timeout=30)
        assert first.status_code == 200, first.text
        replay = httpx.post(b + "/auth/token", data=form, timeout=30)
        assert replay.status_code == 401 and "replay" in replay.json()["error_description"], replay.text
        # ... and again at the first process, whichever of its workers answers
        again = httpx.post(a + "/auth/token", data=form, timeout=30)
        assert again.status_code == 401, again.text

        # a token from one process works at the other (signing key derived from the shared key ring)
        h = {"Authorization": f"Bearer {first.json()['access_token']}"}
        read = httpx.get(f"{b}/fhir/DiagnosticReport/{case.id}", headers=h, timeout=30)
        assert read.status_code == 200 and read.json()["id"] == str(case.id)
        bundle = httpx.get(f"{a}/fhir/DiagnosticReport", headers=h, timeout=30).json()
        assert bundle["entry"][0]["fullUrl"] == f"{PUBLIC}/fhir/DiagnosticReport/{case.id}"
    assert heartbeat.alive(clinic, "api") == []  # a clean shutdown removes the rows
    started = (tmp_path / "a.log").read_text()
    assert started.count("Started server process") >= 2, started[-2000:]


def test_a_connection_postgresql_dropped_costs_one_503_not_a_500(pg_clinic, tmp_path):
    """API processes run without pre-ping (settings.db_pre_ping): a pooled connection that PostgreSQL
    closed (restart, failover, idle timeout) fails the one request that meets it with 503 + Retry-After,
    an OperationOutcome the EHR retries; the pool is rebuilt and the next request is served."""
    from sqlalchemy import text

    key = rsa_key()
    client_id = register_client(pg_clinic, "EHR", {"keys": [key.public_jwk]}, ["system/*.rs"])
    with pg_clinic.session() as s:
        case = make_case(pg_clinic, s, 4002)
    database = pg_clinic.engine.url.database
    with api_process(1, tmp_path / "api.log") as (base, _):
        form = {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": key.assertion(client_id, PUBLIC + "/auth/token"), "scope": "system/*.rs"}
        token = httpx.post(base + "/auth/token", data=form, timeout=30).json()["access_token"]
        h = {"Authorization": f"Bearer {token}"}
        url = f"{base}/fhir/DiagnosticReport/{case.id}"
        assert httpx.get(url, headers=h, timeout=30).status_code == 200

        pg_clinic.dispose()
        with pg_clinic.engine.connect() as conn:  # what a PostgreSQL restart does to the API's pool
            dropped = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                        "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database}).scalar()
        assert dropped >= 1

        after = httpx.get(url, headers=h, timeout=30)
        assert after.status_code == 503, after.text
        assert after.headers["retry-after"] == "1"
        assert after.json()["resourceType"] == "OperationOutcome"
        assert after.json()["issue"][0]["code"] == "transient"
        again = httpx.get(url, headers=h, timeout=30)
        assert again.status_code == 200 and again.json()["id"] == str(case.id)
    assert "database unavailable" in (tmp_path / "api.log").read_text()
