"""Process and client helpers shared by the end-to-end tests.

Real parts only: the Telegram emulator's control API (:class:`Chat`), the bot as a separate process
(:class:`BotProcess`), a Celery worker process (:class:`Worker`), tiny models saved as the production
loaders read them (:func:`tiny_model_env`), the console over HTTP (:func:`console_login`) and
Debian's chromium for Playwright (:data:`CHROMIUM`, :data:`CHROMIUM_ARGS`). Every process runs in
its own session so a test can end it with its children (kill the process group).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
CONTROL = {"X-Emulator-Control": "1"}  # state-changing control calls need it (docs/emulator.md)
WAIT_S = 30.0
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
BOT_MODULE = [sys.executable, "-m", "bot"]
SKINBRIDGE_BOT = [sys.executable, "-m", "skinbridge", "bot"]
HISTORY = {"body_site": "back", "duration": "months", "itch": "no", "bleeding": "no", "growth": "yes",
           "pain": "no", "prior_treatment": "none", "fitzpatrick": "skip"}


# --- process groups -------------------------------------------------------------------------------
def _stop_group(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM the leader (a Celery worker shuts its pool and beat down itself; a SIGTERM to every child
    at once stalls its warm shutdown), SIGKILL it after ``timeout``, then whatever is left in its group."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers: pool children, beat
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} is missing)"


# --- environments ---------------------------------------------------------------------------------
def pythonpath_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def bot_environment(emulator: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a bot process: this test's var dir, database and keys, talking to the emulator.

    Call after the ``clinic`` fixture has set SKINBRIDGE_VAR_DIR and SKINBRIDGE_DATABASE_URL.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKINBRIDGE_")}
    env.update({
        "SKINBRIDGE_VAR_DIR": os.environ["SKINBRIDGE_VAR_DIR"],
        "SKINBRIDGE_DATABASE_URL": os.environ["SKINBRIDGE_DATABASE_URL"],
        "SKINBRIDGE_PROFILE": "embedded",
        "SKINBRIDGE_TELEGRAM_BASE_URL": f"{emulator}/bot",
        "SKINBRIDGE_TELEGRAM_BASE_FILE_URL": f"{emulator}/file/bot",
        **pythonpath_env(),
    })
    env.update(extra or {})
    return env


def tiny_model_env(root: Path, clinic: Any = None) -> dict[str, str]:
    """Build a tiny classifier and generator under ``root``; the settings that make workers load them.
    With ``clinic``, a test dermatologist signs the generator off there, so patients get its pictures."""
    from inference.vocabulary import load_vocabulary
    from tests.tiny_models import build_tiny_classifier, build_tiny_generator, sign_off_generator

    codes = load_vocabulary().classifier_classes()
    generator = build_tiny_generator(root / "generator", codes)
    if clinic is not None:
        sign_off_generator(clinic, generator)
    return {
        "SKINBRIDGE_CLASSIFIER_PATH": str(build_tiny_classifier(root / "classifier", codes)),
        "SKINBRIDGE_GENERATOR_PATH": str(generator),
        # random weights spread their guess over 38 conditions (no top guess reaches the default 20 %):
        # pictures whatever the probability, so the tests see them
        "SKINBRIDGE_EXAMPLE_PICTURES_MIN_PROBABILITY": "0",
    }


@contextlib.contextmanager
def served_vlm(folder: Path, base_models: Mapping[str, str], monkeypatch: Any) -> Iterator[Any]:
    """The VLM in ``folder`` as the worker loads it (``load_engines``, CPU), beside ``base_models``
    (:func:`tiny_model_env`); the settings and engine caches are cleared before and after."""
    from inference.engines.registry import clear_engine_cache, load_engines
    from skinbridge.settings import get_settings, reset_settings_cache

    for key, value in {**base_models, "SKINBRIDGE_VLM_PATH": str(folder), "SKINBRIDGE_DEVICE": "cpu"}.items():
        monkeypatch.setenv(key, value)
    reset_settings_cache()
    clear_engine_cache()
    try:
        yield load_engines(get_settings()).vlm
    finally:
        clear_engine_cache()
        reset_settings_cache()


# --- the Celery worker ----------------------------------------------------------------------------
class Worker:
    """A real `skinbridge worker` process (prefork pool, beat for the sweeper)."""

    def __init__(self, env: dict[str, str], cwd: Path, log_name: str = "worker.log"):
        self.env, self.cwd, self.proc = env, cwd, None
        self.log = cwd / log_name

    def start(self) -> "Worker":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "skinbridge", "worker", "--queues", "gpu,cpu", "--beat"],
            cwd=self.cwd, env=self.env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill_all(self) -> None:
        _kill_group(self.proc)

    def stop(self) -> None:
        _stop_group(self.proc, timeout=30)


# --- the bot --------------------------------------------------------------------------------------
class BotProcess:
    """The patient bot as its own process (``python -m bot`` or ``skinbridge bot``)."""

    def __init__(self, env: dict[str, str], log_path: Path, command: Sequence[str] = BOT_MODULE):
        self.env, self.log_path, self.command = env, log_path, list(command)
        self.proc: subprocess.Popen | None = None

    def start(self, emulator: str) -> None:
        before = len(httpx.get(f"{emulator}/_emulator/calls", params={"method": "getUpdates"}).json())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # ready once it polls for updates
            if len(httpx.get(f"{emulator}/_emulator/calls", params={"method": "getUpdates"}).json()) > before:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("bot did not start:\n" + self.log()[-4000:])

    def kill(self) -> None:
        assert self.proc is not None
        _kill_group(self.proc)  # SIGKILL: no shutdown hook runs

    def stop(self) -> None:
        _stop_group(self.proc, timeout=15)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


# --- a patient in the emulator ----------------------------------------------------------------------
class Chat:
    """One patient talking to the bot through the emulator's control API."""

    def __init__(self, base: str, user_id: int, language_code: str = "en"):
        self.base, self.user_id, self.language_code = base, user_id, language_code
        self.http = httpx.Client(base_url=base, headers=CONTROL, timeout=30)
        self.consumed: set[tuple[int, int]] = set()

    def _user(self, path: str) -> str:
        return f"/_emulator/users/{self.user_id}/{path}"

    def text(self, text: str) -> dict[str, Any]:
        r = self.http.post(self._user("text"), json={"text": text, "language_code": self.language_code})
        r.raise_for_status()
        return r.json()

    def photo(self, data: bytes) -> dict[str, Any]:
        r = self.http.post(self._user("photo"), files={"file": ("p.jpg", data, "image/jpeg")},
                           data={"language_code": self.language_code})
        r.raise_for_status()
        return r.json()

    def document(self, data: bytes, mime: str, name: str) -> dict[str, Any]:
        r = self.http.post(self._user("document"), files={"file": (name, data, mime)},
                           data={"mime_type": mime, "file_name": name, "language_code": self.language_code})
        r.raise_for_status()
        return r.json()

    def album(self, photos: list[bytes]) -> dict[str, Any]:
        files = [("files", (f"p{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
        r = self.http.post(self._user("album"), files=files, data={"language_code": self.language_code})
        r.raise_for_status()
        return r.json()

    def press(self, message_id: int, data: str) -> None:
        r = self.http.post(self._user("press"), json={"message_id": message_id, "data": data,
                                                      "language_code": self.language_code})
        r.raise_for_status()

    def messages(self, after: int = 0) -> list[dict[str, Any]]:
        r = self.http.get(self._user("messages"), params={"after": after})
        r.raise_for_status()
        return r.json()

    def state(self) -> dict[str, Any]:
        r = self.http.get(self._user("state"), params={"language_code": self.language_code})
        r.raise_for_status()
        return r.json()

    def expect(self, match: Callable[[dict[str, Any]], bool], what: str, timeout: float = WAIT_S) -> dict[str, Any]:
        """Wait for a bot message (or a new version of an edited one) that matches and was not matched before.

        Messages from the outbox sender and from handlers can arrive in either order, so this does not
        require a message to come after the previously expected one.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.messages():
                key = (message["message_id"], message["seq"])
                if key not in self.consumed and match(message):
                    self.consumed.add(key)
                    return message
            time.sleep(0.1)
        raise AssertionError(f"no bot message {what}; chat: {[m.get('text') for m in self.messages()]}")

    def expect_text(self, fragment: str, timeout: float = WAIT_S) -> dict[str, Any]:
        return self.expect(lambda m: fragment in (m.get("text") or m.get("caption") or ""), repr(fragment), timeout)

    def button(self, message: dict[str, Any], data_prefix: str) -> str:
        for row in (message.get("reply_markup") or {}).get("inline_keyboard", []):
            for button in row:
                if button.get("callback_data", "").startswith(data_prefix):
                    return button["callback_data"]
        raise AssertionError(f"no button {data_prefix} on {message}")

    def tap(self, message: dict[str, Any], data_prefix: str) -> None:
        self.press(message["message_id"], self.button(message, data_prefix))


def consent(chat: Chat) -> None:
    chat.text("/start")
    intro = chat.expect(lambda m: "consent:yes" in str(m.get("reply_markup")), "with the consent buttons")
    chat.tap(intro, "consent:yes")
    chat.expect_text("/new")


def answer_history(chat: Chat, answers: dict[str, str]) -> None:
    for field, value in answers.items():
        question = chat.expect(lambda m: f"h:{field}:" in str(m.get("reply_markup")), f"question {field}")
        chat.press(question["message_id"], f"h:{field}:{value}")


# --- the review console over HTTP ---------------------------------------------------------------------
def csrf_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "page has no CSRF field"
    return match.group(1)


def console_login(base: str, username: str, password: str) -> httpx.Client:
    """A logged-in console client: the login form's CSRF token, then the session cookie."""
    client = httpx.Client(base_url=base, follow_redirects=False, timeout=30)
    page = client.get("/console/login")
    r = client.post("/console/login", data={"username": username, "password": password,
                                            "csrf_token": csrf_token(page.text)})
    assert r.status_code == 303, r.text
    return client


# --- the whole system ---------------------------------------------------------------------------------
class System:
    """Emulator, optional web app, a worker and the bot on one var dir, database and keys."""

    def __init__(self, emulator: str, web: str | None, worker: Worker, bot: BotProcess):
        self.emulator, self.web, self.worker, self.bot = emulator, web, worker, bot

    def logs(self) -> str:
        return f"--- worker log ---\n{tail(self.worker.log)}\n--- bot log ---\n{self.bot.log()[-6000:]}"


def dermnet_photos(shared_data: Path, *names: str) -> list[Path]:
    """Real phone-style clinical photos (DermNet, 320x240); HAM10000's 200x150 fail the 224 px minimum."""
    paths = [shared_data / "dermnet" / "images" / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    assert not missing, f"DermNet photos missing: {missing}"
    return paths


@contextlib.contextmanager
def running_system(tmp_path: Path, models: Mapping[str, str], *, web: bool) -> Iterator[System]:
    """Start everything, yield a :class:`System`, then stop the processes (process groups).

    Needs the ``clinic`` fixture first (it sets this test's var dir and database in the environment
    and migrates the database); the web app runs in this process and sees the same clinic.
    """
    from bot.emulator import create_app as create_emulator
    from tests.support import serve_app

    with contextlib.ExitStack() as stack:
        emulator = stack.enter_context(serve_app(create_emulator(tmp_path / "emulator-files")))
        base = None
        if web:
            from skinbridge.celery_app import app as celery_app, configure
            from skinbridge.settings import get_settings
            from skinbridge.web import create_app as create_web

            # the web app runs in this process and sends tasks (review pictures, exports): to this test's
            # broker, not to the one of whichever test first imported the Celery app
            configure(celery_app, get_settings())

            base = stack.enter_context(serve_app(create_web()))
        env = bot_environment(emulator, models)
        system = System(emulator, base, Worker(env, tmp_path), BotProcess(env, tmp_path / "bot.log", SKINBRIDGE_BOT))
        try:
            system.worker.start()  # imports torch and loads the models while the bot starts and the patient types
            system.bot.start(emulator)
            yield system
        finally:
            system.bot.stop()
            system.worker.stop()
            print(system.logs())  # pytest shows it when the test failed
