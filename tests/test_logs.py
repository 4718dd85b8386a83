"""Quiet logs by default: what an operator needs at INFO (one line per case step), the chatter that
repeats every few seconds (polls, HTTP requests, periodic tasks) only at DEBUG."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import httpx
import pytest

from skinbridge import logs
from tests.e2e_support import pythonpath_env
from tests.support import free_port


@pytest.fixture(autouse=True)
def _restore_logging():  # type: ignore[no-untyped-def]
    yield
    logs.setup(logging.WARNING)  # leave no INFO root logger behind for the other tests


def test_chatty_loggers_speak_only_at_debug() -> None:
    logs.setup(logging.INFO)
    assert logging.getLogger("skinbridge.case").isEnabledFor(logging.INFO)
    for name in ("uvicorn.access", "celery.beat", "celery.app.trace", "httpx"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        assert logging.getLogger(name).isEnabledFor(logging.WARNING), name
    logs.setup(logging.DEBUG)
    assert logging.getLogger("celery.beat").isEnabledFor(logging.DEBUG)


def test_one_info_line_per_case_step_and_periodic_tasks_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    case_id = str(uuid.uuid4())
    with caplog.at_level(logging.INFO):
        for task_id, name, args, state in (("t1", "skinbridge.diagnose", (case_id,), "SUCCESS"),
                                           ("t2", "skinbridge.explain", (case_id,), "IGNORED"),
                                           ("t3", "skinbridge.deliver_subscriptions", (), "SUCCESS"),
                                           ("t4", "skinbridge.draw_review_pictures", ("ab" * 16,), "SUCCESS")):
            logs._task_started(task_id)
            logs._task_ended(task_id, SimpleNamespace(name=name), args=args, state=state)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 2
    assert lines[0].startswith(f"case {case_id}: diagnose done in ")
    assert lines[1].startswith(f"case {case_id}: explain skipped in ")


def test_the_sandbox_does_not_log_every_poll(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINBRIDGE_")}
    env.update(pythonpath_env(), SKINBRIDGE_VAR_DIR=str(tmp_path / "var"))
    log = tmp_path / "sandbox.log"
    proc = subprocess.Popen([sys.executable, "-m", "skinbridge", "sandbox", "--port", str(port)], env=env,
                            cwd=tmp_path, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/bot123456:sandbox/getUpdates", json={"timeout": 0})
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert r.status_code == 200
        for _ in range(3):  # what the bot does all day long
            httpx.post(f"http://127.0.0.1:{port}/bot123456:sandbox/getUpdates", json={"timeout": 0})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = log.read_text()
    assert f"sandbox page: http://127.0.0.1:{port}/" in out
    assert "getUpdates" not in out and "point the bot at it" not in out and "Bot(" not in out
