"""`skinbridge up`: migrate, then run every component as a child process until Ctrl-C.

Each child is ``python -m skinbridge <command>`` so it goes through the same entry point as in
production. A child that dies, or whose heartbeat went stale (stuck; clinic_db.heartbeat), is
restarted (with a back-off) so one crash never takes the system down; every child is stopped on exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from clinic_db.models import utcnow
from skinbridge.settings import Settings


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    env: dict[str, str] = field(default_factory=dict)
    component: str | None = None  # its name in the heartbeat registry (clinic_db.heartbeat), if it beats

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "skinbridge", *self.argv], env={**os.environ, **self.env}
        )
        self.started_at = time.monotonic()


def components(settings: Settings) -> list[Child]:
    workers = _worker_processes(settings.device)
    # on CPU a second worker process: 30 patients at once waited about half as long for their results as
    # with one (docs/benchmarks/pipeline.md); one worker's prefork pool of two did not help. Each takes its
    # share of the cores for torch, unless SKINBRIDGE_TORCH_THREADS says otherwise.
    env = settings.worker_env(workers)
    children = [Child("worker", ["worker", "--queues", "gpu,cpu", "--beat"], env=env, component="worker")]
    if workers > 1:
        children.append(Child("worker2", ["worker", "--queues", "gpu,cpu"], env=env, component="worker"))
    children.append(Child("web", ["api"], component="api"))
    if settings.telegram_token is None:
        # no Telegram account needed: the local Bot API emulator with its chat page stands in
        children.append(Child("sandbox", ["sandbox"]))
    children.append(Child("bot", ["bot"], component="bot"))
    return children


def stop_stale(children: list[Child], clinic, settings: Settings) -> list[str]:  # type: ignore[no-untyped-def]
    """Liveness: terminate each child whose heartbeat went stale (it beat once, then stopped for longer
    than heartbeat_stale_s: stuck, not dead); the loop in run_all restarts it like one that exited.
    A child that has not beaten yet is left alone (starting up, or a component that does not beat)."""
    import socket

    from clinic_db import heartbeat

    host = socket.gethostname()[:100]
    beats = heartbeat.alive(clinic, within_s=10**9)
    stopped = []
    for child in children:
        if child.component is None or child.proc is None or child.proc.poll() is not None:
            continue
        pid = child.proc.pid
        mine = [p.last_seen for p in beats
                if p.component == child.component and p.host == host and pid in (p.pid, p.ppid)]
        if not mine:
            continue
        silent_s = (utcnow() - max(mine)).total_seconds()
        if silent_s > settings.heartbeat_stale_s:
            print(f"[up] {child.name} has not beaten for {silent_s:.0f} s; stopping it to restart", flush=True)
            child.proc.terminate()
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()
            stopped.append(child.name)
    return stopped


def banner(settings: Settings) -> str:
    base = settings.public_base_url or f"http://{settings.http_host}:{settings.http_port}"
    lines = [
        "SkinBridge is up (embedded profile)" if settings.profile == "embedded" else "SkinBridge is up",
        f"  data, keys and broker: {settings.resolved_var_dir}",
        "  patient sandbox chat:  http://127.0.0.1:8081/" if settings.telegram_token is None else "  Telegram bot: on",
        f"  dermatologist console: {base}/console/  (create an account: skinbridge clinician add)",
        f"  example pictures:      patients get them once a dermatologist approves them at {base}/console/explainer",
        f"  FHIR API for EHRs:     {base}/fhir/metadata",
        "  Ctrl-C stops everything.",
    ]
    from skinbridge.selfcheck import legacy_var_note

    if note := legacy_var_note(settings):
        lines.insert(2, f"  note: {note}")
    return "\n".join(lines)


def _worker_processes(device: str) -> int:
    """One on a GPU (each process holds its own copy of the models); two on CPU where two cores allow."""
    if device == "auto":
        from inference.engines.base import pick_device

        device = pick_device(device)
    return 1 if device.startswith("cuda") else min(2, len(os.sched_getaffinity(0)))


def run_all(settings: Settings) -> int:
    from clinic_db.db import get_clinic
    from clinic_db.migrate import upgrade

    settings.resolved_var_dir.mkdir(parents=True, exist_ok=True)
    get_clinic()  # creates the embedded key files on first run
    upgrade(settings.resolved_database_url)
    children = [c for c in components(settings) if _available(c.argv[0])]
    for child in children:
        child.start()
    print(banner(settings), flush=True)

    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    clinic = get_clinic()
    next_liveness = time.monotonic() + settings.heartbeat_interval_s
    try:
        while not stopping:
            if time.monotonic() >= next_liveness:
                next_liveness = time.monotonic() + settings.heartbeat_interval_s
                try:
                    stop_stale(children, clinic, settings)
                except Exception as exc:  # noqa: BLE001 - a database hiccup must not stop the supervisor
                    print(f"[up] liveness check skipped: {exc}", flush=True)
            for child in children:
                if child.proc is not None and child.proc.poll() is not None and not stopping:
                    code = child.proc.returncode
                    delay = min(30.0, 2.0 ** min(child.restarts, 5))
                    print(f"[up] {child.name} exited with {code}; restarting in {delay:.0f}s", flush=True)
                    time.sleep(delay)
                    child.restarts += 1
                    child.start()
            time.sleep(0.5)
    finally:
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + 15
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
    return 0


def _available(command: str) -> bool:
    from skinbridge.cli import main

    return command in main.commands
