"""`skinbridge bench fhir` end to end at a tiny size: seeds, serves, loads, writes the JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_fhir_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINBRIDGE_")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, "-m", "skinbridge", "bench", "fhir", "--size", "12", "--seconds", "0.3",
                          "--clients", "1,2", "--repeat", "2", "--workers", "1", "--json", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["size"] == 12 and report["database"] == "sqlite" and report["workers"] == 1
    assert report["command"].startswith("skinbridge bench fhir --size 12")
    points = {(r["operation"], r["clients"]): r for r in report["results"]}
    assert set(points) == {("read", 1), ("read", 2), ("search", 1), ("search", 2)}
    for r in points.values():
        assert r["requests"] > 0 and r["errors"] == 0, r  # every request answered 200
        assert r["server_processes"] == 1 and r["p50_ms"] <= r["p99_ms"] and "load_average_1m" in r
        assert r["cpu_steal"] is None or 0 <= r["cpu_steal"] <= 1
        assert len(r["req_per_s_runs"]) == 2 and r["req_per_s"] in r["req_per_s_runs"]
    assert report["server_settings"]["api_threads"] >= 1
    assert "read     1 clients:" in run.stdout and "load average" in run.stdout
