"""The Celery application shared by every worker, the bot and the CLI.

Embedded default: the ``filesystem://`` broker under ``var/broker`` (polled every 0.1 s), served by
:mod:`skinbridge.fs_broker` (kombu's transport without its read-before-write race).
Production: Redis or RabbitMQ via SKINBRIDGE_BROKER_URL, any number of workers on any machines.
Tasks carry ids, never image bytes; the database case row is the source of truth.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_shutdown
from kombu import Queue

from skinbridge import fs_broker
from skinbridge.settings import Settings, get_settings


PIPELINE_QUEUES = ("gpu", "cpu")
# the sweeper has a queue of its own, consumed by the worker that runs beat: a backlog on `cpu` never delays it
SWEEPER_QUEUE = "sweeper"


def configure(app: Celery, settings: Settings) -> Celery:
    """(Re)apply settings to the app; tests call it again after changing the environment."""
    conf: dict = dict(
        broker_url=settings.resolved_broker_url,
        broker_transport=None,
        result_backend=settings.result_backend,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        task_default_queue="cpu",
        task_queues=tuple(Queue(name) for name in (*PIPELINE_QUEUES, SWEEPER_QUEUE)),
        task_send_sent_event=True,
        worker_send_task_events=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule={
            "sweep-stuck-cases": {"task": "skinbridge.sweep", "schedule": settings.sweeper_interval_s},
            "deliver-fhir-subscriptions": {"task": "skinbridge.deliver_subscriptions", "schedule": 5.0},
        },
    )
    if settings.is_embedded_broker:
        folder = settings.broker_folder
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport"] = fs_broker.TRANSPORT  # the URL stays filesystem://; the class is ours
        conf["broker_transport_options"] = {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # broadcast exchanges; kombu's default is ./control
            "store_processed": False,
            "polling_interval": settings.broker_poll_interval,
        }
    else:
        # visibility timeout above the hard time limit, so a long task is not redelivered while running
        conf["broker_transport_options"] = {"visibility_timeout": settings.task_time_limit + 120}
    app.conf.update(conf)
    if app._pool is not None:  # reconfigured (tests): drop connections made under the old broker URL
        app._pool.force_close_all()
        app._pool = None
        app.amqp._producer_pool = None
    return app


def make_celery(settings: Settings) -> Celery:
    tasks = ["inference.tasks", "inference.explainer_tasks", "fhir.tasks"]
    return configure(Celery("skinbridge", include=tasks), settings)


app = make_celery(get_settings())
_beater = None  # this pool process's heartbeat thread


@worker_process_init.connect(weak=False)
def _start_heartbeat(**_: object) -> None:
    """Each pool process beats (clinic_db.heartbeat) from the moment it exists, before models load."""
    global _beater
    from clinic_db import heartbeat
    from clinic_db.db import get_clinic

    get_clinic().engine.dispose(close=False)  # never share the parent's connections after the fork
    _beater = heartbeat.start(get_clinic(), "worker", detail={"queues": os.environ.get("SKINBRIDGE_WORKER_QUEUES")})


@worker_process_shutdown.connect(weak=False)
def _stop_heartbeat(**_: object) -> None:
    if _beater is not None:
        _beater.stop()


# A threads pool (a batching worker) forks no pool process: its one process starts and stops here.
@worker_init.connect(weak=False)
def _start_heartbeat_threads(**_: object) -> None:
    if get_settings().worker_pool == "threads":
        _start_heartbeat()


@worker_shutdown.connect(weak=False)
def _stop_heartbeat_threads(**_: object) -> None:
    if get_settings().worker_pool == "threads":
        _stop_heartbeat()
