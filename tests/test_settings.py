"""Configuration: embedded defaults need nothing; unsafe production settings refuse to start."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys

import pytest

from clinic_db.keys import KeyRing
from skinbridge.settings import Settings, UnsafeConfiguration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_embedded_defaults_live_in_the_users_data_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    for k in list(os.environ):
        if k.startswith("SKINBRIDGE_"):
            monkeypatch.delenv(k)
    s = Settings(_env_file=None)
    # not ./var: commands run from any folder share one database and one set of keys (tests/test_data_dir.py)
    assert s.resolved_database_url == f"sqlite:///{tmp_path / 'xdg' / 'skinbridge' / 'skinbridge.db'}"
    assert s.resolved_key_dir == tmp_path / "xdg" / "skinbridge" / "keys"
    assert s.resolved_broker_url == "filesystem://" and s.broker_poll_interval <= 0.1
    s.check_safe()  # the embedded profile needs no configuration


def test_master_key_file_is_created_private(tmp_path):
    ring = KeyRing.from_directory(tmp_path / "keys")
    key_file = tmp_path / "keys" / f"{ring.active_kid}.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys" / "blind-index.key").stat().st_mode) == 0o600
    assert KeyRing.from_directory(tmp_path / "keys").active_kid == ring.active_kid  # stable across restarts


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, "SKINBRIDGE_MASTER_KEY"),
        ({"debug": True}, "SKINBRIDGE_DEBUG"),
        ({"session_secret": "change-me"}, "SKINBRIDGE_SESSION_SECRET"),
        ({"database_url": "sqlite:///x.db"}, "PostgreSQL"),
        ({"broker_url": None}, "SKINBRIDGE_BROKER_URL"),
    ],
)
def test_unsafe_production_refuses_with_what_to_set(overrides, expected):
    good = dict(
        profile="production",
        master_key=base64.b64encode(b"k" * 32).decode(),
        master_key_id="mk-prod-1",
        blind_index_key=base64.b64encode(b"b" * 32).decode(),
        session_secret="a-long-random-secret",
        database_url="postgresql+psycopg://skinbridge@db/skinbridge",
        broker_url="redis://redis:6379/0",
        telegram_token="123:abc",
    )
    Settings(_env_file=None, **good).check_safe()  # the complete configuration starts
    if "master_key" in expected.lower():
        good.pop("master_key")
    with pytest.raises(UnsafeConfiguration, match=expected):
        Settings(_env_file=None, **(good | overrides)).check_safe()


def test_cli_refuses_unsafe_production(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINBRIDGE_")}
    env.update(SKINBRIDGE_PROFILE="production", SKINBRIDGE_DEBUG="true", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "skinbridge", "db", "upgrade"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "refusing to start" in out.stderr and "SKINBRIDGE_DEBUG" in out.stderr
    assert not (tmp_path / "var").exists()  # nothing was created
