"""The embedded broker: kombu's ``filesystem://`` transport without its read-before-write race.

kombu's filesystem transport creates a message file under its final name and then writes into it; a
consumer that lists the folder in between claims an empty or half-written file, and ``json.loads``
raises out of ``drain_events``: the Celery worker exits with ``Unrecoverable error: JSONDecodeError``
(kombu issue 1551). Its exchange tables (the ``control`` folder) have the same race: a new table is
truncated before it is locked.

Here every file is written under a temporary name and renamed into place (``os.replace`` is atomic
within one filesystem), so a consumer sees either no file or the whole file. A consumer claims a
message by renaming it into a folder of its own (only one consumer can win the rename); a file it
cannot read or parse (written by some other writer, or truncated by a power loss) is put back for a
later try and, once it is older than ``unreadable_grace_s``, set aside in ``.unreadable/`` with an
error in the log: never a crash. File names, folders and options are kombu's, so the layout on disk is
the same; :mod:`skinbridge.celery_app` selects this transport with Celery's ``broker_transport``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from queue import Empty

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.transport.filesystem import LOCK_EX, exchange_queue_t, lock, unlock
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

log = logging.getLogger(__name__)

INCOMING = ".incoming"  # messages being written (never listed by a consumer: not a "<queue>.msg" name)
CLAIMED = ".claimed"  # messages a consumer has taken and is reading
UNREADABLE = ".unreadable"  # files that never became a message


def atomic_write(folder: Path, name: str, data: bytes, staging: Path | None = None) -> Path:
    """Write ``data`` to ``folder/name`` so that no reader ever sees a partial file.

    ``staging`` must be on the same filesystem as ``folder`` (default: ``folder`` itself).
    """
    staging = staging or folder
    fd, tmp = tempfile.mkstemp(dir=staging, prefix=".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        target = folder / name
        os.replace(tmp, target)
        return target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _arrival(name: str) -> tuple[int, str]:
    """Order message files by their millisecond prefix as a number: a string sort puts "9_…" after
    "10_…" and "1_…" after "12_…", so a queue would not be first-in first-out across digit counts."""
    stamp, _, rest = name.partition("_")
    return (int(stamp) if stamp.isascii() and stamp.isdigit() else -1, rest)


class Channel(filesystem.Channel):
    """kombu's filesystem channel with atomic writes and claims (see the module docstring)."""

    @cached_property
    def unreadable_grace_s(self) -> float:
        return float(self.transport_options.get("unreadable_grace_s", 30.0))

    def _subfolder(self, base: str, name: str) -> Path:
        folder = Path(base) / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # --- messages ------------------------------------------------------------------------------
    def _put(self, queue, payload, **kwargs):  # type: ignore[no-untyped-def]
        """Put a message on ``queue``: written under a temporary name, then renamed into place."""
        # kombu's own file name, so message order and queue matching stay as they were
        name = f"{int(round(time.monotonic() * 1000))}_{uuid.uuid4()}.{queue}.msg"
        folder = Path(self.data_folder_out)
        try:
            atomic_write(folder, name, str_to_bytes(dumps(payload)), self._subfolder(folder, INCOMING))
        except OSError as exc:
            raise ChannelError(f"Cannot add file {name!r} to {folder}") from exc

    def _get(self, queue):  # type: ignore[no-untyped-def]
        """Take the oldest readable message of ``queue``; skip (never raise on) a file that is not one yet."""
        wanted = f"{queue}.msg"
        folder = Path(self.data_folder_in)
        for name in sorted((n for n in os.listdir(folder) if n.partition(".")[2] == wanted), key=_arrival):
            claimed = self._subfolder(folder, CLAIMED) / name
            try:
                os.rename(folder / name, claimed)  # atomic: exactly one consumer wins
            except OSError:
                continue  # another consumer took it meanwhile
            try:
                payload = loads(bytes_to_str(claimed.read_bytes()))
            except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                self._unreadable(folder, name, claimed, exc)
                continue
            self._processed(claimed)
            return payload
        raise Empty()

    def _unreadable(self, folder: Path, name: str, claimed: Path, exc: Exception) -> None:
        """Put a file that is not a message (yet) back for a later try; set it aside once it is old."""
        try:
            age = time.time() - claimed.stat().st_mtime
            if age < self.unreadable_grace_s:
                os.rename(claimed, folder / name)
                return
            os.rename(claimed, self._subfolder(folder, UNREADABLE) / name)
        except OSError:
            return
        log.error("broker file %s is not a readable message after %.0f s (%s); moved to %s",
                  name, age, exc, folder / UNREADABLE)

    def _processed(self, claimed: Path) -> None:
        if not self.store_processed:
            claimed.unlink(missing_ok=True)
            return
        try:
            shutil.move(claimed, Path(self.processed_folder) / claimed.name)
        except OSError:
            claimed.unlink(missing_ok=True)

    # --- exchange tables (the control folder) ---------------------------------------------------
    def get_table(self, exchange):  # type: ignore[no-untyped-def]
        file = self._exchange_file(exchange)
        try:
            raw = file.read_bytes()  # always a whole file: tables are replaced, never rewritten in place
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ChannelError(f"Cannot open {file}") from exc
        return [exchange_queue_t(*q) for q in loads(bytes_to_str(raw))]

    @contextlib.contextmanager
    def _locked_table(self, exchange: str) -> Iterator[Path]:
        """Serialise read-modify-write of one exchange table (a lock file beside it; readers need none)."""
        file = self._exchange_file(exchange)
        self.control_folder.mkdir(parents=True, exist_ok=True)
        with open(file.with_name(file.name + ".lock"), "ab") as guard:
            lock(guard, LOCK_EX)
            try:
                yield file
            finally:
                unlock(guard)

    def _update_table(self, exchange: str, change: Callable[[list], list]) -> None:
        with self._locked_table(exchange) as file:
            queues = self.get_table(exchange)
            updated = change(list(queues))
            if updated != queues:
                try:
                    atomic_write(file.parent, file.name, str_to_bytes(dumps(updated)))
                except OSError as exc:
                    raise ChannelError(f"Cannot write {file}") from exc

    def _queue_bind(self, exchange, routing_key, pattern, queue):  # type: ignore[no-untyped-def]
        entry = exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._update_table(exchange, lambda queues: queues if entry in queues else [entry, *queues])

    def _delete(self, queue, exchange, routing_key, pattern, *args, **kwargs):  # type: ignore[no-untyped-def]
        virtual.Channel._delete(self, queue, exchange, routing_key, pattern, *args, **kwargs)
        entry = exchange_queue_t(routing_key or "", pattern or "", queue or "")
        self._update_table(exchange, lambda queues: [q for q in queues if q != entry])


class Transport(filesystem.Transport):
    """``filesystem://`` with :class:`Channel`; Celery's ``broker_transport`` names it."""

    Channel = Channel


TRANSPORT = f"{__name__}:Transport"
