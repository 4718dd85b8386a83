"""The embedded broker (skinbridge.fs_broker): no consumer crash, no lost and no duplicated message
when several processes write and read one folder at once (kombu issue 1551)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
from kombu import Connection

from skinbridge import fs_broker
from tests.fs_hammer import PROJECT, STOCK, transport_options, hammer


def _channel(transport: str, folder: Path, **extra):  # type: ignore[no-untyped-def]
    for sub in ("out", "control", "processed"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    conn = Connection("filesystem://", transport=transport, transport_options={**transport_options(folder), **extra})
    return conn, conn.default_channel


def _half_written(folder: Path, queue: str):  # type: ignore[no-untyped-def]
    """What kombu's stock producer leaves between open() and write(): the file, under its final name, empty."""
    return open(folder / "out" / f"1_00000000-0000-0000-0000-000000000000.{queue}.msg", "wb", buffering=0)


def test_hammer_from_several_processes_loses_and_duplicates_nothing(tmp_path):
    # kombu's stock transport in the same hammer on this machine (3 consumers; 3 x 1,000 messages three
    # times, 3 x 300 once): consumers died of "JSONDecodeError: Expecting value: line 1 column 1 (char 0)"
    # in three of the four runs, all three of them in two runs (2,732 and 2,943 messages never read), one
    # in the third (1 lost). test_stock_transport_crashes_on_a_half_written_file makes the race deterministic.
    report = hammer(PROJECT, tmp_path, producers=3, consumers=3, messages=1000)
    assert report == {"sent": 3000, "received": 3000, "lost": 0, "duplicated": 0, "crashed_consumers": 0,
                      "failed_producers": 0, "consumer_errors": []}
    leftovers = [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert leftovers == []  # no temporary or claimed file stays behind


def test_stock_transport_crashes_on_a_half_written_file(tmp_path):
    """The bug being fixed, kept as documentation: kombu's consumer reads a file before its content exists."""
    conn, channel = _channel(STOCK, tmp_path)
    with _half_written(tmp_path, "q"), conn, pytest.raises(json.JSONDecodeError):
        channel._get("q")


def test_half_written_file_is_skipped_then_delivered_once(tmp_path):
    conn, channel = _channel(PROJECT, tmp_path)
    with conn:
        writer = _half_written(tmp_path, "q")
        with pytest.raises(Exception) as empty:
            channel._get("q")  # skipped, put back: no crash
        assert type(empty.value).__name__ == "Empty"
        writer.write(json.dumps({"body": "late"}).encode())  # the writer finishes (same inode)
        writer.close()
        assert channel._get("q") == {"body": "late"}
        with pytest.raises(Exception):
            channel._get("q")  # and only once
    assert os.listdir(tmp_path / "out" / fs_broker.CLAIMED) == []


def test_a_file_that_never_becomes_a_message_is_set_aside(tmp_path, caplog):
    conn, channel = _channel(PROJECT, tmp_path, unreadable_grace_s=0)
    with conn:
        (tmp_path / "out" / "1_garbage.q.msg").write_bytes(b"\x00{not json")
        channel._put("q", {"body": "next"})
        with caplog.at_level(logging.ERROR, logger="skinbridge.fs_broker"):
            assert channel._get("q") == {"body": "next"}  # the broken file does not block the queue
    assert os.listdir(tmp_path / "out" / fs_broker.UNREADABLE) == ["1_garbage.q.msg"]
    assert "not a readable message" in caplog.text


def test_messages_come_out_in_the_order_they_were_put_across_digit_counts(tmp_path):
    """File names start with a millisecond stamp; a string sort would hand out "10_…" before "9_…"."""
    conn, channel = _channel(PROJECT, tmp_path)
    with conn:
        for stamp, body in ((10, "second"), (9, "first"), (100, "third")):
            (tmp_path / "out" / f"{stamp}_x.q.msg").write_bytes(json.dumps({"body": body}).encode())
        assert [channel._get("q")["body"] for _ in range(3)] == ["first", "second", "third"]


def test_concurrent_bindings_to_a_new_exchange_are_all_kept(tmp_path):
    """Exchange tables are read-modify-written under a lock and replaced atomically (the stock transport
    truncates a new table before locking it: run on it, this test lost a binding in 1 of 3 runs)."""
    channels = [_channel(PROJECT, tmp_path) for _ in range(8)]
    start = threading.Barrier(len(channels))

    def bind(i: int) -> None:
        start.wait()
        channels[i][1]._queue_bind("ex", f"rk{i}", None, f"q{i}")

    threads = [threading.Thread(target=bind, args=(i,)) for i in range(len(channels))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = channels[0][1].get_table("ex")
    assert sorted(q.queue for q in table) == [f"q{i}" for i in range(8)]
    channels[0][1]._delete("q3", "ex", "rk3", None)
    assert sorted(q.queue for q in channels[1][1].get_table("ex")) == [f"q{i}" for i in range(8) if i != 3]
    for conn, _ in channels:
        conn.close()


def test_the_embedded_profile_uses_the_project_transport_and_redis_stays_redis(tmp_path):
    from skinbridge.celery_app import make_celery
    from skinbridge.settings import Settings

    embedded = make_celery(Settings(var_dir=tmp_path, broker_url="filesystem://"))
    with embedded.connection_for_write() as conn:
        assert isinstance(conn.transport, fs_broker.Transport)
        assert conn.transport.client.transport_options["data_folder_in"] == str(tmp_path / "broker" / "out")
    redis = make_celery(Settings(var_dir=tmp_path, broker_url="redis://127.0.0.1:1/0"))
    assert redis.connection_for_write().transport.driver_type == "redis"


def test_a_task_reaches_its_own_queue_only(tmp_path, monkeypatch):
    """Once a worker has declared its queues (Celery binds all three to its default exchange with one
    routing key), each task is still exactly one message, on its own queue: a gpu step never reaches a
    cpu-only worker and no step is copied."""
    from skinbridge.celery_app import app, configure
    from skinbridge.settings import get_settings, reset_settings_cache

    monkeypatch.setenv("SKINBRIDGE_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("SKINBRIDGE_BROKER_URL", raising=False)
    reset_settings_cache()
    configure(app, get_settings())
    try:
        from inference import tasks

        with app.connection_for_write() as conn:  # what `celery worker -Q gpu,cpu,sweeper` does at start
            for queue in app.amqp.queues.values():
                queue(conn.default_channel).declare()
        tasks.explain.apply_async(args=["case-1"])
        tasks.notify.apply_async(args=["case-1"])
        tasks.sweep.apply_async()
        out = get_settings().broker_folder / "out"
        sent = sorted((p.name.split(".")[-2], json.loads(p.read_bytes())["headers"]["task"])
                      for p in out.iterdir() if p.is_file())
    finally:
        monkeypatch.undo()
        reset_settings_cache()
        configure(app, get_settings())
    assert sent == [("cpu", "skinbridge.notify"), ("gpu", "skinbridge.explain"), ("sweeper", "skinbridge.sweep")]
