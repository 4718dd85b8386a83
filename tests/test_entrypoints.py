"""`import fhir.resources` and the project's own `fhir` modules work from every entry point:
pytest, the CLI (module and installed console script), a Celery worker, a non-editable install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

REPO = Path(__file__).resolve().parent.parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINBRIDGE_")}
    env.update(SKINBRIDGE_VAR_DIR=str(tmp_path / "var"), **extra)
    return env


def test_pytest_sees_both_halves_of_fhir():
    import fhir
    import fhir.mapping
    import fhir.resources.R4B.diagnosticreport

    assert fhir.mapping.__file__.startswith(str(REPO))
    assert any("site-packages" in p for p in fhir.__path__)


def test_cli_module_entry_point(tmp_path):
    env = _env(tmp_path, PYTHONPATH=str(REPO))
    up = subprocess.run([sys.executable, "-m", "skinbridge", "db", "upgrade"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    out = subprocess.run([sys.executable, "-m", "skinbridge", "check"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "all checks passed" in out.stdout


def test_installed_console_script(tmp_path):
    script = Path(sys.executable).parent / "skinbridge"
    if not script.exists():
        pytest.fail("the skinbridge console script is not installed: run the tests with `make test`")
    env = _env(tmp_path)
    env.pop("PYTHONPATH", None)
    subprocess.run([str(script), "db", "upgrade"], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=120)
    out = subprocess.run([str(script), "check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_non_editable_install_shares_one_fhir_folder(tmp_path):
    """What `pip install .` does in a virtualenv: our files land in the same `fhir` folder as
    fhir.resources' (ours written last). Both halves must import from there."""
    import fhir.resources

    site = tmp_path / "site"
    shutil.copytree(Path(fhir.resources.__file__).parent.parent, site / "fhir")
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheel_dir), str(REPO)], check=True, capture_output=True, timeout=300)
    with zipfile.ZipFile(next(wheel_dir.glob("skinbridge-*.whl"))) as wheel:
        wheel.extractall(site)
    code = ("import fhir.resources.R4B.diagnosticreport, fhir.mapping, clinic_db.models, skinbridge.cli;"
            "print(fhir.mapping.__file__)")
    env = _env(tmp_path, PYTHONPATH=str(site))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site))


@pytest.mark.slow
def test_celery_worker_process(clinic, tmp_path):
    from clinic_db.models import KeyValue
    from skinbridge.celery_app import make_celery
    from skinbridge.settings import get_settings

    env = _env(tmp_path, PYTHONPATH=str(REPO), SKINBRIDGE_DATABASE_URL=get_settings().resolved_database_url,
               SKINBRIDGE_WORKER_QUEUES="cpu")
    worker = subprocess.Popen([sys.executable, "-m", "skinbridge", "worker", "--queues", "cpu"], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        make_celery(get_settings()).send_task("skinbridge.selfcheck", queue="cpu")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with clinic.session() as s:
                rows = s.scalars(select(KeyValue).where(KeyValue.namespace == "selfcheck")).all()
            if rows:
                break
            assert worker.poll() is None, "worker died"
            time.sleep(0.5)
        assert rows, "the worker did not run the self-check"
        assert rows[0].value == {"problems": []}
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def test_up_starts_two_worker_processes_on_cpu_and_one_on_a_gpu():
    """`skinbridge up` on CPU: two worker processes (the first runs the sweeper); on a GPU one, since each
    process holds its own copy of the models."""
    from skinbridge.settings import Settings
    from skinbridge.supervisor import components

    cpu = [c.argv for c in components(Settings(device="cpu")) if c.component == "worker"]
    expected = min(2, len(os.sched_getaffinity(0)))
    assert cpu[0] == ["worker", "--queues", "gpu,cpu", "--beat"] and len(cpu) == expected
    assert all("--beat" not in argv for argv in cpu[1:])
    gpu = [c.argv for c in components(Settings(device="cuda:0")) if c.component == "worker"]
    assert gpu == [["worker", "--queues", "gpu,cpu", "--beat"]]


def test_worker_processes_side_by_side_share_the_cores_for_torch(monkeypatch):
    """Two worker processes on a CPU each get their share of the cores for torch (60 cases at once: 350
    instead of 286 per minute on two cores); one alone, or an explicit SKINBRIDGE_TORCH_THREADS, is left be."""
    import torch

    from inference import tasks
    from skinbridge.settings import Settings, get_settings, reset_settings_cache
    from skinbridge.supervisor import components

    cores = len(os.sched_getaffinity(0))
    workers = [c for c in components(Settings(device="cpu")) if c.component == "worker"]
    share = {} if len(workers) == 1 else {"SKINBRIDGE_TORCH_THREADS": str(max(1, cores // len(workers)))}
    assert all(c.env == share for c in workers)
    assert Settings(device="cpu", torch_threads=3).worker_env(2) == {}
    assert Settings(device="cpu").worker_env(1) == {}

    before = torch.get_num_threads()
    monkeypatch.setenv("SKINBRIDGE_TORCH_THREADS", "1")
    monkeypatch.setenv("SKINBRIDGE_WORKER_QUEUES", "cpu")  # no models to load in this test
    reset_settings_cache()
    try:
        assert get_settings().torch_threads == 1
        tasks.init_worker_process()  # what each pool process runs after the fork
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
        monkeypatch.undo()
        reset_settings_cache()
