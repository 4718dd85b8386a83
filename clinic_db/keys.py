"""Key material: master keys (with ids) that wrap per-patient data keys, and the blind-index key.

Key hierarchy (docs/architecture.md):

    master key (kid)  --AES-256-GCM wrap-->  patient data key  --AES-256-GCM-->  fields and images
    blind-index key   --HMAC-SHA256------->  Telegram id lookup token

Master keys come from a key directory (``<kid>.key`` files, 0600, ``ACTIVE`` names the current one)
or, in production, from one inline key given by environment variables. A running process follows
``skinbridge keys rotate``: before wrapping a new data key it checks whether ``ACTIVE`` changed (one
``stat``) and re-reads the directory if so, and it re-reads it when an unknown key id shows up. Key
files and ``ACTIVE`` are written to a temporary name and renamed into place, so a process killed while
writing never leaves a half-written key that other processes would trip over.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
FORMAT_VERSION = b"\x01"


class KeyUnavailable(LookupError):
    """A key needed to decrypt is not available (unknown kid, retired or shredded)."""


class DecryptionError(ValueError):
    """A ciphertext failed authentication: tampered, moved to another row/column, or wrong key."""


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: version byte | 12-byte random nonce | ciphertext+tag."""
    nonce = os.urandom(NONCE_BYTES)
    return FORMAT_VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, blob: bytes, aad: bytes) -> bytes:
    if not blob or blob[:1] != FORMAT_VERSION or len(blob) < 1 + NONCE_BYTES + 16:
        raise DecryptionError("not a SkinBridge ciphertext")
    nonce, body = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
    try:
        return AESGCM(key).decrypt(nonce, body, aad)
    except Exception as exc:  # cryptography raises InvalidTag
        raise DecryptionError("ciphertext failed authentication (tampered, moved or wrong key)") from exc


def _atomic_write(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` (0600) all at once: a temporary file, fsync, then rename into place.

    ``replace=False`` refuses to overwrite an existing file (a key file is never replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # never matches the mk-*.key glob
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails with FileExistsError instead of overwriting
            tmp.unlink()
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _write_secret(path: Path, data: bytes) -> None:
    _atomic_write(path, base64.b64encode(data) + b"\n", replace=False)


def _read_secret(path: Path) -> bytes:
    raw = base64.b64decode(path.read_bytes().strip())
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{path} does not hold a {KEY_BYTES}-byte key")
    return raw


def new_kid() -> str:
    return "mk-" + datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S") + "-" + secrets.token_hex(3)


@dataclass
class KeyRing:
    """Master keys by id plus the blind-index key. Thread-safe; reloads its directory on demand."""

    key_dir: Path | None
    active_kid: str
    masters: dict[str, bytes]
    blind_key: bytes
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _active_stamp: tuple[int, int, int] | None = field(default=None, repr=False)

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_directory(cls, key_dir: Path, create: bool = True) -> "KeyRing":
        key_dir = Path(key_dir)
        active_file = key_dir / "ACTIVE"
        if not active_file.exists():
            if not create:
                raise KeyUnavailable(f"no master key in {key_dir}; run `skinbridge up` or `skinbridge keys init`")
            key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            kid = new_kid()
            _write_secret(key_dir / f"{kid}.key", secrets.token_bytes(KEY_BYTES))
            if not (key_dir / "blind-index.key").exists():
                _write_secret(key_dir / "blind-index.key", secrets.token_bytes(KEY_BYTES))
            _atomic_write(active_file, (kid + "\n").encode(), replace=True)
        ring = cls(key_dir=key_dir, active_kid="", masters={}, blind_key=b"")
        ring.reload()
        return ring

    @classmethod
    def inline(cls, master_key_b64: str, kid: str, blind_key_b64: str) -> "KeyRing":
        master = base64.b64decode(master_key_b64)
        blind = base64.b64decode(blind_key_b64)
        if len(master) != KEY_BYTES or len(blind) != KEY_BYTES:
            raise ValueError("inline keys must be base64 of 32 bytes")
        return cls(key_dir=None, active_kid=kid, masters={kid: master}, blind_key=blind)

    def _stamp(self) -> tuple[int, int, int]:
        assert self.key_dir is not None
        st = os.stat(self.key_dir / "ACTIVE")
        return st.st_ino, st.st_mtime_ns, st.st_size

    def reload(self) -> None:
        if self.key_dir is None:
            return
        with self._lock:
            stamp = self._stamp()
            active = (self.key_dir / "ACTIVE").read_text().strip()
            masters: dict[str, bytes] = {}
            for path in self.key_dir.glob("mk-*.key"):
                try:
                    masters[path.stem] = _read_secret(path)
                except FileNotFoundError:  # retired between the listing and the read
                    continue
            if active not in masters:
                raise KeyUnavailable(f"ACTIVE names {active!r} but {active}.key is missing in {self.key_dir}")
            self.masters, self.active_kid, self._active_stamp = masters, active, stamp
            self.blind_key = _read_secret(self.key_dir / "blind-index.key")

    def current_kid(self) -> str:
        """The master key id new data keys are wrapped with, re-checked now: another process may have
        rotated since this ring was loaded (one stat of ACTIVE; the directory is re-read only on change)."""
        if self.key_dir is not None and self._stamp() != self._active_stamp:
            self.reload()
        return self.active_kid

    # --- use -------------------------------------------------------------------------------
    def master(self, kid: str) -> bytes:
        if kid not in self.masters:
            self.reload()  # another process may have rotated
        try:
            return self.masters[kid]
        except KeyError:
            raise KeyUnavailable(f"master key {kid!r} is not available (retired?)") from None

    def wrap(self, data_key: bytes, context: str) -> tuple[bytes, str]:
        kid = self.current_kid()  # never the key an earlier rotation retired (docs/architecture.md)
        return seal(self.master(kid), data_key, f"datakey|{context}|{kid}".encode()), kid

    def unwrap(self, wrapped: bytes, kid: str, context: str) -> bytes:
        return unseal(self.master(kid), wrapped, f"datakey|{context}|{kid}".encode())

    def blind_index(self, namespace: str, value: str) -> str:
        return hmac.new(self.blind_key, f"{namespace}:{value}".encode(), hashlib.sha256).hexdigest()

    def content_mac(self, data: bytes) -> str:
        """Keyed digest of stored content (photos): equal content gives an equal digest, but without
        the key nobody holding a photo can tell whether it is stored. The key is derived from the
        blind-index key, so it is never the same key used for two purposes."""
        key = hmac.new(self.blind_key, b"skinbridge|content-mac|v1", hashlib.sha256).digest()
        return hmac.new(key, data, hashlib.sha256).hexdigest()

    # --- rotation (steps of clinic_db.rotation; each one idempotent) -----------------------
    def _own_dir(self) -> Path:
        if self.key_dir is None:
            raise KeyUnavailable("inline keys are rotated by the secret store, not by SkinBridge")
        return self.key_dir

    def create_master(self, kid: str) -> None:
        """Write a new master key file (not active yet); nothing if it already exists."""
        path = self._own_dir() / f"{kid}.key"
        if not path.exists():
            try:
                _write_secret(path, secrets.token_bytes(KEY_BYTES))
            except FileExistsError:
                pass
        self.reload()

    def activate(self, kid: str) -> None:
        """Make ``kid`` ACTIVE: from now on every process wraps new data keys with it."""
        key_dir = self._own_dir()
        if not (key_dir / f"{kid}.key").exists():
            raise KeyUnavailable(f"{kid}.key is missing in {key_dir}")
        _atomic_write(key_dir / "ACTIVE", (kid + "\n").encode(), replace=True)  # atomic switch
        self.reload()

    def add_master(self) -> str:
        """Create a new master key file and make it ACTIVE. Old keys stay until retired."""
        kid = new_kid()
        self.create_master(kid)
        self.activate(kid)
        return kid

    def retire(self, kid: str) -> None:
        """Delete a master key file. Callers check first that nothing uses it (clinic_db.rotation)."""
        if kid == self.current_kid():
            raise ValueError("cannot retire the active master key")
        if self.key_dir is not None:
            (self.key_dir / f"{kid}.key").unlink(missing_ok=True)
        with self._lock:
            self.masters.pop(kid, None)


def keyring_from_settings(settings) -> KeyRing:  # type: ignore[no-untyped-def]
    if settings.master_key is not None:
        if settings.blind_index_key is None or not settings.master_key_id:
            raise KeyUnavailable("SKINBRIDGE_MASTER_KEY needs SKINBRIDGE_MASTER_KEY_ID and SKINBRIDGE_BLIND_INDEX_KEY")
        return KeyRing.inline(
            settings.master_key.get_secret_value(),
            settings.master_key_id,
            settings.blind_index_key.get_secret_value(),
        )
    return KeyRing.from_directory(settings.resolved_key_dir, create=settings.profile == "embedded")
