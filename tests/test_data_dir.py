"""The data folder does not depend on the working directory: docs/fhir.md's quick start, run from a
folder other than the one the server was started in, registers its client in the server's database
with the server's keys; a command on an unmigrated database says what to run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from skinbridge.settings import Settings
from skinbridge.selfcheck import legacy_var_note
from tests.conftest import service_missing
from tests.e2e_support import REPO, pythonpath_env
from tests.support import free_port
from tests.test_fhir_docs import MARK, examples

UP_TO_TOKEN = ["make_jwks.py", "qs-keys", "qs-register", "make_assertion.py", "qs-token"]


def _environment(tmp_path: Path) -> dict[str, str]:
    """A user with no SkinBridge settings at all (no SKINBRIDGE_VAR_DIR): the defaults decide."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "skinbridge"  # `skinbridge` on PATH, running this checkout
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m skinbridge "$@"\n')
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINBRIDGE_")}
    env.update(pythonpath_env(), XDG_DATA_HOME=str(tmp_path / "xdg"),
               PATH=os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    return env


def _folder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def _skinbridge(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skinbridge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _bash(env: dict[str, str], cwd: Path, titles: list[str]) -> subprocess.CompletedProcess[str]:
    """The doc's titled blocks as written: Python files saved, shell steps run in one bash session."""
    script = ["set -euo pipefail"]
    for e in examples():
        if e.title not in titles:
            continue
        if e.lang == "python":
            (cwd / e.title).write_text(e.body)
        else:
            script += [f"echo '{MARK}{e.title}'", e.body]
    return subprocess.run(["bash", "-c", "\n".join(script)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_fhir_quick_start_from_another_folder_uses_the_servers_database_and_keys(tmp_path: Path) -> None:
    missing = [tool for tool in ("openssl", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        service_missing(f"the quick start's tools ({', '.join(missing)})", "not on PATH")
    env = _environment(tmp_path)
    data = tmp_path / "xdg" / "skinbridge"
    host, ehr, other = _folder(tmp_path, "server-folder"), _folder(tmp_path, "ehr"), _folder(tmp_path, "other")

    # before anyone migrated: the registration says what to run instead of "no such table"
    keys = _bash(env, ehr, ["make_jwks.py", "qs-keys"])
    assert keys.returncode == 0, keys.stderr
    early = _skinbridge(env, ehr, "fhir-client", "add", "--name", "too early", "--jwks", "jwks.json",
                        "--scope", "system/DiagnosticReport.rs")
    assert early.returncode == 1
    assert "no SkinBridge tables yet: run `skinbridge db upgrade`" in early.stderr
    assert "Traceback" not in early.stderr

    # the operator migrates and starts the web app in one folder ...
    assert _skinbridge(env, host, "db", "upgrade").returncode == 0
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "skinbridge", "api", "--port", str(port)], cwd=host, env=env,
                              stdout=(tmp_path / "api.log").open("wb"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/fhir/metadata", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "api.log").read_text()
            time.sleep(0.2)
        # ... and the quick start, run from the EHR's folder, registers a client that this server knows
        run = _bash(env | {"BASE_URL": base}, ehr, UP_TO_TOKEN)
        assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    finally:
        server.terminate()
        server.wait(timeout=30)
    token = json.loads(run.stdout.split(f"{MARK}qs-token\n")[1])
    assert token["token_type"] == "bearer" and "system/DiagnosticReport.rs" in token["scope"].split()

    # one set of keys, whichever folder a command runs from; `check` says where the data lives
    assert _skinbridge(env, host, "keys", "status").stdout == _skinbridge(env, other, "keys", "status").stdout
    check = _skinbridge(env, other, "check")
    assert check.returncode == 0, check.stderr
    assert f"data folder: {data}" in check.stdout and "all checks passed" in check.stdout
    assert sorted(p.name for p in data.iterdir()) >= ["keys", "skinbridge.db"]
    for folder in (host, ehr, other):
        assert not (folder / "var").exists(), f"{folder} got a data folder of its own"


def test_an_older_var_folder_is_pointed_out(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, var_dir=tmp_path / "data")
    assert legacy_var_note(settings, cwd=tmp_path) is None
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "skinbridge.db").write_bytes(b"")
    note = legacy_var_note(settings, cwd=tmp_path)
    assert note is not None and f"SKINBRIDGE_VAR_DIR={tmp_path / 'var'}" in note
    assert legacy_var_note(Settings(_env_file=None, var_dir=tmp_path / "var"), cwd=tmp_path) is None


@pytest.mark.parametrize("value", ["relative/data", "~/data"])
def test_a_configured_data_folder_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   value: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    settings = Settings(_env_file=None, var_dir=value)
    expected = tmp_path / ("relative/data" if value.startswith("relative") else "home/data")
    monkeypatch.chdir(REPO)  # a later change of directory does not move the data
    assert settings.resolved_var_dir == expected
    assert settings.resolved_database_url == f"sqlite:///{expected / 'skinbridge.db'}"
    assert settings.resolved_key_dir == expected / "keys"


def test_settings_come_from_the_data_folder_or_skinbridge_env_file_never_the_working_folder(tmp_path: Path) -> None:
    """A `.env` in the folder a command runs from used to be read: SKINBRIDGE_VAR_DIR in it gave the same
    command another database and other keys in another folder (issue 22, problem 10)."""
    env = _environment(tmp_path)
    data = tmp_path / "xdg" / "skinbridge"
    project, other = _folder(tmp_path, "project"), _folder(tmp_path, "other")
    (project / ".env").write_text(f"SKINBRIDGE_VAR_DIR={tmp_path / 'project-data'}\n")

    def where(cwd: Path, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return _skinbridge(env | (extra or {}), cwd, "check")  # exits 1 here (no tables): only where is read

    # no settings file: the defaults, from either folder; the working folder's .env is pointed out, not read
    for cwd in (project, other):
        out = where(cwd).stdout
        assert f"data folder: {data}\n" in out and "settings:    environment only" in out, out
    assert f"{project / '.env'} is not read" in where(project).stdout
    assert "is not read" not in where(other).stdout

    # the data folder's .env is read from every folder
    data.mkdir(parents=True, exist_ok=True)
    (data / ".env").write_text(f"SKINBRIDGE_DATABASE_URL=sqlite:///{tmp_path / 'from-data-folder.db'}\n")
    for cwd in (project, other):
        out = where(cwd).stdout
        assert f"database:    sqlite:///{tmp_path / 'from-data-folder.db'}" in out, out
        assert f"settings:    environment and {data / '.env'}" in out, out

    # SKINBRIDGE_ENV_FILE names the one file instead (it may move the data folder)
    named = tmp_path / "skinbridge.env"
    named.write_text(f"SKINBRIDGE_VAR_DIR={tmp_path / 'named-data'}\n")
    for cwd in (project, other):
        out = where(cwd, {"SKINBRIDGE_ENV_FILE": str(named)}).stdout
        assert f"data folder: {tmp_path / 'named-data'}\n" in out and f"environment and {named}" in out, out
    missing = where(other, {"SKINBRIDGE_ENV_FILE": str(tmp_path / "nope.env")})
    assert missing.returncode == 2 and "SKINBRIDGE_ENV_FILE=" in missing.stderr and "no such file" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "project-data").exists() and not (other / "var").exists()
