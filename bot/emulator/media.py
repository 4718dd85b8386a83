"""Files of the emulated Telegram: user and bot uploads on disk, photo size variants, file ids."""

from __future__ import annotations

import hashlib
import io
import mimetypes
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

# Telegram's photo size ladder (longest side): s, m, x, y, w. Smaller variants are re-encoded JPEG.
PHOTO_LADDER = (90, 320, 800, 1280, 2560)
MAX_VARIANT_PIXELS = 40_000_000
DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile refuses larger files, like the real Bot API
# Only these types are shown inline by the emulator's file URL; everything else is a download, so a
# user- or bot-supplied HTML/SVG file can never run script on the sandbox page's origin.
INLINE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}


@dataclass(frozen=True)
class StoredFile:
    file_id: str
    file_unique_id: str
    disk_path: Path
    file_path: str  # relative path for getFile and /file/bot<token>/<file_path>
    size: int
    mime_type: str
    file_name: str | None = None
    width: int = 0
    height: int = 0

    def photo_size(self) -> dict[str, Any]:
        return {"file_id": self.file_id, "file_unique_id": self.file_unique_id, "width": self.width,
                "height": self.height, "file_size": self.size}


@dataclass(frozen=True)
class PhotoVariant:
    data: bytes
    width: int
    height: int
    mime_type: str


def photo_variants(data: bytes) -> list[PhotoVariant]:
    """Downscaled JPEG variants smaller than the original, then the original bytes untouched (largest).

    Bytes Pillow cannot read are still delivered (one size, 0x0) so a bot's own photo gate can be tested
    with them; the real Telegram would have refused them client-side.
    """
    try:
        with Image.open(io.BytesIO(data)) as probe:
            original_size = probe.size
            mime = Image.MIME.get(probe.format or "", "application/octet-stream")
            if original_size[0] * original_size[1] > MAX_VARIANT_PIXELS:
                # Decompression bombs reach the bot untouched (its gate must refuse them); the emulator
                # itself never decodes them.
                return [PhotoVariant(data, original_size[0], original_size[1], mime)]
            probe.draft("RGB", (PHOTO_LADDER[-1], PHOTO_LADDER[-1]))  # JPEG: decode at reduced scale
            image = ImageOps.exif_transpose(probe).convert("RGB")
    except Exception:  # noqa: BLE001 - any decoder failure means "no variants"
        return [PhotoVariant(data, 0, 0, "application/octet-stream")]
    variants: list[PhotoVariant] = []
    for side in PHOTO_LADDER:
        if side >= max(original_size):
            break
        copy = image.copy()
        copy.thumbnail((side, side), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        copy.save(buffer, "JPEG", quality=85)
        variants.append(PhotoVariant(buffer.getvalue(), copy.width, copy.height, "image/jpeg"))
    variants.append(PhotoVariant(data, original_size[0], original_size[1], mime))
    return variants


def sniff_image_mime(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as probe:
            return Image.MIME.get(probe.format or "")
    except Exception:  # noqa: BLE001
        return None


class FileStore:
    """Files on disk in a private temp dir, indexed by file_id and by getFile path."""

    def __init__(self, root: Path | None = None) -> None:
        self._owned = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="tg-emulator-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._by_id: dict[str, StoredFile] = {}
        self._by_path: dict[str, StoredFile] = {}
        self._counter = 0

    def add(self, data: bytes, *, folder: str, mime_type: str | None, file_name: str | None = None,
            width: int = 0, height: int = 0) -> StoredFile:
        self._counter += 1
        mime = mime_type or (mimetypes.guess_type(file_name)[0] if file_name else None) or "application/octet-stream"
        extension = mimetypes.guess_extension(mime) or ".bin"
        if extension == ".jpe":
            extension = ".jpg"
        relative = f"{folder}/file_{self._counter}{extension}"
        disk = self.root / relative
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.write_bytes(data)
        # Same content -> same file_unique_id (bots dedupe on it); file_id differs per upload.
        unique = "AQAD" + hashlib.sha256(data).hexdigest()[:16]
        kind_prefix = {"photos": "AgACAgIAAxkBAA", "documents": "BQACAgIAAxkBAA"}.get(folder, "CAACAgIAAxkBAA")
        stored = StoredFile(kind_prefix + secrets.token_urlsafe(24), unique, disk, relative, len(data), mime,
                            file_name, width, height)
        self._by_id[stored.file_id] = stored
        self._by_path[relative] = stored
        return stored

    def get(self, file_id: str) -> StoredFile | None:
        return self._by_id.get(file_id)

    def by_path(self, file_path: str) -> StoredFile | None:
        return self._by_path.get(file_path)

    def clear(self) -> None:
        for stored in self._by_id.values():
            stored.disk_path.unlink(missing_ok=True)
        self._by_id.clear()
        self._by_path.clear()

    def close(self) -> None:
        self.clear()
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)
