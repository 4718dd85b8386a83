"""`skinbridge bench soak` end to end, for a few seconds: a real worker process on the embedded broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_soak_smoke_reports_no_crash_no_loss_no_duplicate(tmp_path):
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINBRIDGE_")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-m", "skinbridge", "bench", "soak", "--minutes", "0.1", "--rate", "40", "--burst", "3", "--drain", "240",
         "--var-dir", str(tmp_path / "var"), "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "skinbridge.bench.soak/1"
    assert report["burst"] == 3 and report["cases_submitted"] >= 4
    assert report["cases_with_result"] == report["cases_submitted"]
    assert (report["worker_crashes"], report["lost"], report["duplicated_results"], report["failed"]) == (0, 0, 0, 0)
    assert report["critical_log_lines"] == [] and report["unreadable_broker_files"] == 0
    assert (tmp_path / "var" / "worker.log").is_file()  # --var-dir is kept for inspection
