"""``skinbridge bench fhir``: seed a throwaway database, serve it with ``skinbridge api --workers N``
and measure reads and EHR-style searches at several client counts.

The load generator is a minimal asyncio HTTP/1.1 keep-alive client in this process (one connection
per client, closed loop), so it costs the server's machine little; it still shares the machine, and
the load average printed beside every figure says how busy the machine was. Every request is a real
authorised FHIR request, audited like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import click

READ, SEARCH = "read", "search"


# --- seeding --------------------------------------------------------------------------------------
def _report(rid: str, patient_id: uuid.UUID, when: datetime, n: int) -> dict[str, Any]:
    """A DiagnosticReport shaped like the ones fhir.mapping publishes (same elements and sizes)."""
    snomed = "http://snomed.info/sct"
    return {
        "resourceType": "DiagnosticReport", "id": rid,
        "meta": {"security": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                               "code": "AIAST", "display": "Artificial Intelligence asserted"}]},
        "identifier": [{"system": "urn:skinbridge:case", "value": rid}],
        "status": "final" if n % 3 else "preliminary",
        "category": [{"coding": [{"system": snomed, "code": "394582007", "display": "Dermatology"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "11488-4", "display": "Consult note"}],
                 "text": "Teledermatology assessment"},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when.isoformat().replace("+00:00", "Z"),
        "issued": (when + timedelta(hours=2)).isoformat().replace("+00:00", "Z"),
        "performer": [{"reference": "Organization/skinbridge", "display": "SkinBridge"}],
        "result": [{"reference": f"Observation/{rid}-{i}"} for i in (1, 2, 3)],
        "media": [{"link": {"reference": f"Media/{uuid.uuid4()}"}}],
        "conclusion": "Preliminary AI assessment - not a diagnosis. Most likely: melanocytic nevus (71 %); "
                      "also considered: seborrheic keratosis (20 %), melanoma (9 %).",
        "conclusionCode": [{"coding": [{"system": snomed, "code": "400010006", "display": "Melanocytic nevus"}]}],
        "presentedForm": [{"contentType": "application/pdf", "url": f"Binary/{rid}-report",
                           "title": "SkinBridge teledermatology report", "size": 48213}],
    }


def seed(size: int, patients_per_report: float = 0.25, batch: int = 500) -> dict[str, Any]:
    """``size`` DiagnosticReports for size*patients_per_report patients into the configured (empty) DB."""
    from clinic_db import patients
    from clinic_db.db import get_clinic
    from fhir.publish import store

    clinic = get_clinic()
    n_patients = max(1, int(size * patients_per_report))
    start = datetime(2025, 1, 1, tzinfo=timezone.utc)
    rng = random.Random(20)
    patient_ids: list[uuid.UUID] = []
    with clinic.session() as session:
        for i in range(n_patients):
            patient_ids.append(patients.register(clinic, session, 9_000_000_000 + i, consent_version="bench").id)
            if i % batch == batch - 1:
                session.commit()
        session.commit()
        report_ids = []
        for n in range(size):
            rid = str(uuid.uuid4())
            pid = patient_ids[n % n_patients]
            store(clinic, session, _report(rid, pid, start + timedelta(minutes=rng.randrange(0, 525_600)), n),
                  patient_id=pid, case_id=uuid.UUID(rid))
            report_ids.append(rid)
            if n % batch == batch - 1:
                session.commit()
        session.commit()
    return {"reports": report_ids, "patients": [str(p) for p in patient_ids]}


# --- the server ----------------------------------------------------------------------------------
def child_processes(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


@contextlib.contextmanager
def api_server(workers: int, port: int, log: Path):  # type: ignore[no-untyped-def]
    import httpx

    cmd = [sys.executable, "-m", "skinbridge", "api", "--port", str(port), "--workers", str(workers)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise click.ClickException(f"the API did not start:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200 and \
                        (workers == 1 or len(child_processes(proc.pid)) >= workers):
                    break
            if time.monotonic() > deadline:
                raise click.ClickException("the API did not answer within 120 s")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def access_token(base: str) -> str:
    import httpx
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from clinic_db.db import get_clinic
    from fhir.smart import ASSERTION_TYPE, register_client

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
    jwk.update(kid="bench", alg="RS384")
    client_id = register_client(get_clinic(), "bench", {"keys": [jwk]}, ["system/*.rs"])
    now = int(time.time())
    assertion = jwt.encode({"iss": client_id, "sub": client_id, "aud": base + "/auth/token", "exp": now + 240,
                            "jti": uuid.uuid4().hex}, private, algorithm="RS384", headers={"kid": "bench"})
    resp = httpx.post(base + "/auth/token", data={"grant_type": "client_credentials", "scope": "system/*.rs",
                                                  "client_assertion_type": ASSERTION_TYPE,
                                                  "client_assertion": assertion}, timeout=30)
    resp.raise_for_status()
    return str(resp.json()["access_token"])


# --- the load generator ----------------------------------------------------------------------------
async def _client(port: int, paths: list[str], token: str, stop: float, latencies: list[float],
                  errors: list[int], rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nAccept: application/fhir+json\r\n\r\n"
    try:
        while time.monotonic() < stop:
            path = paths[rng.randrange(len(paths))]
            t0 = time.perf_counter()
            writer.write(f"GET {path} HTTP/1.1\r\n{head}".encode())
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            if status_line[9:12] != b"200":
                errors.append(int(status_line[9:12] or 0))
    finally:
        writer.close()


def run_load(port: int, paths: list[str], token: str, clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[int] = []

    async def main() -> None:
        stop = time.monotonic() + seconds
        await asyncio.gather(*(_client(port, paths, token, stop, latencies, errors, random.Random(i))
                               for i in range(clients)))

    before = _cpu_times()
    t0 = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - t0
    spent = [b - a for a, b in zip(before, _cpu_times())]
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))], 2) if ordered else 0.0

    return {"clients": clients, "requests": len(latencies), "errors": len(errors),
            "error_statuses": sorted(set(errors)), "seconds": round(elapsed, 2),
            "req_per_s": round(len(latencies) / elapsed, 1), "p50_ms": pct(0.50), "p95_ms": pct(0.95),
            "p99_ms": pct(0.99), "load_average_1m": round(os.getloadavg()[0], 2),
            # the share of CPU time the hypervisor gave to other machines: on a shared host the same
            # code measures slower while this is high
            "cpu_steal": round(spent[7] / sum(spent), 3) if len(spent) > 7 and sum(spent) else None}


def _cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal)."""
    try:
        with open("/proc/stat") as stat:
            return [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return []


def _search_paths(seeded: dict[str, Any], count: int = 300) -> list[str]:
    rng = random.Random(7)
    paths = []
    for _ in range(count):
        month = rng.randrange(1, 12)
        paths.append(f"/fhir/DiagnosticReport?patient={rng.choice(seeded['patients'])}"
                     f"&date=ge2025-{month:02d}-01&date=le2025-{month + 1:02d}-28&_count=50")
    return paths


def search_plan(seeded: dict[str, Any]) -> list[str]:
    """EXPLAIN of the benchmark's search (PostgreSQL), as the API runs it."""
    from sqlalchemy import text

    from clinic_db.db import get_clinic
    from fhir import search

    clinic = get_clinic()
    if clinic.engine.dialect.name != "postgresql":
        return []
    q = search.parse("DiagnosticReport", [("patient", seeded["patients"][0]), ("date", "ge2025-03-01"),
                                          ("date", "le2025-04-28"), ("_count", "50")])
    with clinic.session() as session:
        stmt = search.filtered(q, search.current_snapshot(session)).order_by(search.FhirResource.seq).limit(51)
        sql = str(stmt.compile(clinic.engine, compile_kwargs={"literal_binds": True}))
        return [row[0] for row in session.execute(text("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) " + sql))]


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput against clients, one line per operation (the median of the repeated runs, bars from the
    slowest to the fastest), load average written at each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for op in (READ, SEARCH):
        points = [r for r in report["results"] if r["operation"] == op]
        xs, ys = [r["clients"] for r in points], [r["req_per_s"] for r in points]
        runs = [r.get("req_per_s_runs") or [r["req_per_s"]] for r in points]
        spread = [[y - min(rs) for y, rs in zip(ys, runs)], [max(rs) - y for y, rs in zip(ys, runs)]]
        ax.errorbar(xs, ys, yerr=spread, marker="o", capsize=3,
                    label=f"{op} (p99 at {xs[-1]}: {points[-1]['p99_ms']:.0f} ms)")
        for r in points:
            ax.annotate(f"load {r['load_average_1m']:.1f}", (r["clients"], r["req_per_s"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s")
    ax.set_title(f"FHIR API, {report['database']}, {report['size']} reports, {report['workers']} API processes",
                 fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("fhir")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results here as JSON.")
@click.option("--size", type=click.IntRange(1), default=2000, show_default=True, help="DiagnosticReports seeded.")
@click.option("--seconds", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Measuring time per operation and client count.")
@click.option("--clients", default="1,8,32", show_default=True, help="Concurrent clients (comma list).")
@click.option("--repeat", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Measure each point this many times, the client counts taking turns; the median is reported.")
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="API processes (skinbridge api --workers). Default: the usable CPUs.")
@click.option("--database-url", default=None,
              help="An EMPTY database to seed (it is migrated and filled with synthetic patients). "
                   "Default: a new SQLite file in a temporary folder.")
@click.option("--port", type=int, default=None, help="Port for the API (default: a free one).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw throughput against clients into this PNG.")
def bench_fhir(json_path: Path | None, size: int, seconds: float, clients: str, repeat: int, workers: int | None,
               database_url: str | None, port: int | None, plot_path: Path | None) -> None:
    """Benchmark the FHIR API: reads of DiagnosticReport/{id} and searches by patient and date range."""
    import socket

    from sqlalchemy import func, select

    from clinic_db import db as clinic_db
    from clinic_db.migrate import upgrade
    from clinic_db.models import FhirResource
    from skinbridge.settings import get_settings, reset_settings_cache

    counts = [int(c) for c in clients.split(",") if c.strip()]
    workers = workers or len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="skinbridge-bench-") as tmp:
        url = database_url or f"sqlite:///{tmp}/bench.db"
        # a throwaway deployment: its own var dir and keys, never the configured clinic
        os.environ.update(SKINBRIDGE_VAR_DIR=tmp, SKINBRIDGE_DATABASE_URL=url, SKINBRIDGE_PROFILE="embedded")
        for name in ("SKINBRIDGE_KEY_DIR", "SKINBRIDGE_MASTER_KEY", "SKINBRIDGE_PUBLIC_BASE_URL"):
            os.environ.pop(name, None)
        reset_settings_cache()
        clinic_db.get_clinic.cache_clear()
        upgrade(url)
        with clinic_db.get_clinic().session() as session:
            if session.scalar(select(func.count()).select_from(FhirResource)):
                raise click.UsageError("--database-url must name an empty database (it gets synthetic data)")
        t0 = time.monotonic()
        seeded = seed(size)
        if clinic_db.get_clinic().engine.dialect.name == "postgresql":
            from sqlalchemy import text

            # statistics and visibility maps as autovacuum would leave them, and the seeding's dirty pages
            # written out now (a superuser may CHECKPOINT): neither then lands inside a measurement
            with clinic_db.get_clinic().engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE"))
                try:
                    conn.execute(text("CHECKPOINT"))
                except Exception:  # noqa: BLE001 - not a superuser: the bench goes on without
                    pass
        click.echo(f"seeded {size} reports for {len(seeded['patients'])} patients in {time.monotonic() - t0:.1f} s",
                   err=True)
        plan = search_plan(seeded)
        clinic_db.get_clinic().dispose()
        if port is None:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        results: list[dict[str, Any]] = []
        with api_server(workers, port, Path(tmp) / "api.log") as (base, proc):
            token = access_token(base)
            processes = 1 + len(child_processes(proc.pid))
            paths = {READ: [f"/fhir/DiagnosticReport/{r}" for r in seeded["reports"]],
                     SEARCH: _search_paths(seeded)}
            for op in (READ, SEARCH):
                run_load(port, paths[op], token, max(counts), min(2.0, seconds))  # warm-up
                # Repeated, the client counts taking turns: on this 2-core machine one 10-second point varies
                # by up to a factor of two from run to run (how the keep-alive connections fall on the
                # worker processes, PostgreSQL's background writes), so a single run compares nothing.
                runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
                for _ in range(repeat):
                    for n in counts:
                        runs[n].append(run_load(port, paths[op], token, n, seconds))
                for n in counts:
                    ordered = sorted(runs[n], key=lambda r: r["req_per_s"])
                    row = {"operation": op, **ordered[len(ordered) // 2], "server_processes": processes,
                           "req_per_s_runs": [r["req_per_s"] for r in runs[n]],
                           "errors": sum(r["errors"] for r in runs[n])}
                    results.append(row)
                    click.echo(f"{op:6} {n:3} clients: {row['req_per_s']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  "
                               f"p95 {row['p95_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}  "
                               f"load average {row['load_average_1m']}  steal {row['cpu_steal']}  "
                               f"runs {'/'.join(str(r) for r in row['req_per_s_runs'])}")
    report = {
        "command": "skinbridge bench fhir " + shlex.join(sys.argv[3:] if sys.argv[1:3] == ["bench", "fhir"]
                                                          else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "database": url.split(":", 1)[0].split("+")[0], "size": size, "workers": workers,
        "cpus": os.cpu_count(), "machine": platform.platform(), "python": platform.python_version(),
        "seconds_per_point": seconds, "repeat": repeat, "results": results, "search_plan": plan,
        "note": "load generator on the same machine; load_average_1m is the machine's 1-minute load average "
                "(os.getloadavg) when the point finished, including any other work running there; cpu_steal the "
                "share of the machine's CPU time during the point that the hypervisor gave to other machines",
        "server_settings": {name: getattr(get_settings(), name) for name in ("api_threads", "db_pool_size",
                                                                            "db_pre_ping")},
    }
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        click.echo(f"wrote {json_path}", err=True)
    if plot_path:
        plot(report, plot_path)
        click.echo(f"wrote {plot_path}", err=True)
