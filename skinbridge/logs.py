"""One logging set-up for every SkinBridge process (SKINBRIDGE_LOG_LEVEL, default INFO).

At INFO a log says what an operator needs: processes starting, one line per case step, warnings and
errors. Chatter that repeats every few seconds (the bot's long polls, every HTTP request, Celery beat
sending the periodic tasks, "task received" / "task succeeded" for each of them) is at DEBUG, which
shows everything.
"""

from __future__ import annotations

import logging
import time
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# loggers that speak on every poll, request or periodic task: shown from WARNING up unless at DEBUG
CHATTY = (
    "httpx", "httpcore",  # every request the bot makes, long polls included (with the token in the URL)
    "uvicorn.access",  # every HTTP request, the bot's getUpdates polls of the sandbox emulator included
    "celery.beat",  # "Scheduler: Sending due task" every 5 s
    "celery.worker.strategy",  # "Task ... received"
    "celery.worker.request",  # "Discarding revoked task" (an expired periodic sweep while the worker was busy)
    "celery.app.trace",  # "Task ... succeeded in"; failures are ERROR and still shown; case steps: below
    "apscheduler",  # the bot's job queue runs
)


def level_from_settings() -> int:
    from skinbridge.settings import get_settings

    return logging.getLevelName(get_settings().log_level.upper())  # type: ignore[no-any-return]


def setup(level: int | None = None) -> int:
    """Configure the root logger for this process; returns the level used."""
    level = level_from_settings() if level is None else level
    logging.basicConfig(level=level, format=FORMAT, force=True)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    return level


# --- Celery workers ----------------------------------------------------------------------------------
_started: dict[str, float] = {}
_case_log = logging.getLogger("skinbridge.case")


def for_worker() -> int:
    """Our set-up in a Celery worker (instead of Celery's own, in the main and every pool process), and
    one INFO line per case step in place of Celery's two per task. Returns the level used."""
    from celery.signals import setup_logging, task_postrun, task_prerun

    level = setup()
    setup_logging.connect(_keep_ours, weak=False)
    task_prerun.connect(_task_started, weak=False)
    task_postrun.connect(_task_ended, weak=False)
    return level


def _keep_ours(**_: Any) -> None:
    setup()


def _task_started(task_id: str, **_: Any) -> None:
    _started[task_id] = time.monotonic()


def _task_ended(task_id: str, task: Any, args: Any = (), state: str | None = None, **_: Any) -> None:
    took = time.monotonic() - _started.pop(task_id, time.monotonic())
    step = task.name.rsplit(".", 1)[-1]
    case_id = _case_id(args)
    if case_id is None:  # periodic and service tasks: only at DEBUG
        logging.getLogger("skinbridge.tasks").debug("%s: %s in %.2f s", step, (state or "?").lower(), took)
        return
    outcome = {"SUCCESS": "done", "IGNORED": "skipped", "RETRY": "will retry"}.get(state or "", (state or "?").lower())
    _case_log.info("case %s: %s %s in %.2f s", case_id, step, outcome, took)


def _case_id(args: Any) -> str | None:
    """The case id a pipeline task carries as its first argument (a UUID), if any."""
    import uuid

    if not args or not isinstance(args[0], str) or args[0].count("-") != 4:  # not a digest or other hex id
        return None
    try:
        return str(uuid.UUID(args[0]))
    except ValueError:
        return None
