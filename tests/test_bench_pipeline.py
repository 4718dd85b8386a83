"""`skinbridge bench pipeline` end to end: real emulator, bot and worker processes, two patients at once.

Tiny models keep it short; the numbers are not checked (no timing assertions), the record is: every
case has one result and its pictures, the timestamps follow the chain's order, and the stages cut the
patient's whole wait without gaps or overlaps.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from inference.bench_pipeline import _segments
from tests.e2e_support import REPO, pythonpath_env, tiny_model_env


def _bench(tmp_path: Path, *args: str) -> dict:
    import os

    out = tmp_path / "out.json"
    env = {**os.environ, **tiny_model_env(tmp_path / "models"), **pythonpath_env()}
    proc = subprocess.run([sys.executable, "-m", "skinbridge", "bench", "pipeline", "--patients", "2",
                           "--json", str(out), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "last_answer_to_result" in proc.stdout  # the printed report
    return json.loads(out.read_text())


def _check(report: dict, n: int = 2) -> None:
    assert report["schema"] == "skinbridge.bench.pipeline/1"
    assert report["summary"]["with_result"] == report["summary"]["with_pictures"] == n
    assert report["summary"]["duplicated_results"] == 0
    assert len(report["machine"]["loadavg_at_start"]) == 3
    for case in report["cases"]:
        t = case["t"]
        assert case["result_messages"] == 1, case
        assert t["last_answer"] <= t["inbox_stored"] <= t["status_queued"] <= t["status_analysing"] \
            <= t["result_delivered"] < t["pictures_delivered"], t  # the pictures follow the result
        assert [s["step"] for s in case["steps"]] == ["handoff", "analyse", "explain"]  # one hop to the result
        segments = _segments(case)
        assert "task: analyse / models" in segments
        # consecutive stages: together they are the whole wait, last answer to pictures
        assert sum(segments.values()) == pytest.approx(t["pictures_delivered"] - t["last_answer"], abs=1e-3)
    stages = report["summary"]["stages_s"]
    assert stages["task: analyse / models"]["n"] == n and stages["task: analyse / models"]["p50"] >= 0


def test_bench_pipeline_embedded(tmp_path: Path) -> None:
    report = _bench(tmp_path, "--shape", "embedded", "--rounds", "2")
    _check(report, n=4)
    first, second = report["cases"][:2], report["cases"][2:]  # the second pair starts once the first has all
    assert max(c["t"]["pictures_delivered"] for c in first) <= min(c["t"]["last_answer"] for c in second)


@pytest.mark.slow
def test_bench_pipeline_redis(tmp_path: Path, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import PG_ADMIN_URL

    report = _bench(tmp_path, "--shape", "redis", "--postgres-url", PG_ADMIN_URL)
    _check(report)
    # where the CPU went until the last result: every process the run started, and the database server
    cpu = report["cpu_until_last_result"]
    assert cpu["window_s"] > 0 and cpu["cores_busy"] > 0
    assert {"bot", "worker0", "emulator", "postgres", "bench: played patients"} <= set(cpu["seconds"])
    assert cpu["seconds"]["worker0"] > 0 and cpu["seconds"]["bot"] > 0


def test_bench_pipeline_backlog_times_the_workers_draining_a_queue(tmp_path: Path) -> None:
    import os

    out = tmp_path / "backlog.json"
    env = {**os.environ, **tiny_model_env(tmp_path / "models"), **pythonpath_env()}
    proc = subprocess.run([sys.executable, "-m", "skinbridge", "bench", "pipeline", "--backlog", "3", "--json",
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["backlog"] == 3 and report["failed"] == 0 and report["worker_processes"] == 1
    assert report["drain_s"] > 0 and report["cases_per_minute"] == pytest.approx(60 * 3 / report["drain_s"], rel=0.01)
    assert "3 cases drained in" in proc.stdout
