"""One typed settings object for every SkinBridge process.

Read from environment variables prefixed ``SKINBRIDGE_`` and an optional settings file
(:func:`settings_file`: ``SKINBRIDGE_ENV_FILE``, else ``.env`` in the data folder). The defaults
are the *embedded* profile: everything in one data folder (SQLite, key files, the filesystem Celery
broker), so ``skinbridge up`` works on a fresh machine with no configuration. ``profile=production``
switches on the safety checks in :meth:`Settings.check_safe`.

The data folder is the user's data directory (``~/.local/share/skinbridge`` on Linux, see
:func:`default_var_dir`), never the working directory: every command, run from any folder, finds the
same database and keys. ``SKINBRIDGE_VAR_DIR`` moves it; a relative value is resolved once, here.
For the same reason a ``.env`` in the working directory is not read.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET = "change-me"  # the value shipped in examples; refused in production


def default_var_dir() -> Path:
    """Where the embedded profile keeps its data when SKINBRIDGE_VAR_DIR is unset: the user's data
    directory (XDG_DATA_HOME/skinbridge on Linux). Not ./var: a command run from another folder
    would otherwise open a new, empty database with new keys."""
    return platformdirs.user_data_path("skinbridge", appauthor=False)


class UnsafeConfiguration(RuntimeError):
    """A configuration that must not start; the message says what to set."""


ENV_FILE_VARIABLE = "SKINBRIDGE_ENV_FILE"


def settings_file() -> Path | None:
    """The one settings file every command reads, wherever it runs: ``SKINBRIDGE_ENV_FILE`` when set (it
    must exist), else ``.env`` in the data folder (``SKINBRIDGE_VAR_DIR`` from the environment, or
    :func:`default_var_dir`) when there is one. Never the working directory's ``.env``: settings in it
    (``SKINBRIDGE_VAR_DIR`` above all) would change with the folder a command is run from."""
    named = os.environ.get(ENV_FILE_VARIABLE)
    if named:
        path = Path(named).expanduser().resolve()
        if not path.is_file():
            raise UnsafeConfiguration(f"{ENV_FILE_VARIABLE}={named}: there is no such file")
        return path
    var_dir = os.environ.get("SKINBRIDGE_VAR_DIR")
    path = (Path(var_dir).expanduser().resolve() if var_dir else default_var_dir()) / ".env"
    return path if path.is_file() else None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        # no env_file here: get_settings passes settings_file(), so Settings() alone reads the environment only
        env_prefix="SKINBRIDGE_", env_file_encoding="utf-8", extra="ignore"
    )

    profile: Literal["embedded", "production"] = "embedded"
    debug: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"] = "INFO"
    var_dir: Path = Field(default_factory=default_var_dir)

    # --- storage -------------------------------------------------------------------------
    database_url: str | None = None  # default: sqlite:///<var_dir>/skinbridge.db
    # connections each process keeps open to PostgreSQL (more are opened for a burst, then closed)
    db_pool_size: int = Field(10, ge=1, le=200)
    # test each pooled connection before use: one more round trip per transaction. Off by default: a
    # connection PostgreSQL dropped fails one transaction with OperationalError, which every part treats
    # as transient (tasks retry, the bot handles the update again, the API answers 503 + Retry-After),
    # and SQLAlchemy then replaces the pool's connections
    db_pre_ping: bool = False

    # --- keys ----------------------------------------------------------------------------
    # Master keys live in key_dir as <kid>.key files (0600); ACTIVE names the current one.
    # Production may instead pass one key inline (base64, 32 bytes) with its id.
    key_dir: Path | None = None
    master_key: SecretStr | None = None
    master_key_id: str | None = None
    blind_index_key: SecretStr | None = None
    # Fault injection for the key-rotation crash tests: `keys rotate` exits at this step. Refused in production.
    fault_rotate_exit_at: str | None = None

    # --- process heartbeats (clinic_db.heartbeat) -----------------------------------------
    heartbeat_interval_s: float = 10.0
    heartbeat_stale_s: float = 60.0  # no beat for this long: the process is stuck or gone

    # --- Celery --------------------------------------------------------------------------
    broker_url: str | None = None  # default: filesystem:// under var_dir
    result_backend: str | None = None
    broker_poll_interval: float = 0.1  # filesystem broker; the library default of 1 s slows chains
    worker_concurrency: int = 1
    # torch's threads in each worker process (default: torch's own, one per core). Several worker processes
    # on a CPU-only machine each take their share: `skinbridge up` starts two on two cores with one thread
    # each (60 cases at once: 350 instead of 286 per minute, docs/benchmarks/pipeline.md)
    torch_threads: int | None = Field(None, ge=1, le=256)
    # Micro-batching (inference.engines.batching): above 0, a worker runs up to batch_slots tasks at once in
    # threads, and the classifier calls of cases arriving within this many milliseconds share one forward
    # pass. Celery enforces no time limits on a threads pool: the leases and the sweeper remain.
    batch_window_ms: float = Field(0.0, ge=0.0, le=1000.0)
    batch_slots: int = Field(8, ge=1, le=64)
    batch_max_photos: int = Field(32, ge=1, le=512)
    task_soft_time_limit: int = 600
    task_time_limit: int = 660
    sweeper_interval_s: float = 30.0
    # a pipeline lease not renewed for this long (renewed every stuck_after_s / 4, at most 30 s) is lost;
    # waiting in the queue is never lost (inference.leases)
    stuck_after_s: float = 120.0
    max_pipeline_attempts: int = 3
    explanation_images: int = 2
    # no example pictures of a top guess the AI gives less than this: pictures of a condition the result
    # itself calls unlikely would mislead (and the message then names it only as the closest guess)
    example_pictures_min_probability: float = Field(0.2, ge=0.0, le=1.0)
    # Fault injection for the crash tests: the diagnose step sleeps this long first. Refused in production.
    fault_delay_s: float = 0.0

    # --- web (FHIR API, console, sandbox) --------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    public_base_url: str | None = None
    # threads per API process that run request handlers: more than a few only makes them fight over the
    # GIL (measured in docs/benchmarks/fhir-postgresql.md); more clients wait in the event loop instead
    api_threads: int = Field(4, ge=1, le=64)
    session_secret: SecretStr = SecretStr(DEFAULT_SECRET)

    # --- Telegram ------------------------------------------------------------------------
    telegram_token: SecretStr | None = None
    telegram_base_url: str | None = None  # e.g. the local emulator: http://127.0.0.1:8081/bot
    telegram_base_file_url: str | None = None
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    # per-user rate limit: updates beyond it wait in the bot's inbox (the user is told once), none is dropped
    bot_user_limit: int = Field(30, ge=1)  # a whole consultation is about 12 updates
    bot_user_window_s: float = Field(60.0, gt=0)
    # updates of different users handled at once (each user's in order; a dermatologist's alone): most of a
    # handler's time is spent waiting for Telegram (its rate limit below), so with 8, 30 patients at once
    # waited 1.8 s for the bot to take their last answer, with 32 0.3 s (docs/benchmarks/pipeline.md)
    bot_concurrency: int = Field(32, ge=1, le=64)
    # messages the bot sends (or edits) per second, all chats together: Telegram's limit for a bot without
    # paid broadcasts is about 30; 0 = no limit (a local Bot API server that has none)
    bot_max_rate: float = Field(30.0, ge=0)

    # --- models --------------------------------------------------------------------------
    classifier_path: Path | None = None  # default: the weights shipped in inference/weights
    generator_path: Path | None = None
    # generated classes the classifier recognised less often than this are not shown to patients
    # (default: inference.engines.explainer.MIN_RECOGNITION, the 0.8)
    explanation_min_recognition: float | None = Field(None, ge=0.0, le=1.0)
    vlm_path: Path | None = None  # optional transformers image-text-to-text checkpoint
    sd_path: Path | None = None  # optional Stable-Diffusion checkpoint with per-condition LoRAs
    # SD examples drawn over the patient's first photo, noised by this much (0-1: more keeps less of the photo),
    # so they follow the body site and skin tone; unset: from text alone. Part of what a dermatologist approves.
    sd_img2img_strength: float | None = Field(None, gt=0.0, lt=1.0)
    device: str = "auto"
    # VLM loading (inference.engines.loading): auto = bf16 on GPUs that have it, else fp16; fp32 on CPU
    vlm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # auto = flash_attention_2 on a GPU with the flash-attn package installed, else sdpa
    vlm_attn_implementation: Literal["auto", "sdpa", "flash_attention_2", "eager"] = "auto"
    vlm_device_map: str | None = None  # default: straight onto the device; "auto" spreads over GPUs
    vlm_max_photos: int = Field(4, ge=1, le=16)  # photos of a case shown to the VLM (a family may allow fewer)

    # --- derived paths -------------------------------------------------------------------
    @field_validator("var_dir", "key_dir")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Resolved once, when the settings are read: later changes of directory do not move the data."""
        return path.expanduser().resolve() if path is not None else None

    @property
    def resolved_var_dir(self) -> Path:
        return self.var_dir

    @property
    def worker_pool(self) -> str:
        """Celery's pool for this worker: threads when batching (tasks must share a process), else prefork."""
        return "threads" if self.batch_window_ms > 0 else "prefork"

    def worker_env(self, processes: int) -> dict[str, str]:
        """The environment of each of ``processes`` worker processes started side by side on this machine:
        a share of the cores each for torch (unless torch_threads is set)."""
        if processes <= 1 or self.torch_threads:
            return {}
        return {"SKINBRIDGE_TORCH_THREADS": str(max(1, len(os.sched_getaffinity(0)) // processes))}

    @property
    def worker_slots(self) -> int:
        """Tasks one worker runs at once: its threads when batching, else its pool processes."""
        return self.batch_slots if self.batch_window_ms > 0 else self.worker_concurrency

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_var_dir / 'skinbridge.db'}"

    @property
    def resolved_key_dir(self) -> Path:
        return (self.key_dir or self.var_dir / "keys").resolve()

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.resolved_var_dir / "broker"

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")

    def check_safe(self) -> None:
        """Refuse a production configuration that would put patient data at risk."""
        if self.profile != "production":
            return
        problems: list[str] = []
        if self.debug:
            problems.append("SKINBRIDGE_DEBUG must be false in production")
        if self.fault_delay_s:
            problems.append("SKINBRIDGE_FAULT_DELAY_S is a test setting; unset it in production")
        if self.fault_rotate_exit_at:
            problems.append("SKINBRIDGE_FAULT_ROTATE_EXIT_AT is a test setting; unset it in production")
        if self.master_key is None and self.key_dir is None:
            problems.append(
                "set SKINBRIDGE_MASTER_KEY (base64 of 32 bytes) with SKINBRIDGE_MASTER_KEY_ID, "
                "or SKINBRIDGE_KEY_DIR pointing at a mounted key directory"
            )
        if self.master_key is not None and not self.master_key_id:
            problems.append("SKINBRIDGE_MASTER_KEY_ID must name the inline master key")
        if self.master_key is not None and self.blind_index_key is None:
            problems.append("set SKINBRIDGE_BLIND_INDEX_KEY (base64 of 32 bytes) beside the master key")
        for name in ("session_secret", "webhook_secret", "master_key", "blind_index_key"):
            value = getattr(self, name)
            if value is not None and value.get_secret_value() in (DEFAULT_SECRET, ""):
                problems.append(f"SKINBRIDGE_{name.upper()} still has its default value")
        if not self.database_url or self.database_url.startswith("sqlite"):
            problems.append("set SKINBRIDGE_DATABASE_URL to a PostgreSQL URL (postgresql+psycopg://...)")
        if not self.broker_url or self.broker_url.startswith("filesystem"):
            problems.append("set SKINBRIDGE_BROKER_URL to Redis (redis://...) or RabbitMQ (amqp://...)")
        if self.telegram_token is None:
            problems.append("set SKINBRIDGE_TELEGRAM_TOKEN")
        if problems:
            raise UnsafeConfiguration(
                "refusing to start an unsafe production configuration:\n  - " + "\n  - ".join(problems)
            )


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings(_env_file=settings_file())


def reset_settings_cache() -> None:
    get_settings.cache_clear()

