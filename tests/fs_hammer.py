"""Hammer a kombu filesystem transport from several processes: producers and consumers on one folder.

``python -m tests.fs_hammer produce|consume ...`` is one process; :func:`hammer` starts them all and
reports crashed consumers, lost and duplicated messages. Used by tests/test_fs_broker.py with the
project's transport (must survive) and kombu's stock one (shows the race, kombu issue 1551).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STOCK = "kombu.transport.filesystem:Transport"
PROJECT = "skinbridge.fs_broker:Transport"


def transport_options(folder: Path) -> dict[str, Any]:
    return {"data_folder_in": str(folder / "out"), "data_folder_out": str(folder / "out"),
            "control_folder": str(folder / "control"), "processed_folder": str(folder / "processed"),
            "polling_interval": 0.005}


def _queue():  # type: ignore[no-untyped-def]
    from kombu import Exchange, Queue

    return Queue("hammer", Exchange("hammer", type="direct"), routing_key="hammer")


def produce(transport: str, folder: Path, producer: int, count: int) -> None:
    from kombu import Connection, Producer

    queue = _queue()
    with Connection("filesystem://", transport=transport, transport_options=transport_options(folder)) as conn:
        producer_ = Producer(conn.default_channel)
        for i in range(count):
            producer_.publish({"id": f"{producer}:{i}", "pad": "x" * 512}, exchange=queue.exchange,
                              routing_key="hammer", declare=[queue], serializer="json")


def consume(transport: str, folder: Path, out: Path, stop: Path) -> None:
    from kombu import Connection, Consumer

    seen: list[str] = []

    def on_message(body, message):  # type: ignore[no-untyped-def]
        seen.append(body["id"])
        message.ack()

    try:
        with Connection("filesystem://", transport=transport, transport_options=transport_options(folder)) as conn:
            with Consumer(conn, [_queue()], callbacks=[on_message], accept=["json"]):
                while True:
                    try:
                        conn.drain_events(timeout=0.3)
                    except socket.timeout:
                        if stop.exists():
                            break
    finally:
        out.write_text(json.dumps(seen))


def hammer(transport: str, folder: Path, *, producers: int, consumers: int, messages: int,
           limit_s: float = 120.0) -> dict[str, Any]:
    """Run ``producers`` x ``messages`` through ``consumers``; return what came out."""
    for sub in ("out", "control", "processed"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    stop = folder / "stop"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}

    def start(*args: str, log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tests.fs_hammer", *args, transport, str(folder)],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=(folder / log).open("wb"))

    eaters = [start("consume", str(folder / f"seen-{c}.json"), log=f"consumer-{c}.log") for c in range(consumers)]
    feeders = [start("produce", str(p), str(messages), log=f"producer-{p}.log") for p in range(producers)]
    deadline = time.monotonic() + limit_s
    try:
        for proc in feeders:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        stop.touch()
        for proc in eaters:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in feeders + eaters:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seen: Counter[str] = Counter()
    for c in range(consumers):
        path = folder / f"seen-{c}.json"
        seen.update(json.loads(path.read_text()) if path.exists() else [])
    sent = {f"{p}:{i}" for p in range(producers) for i in range(messages)}
    errors = [(folder / f"consumer-{c}.log").read_text(errors="replace").strip().splitlines()[-1:]
              for c, proc in enumerate(eaters) if proc.returncode != 0]
    return {
        "sent": len(sent),
        "received": sum(seen.values()),
        "lost": len(sent - set(seen)),
        "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "crashed_consumers": sum(proc.returncode != 0 for proc in eaters),
        "failed_producers": sum(proc.returncode != 0 for proc in feeders),
        "consumer_errors": [line for lines in errors for line in lines],
    }


if __name__ == "__main__":
    role, *rest = sys.argv[1:]
    if role == "produce":
        producer, count, transport, folder = rest
        produce(transport, Path(folder), int(producer), int(count))
    else:
        out, transport, folder = rest
        consume(transport, Path(folder), Path(out), Path(folder) / "stop")
