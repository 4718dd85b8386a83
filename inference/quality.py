"""Photo gate: safe decoding of untrusted uploads, and a quick check that a photo is usable.

:func:`sanitize` is the only way an uploaded file becomes a stored photo. It trusts nothing the
sender says (file name, extension, MIME type): the format is sniffed from the bytes, the pixel
count is read from the header *before* any pixel is decoded (decompression bombs), and the photo is
re-encoded from raw pixels so that no metadata (EXIF with GPS position and camera serial, XMP, ICC,
comments) survives. EXIF orientation is applied first so the stored photo is upright.

:func:`assess` measures sharpness (variance of the Laplacian), exposure and resolution and returns
problem codes the bot turns into concrete advice via :func:`tip`. Thresholds and the numbers they
were tuned on are in docs/triage.md.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from clinic_db.cases import CleanImage

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000  # ~40 MP: larger than any phone photo, far below what would exhaust a worker
MAX_SIDE = 2048  # stored photos are downscaled to this longest side
MIN_DECODE_SIDE = 64  # below this there is nothing to look at: rejected outright
JPEG_QUALITY = 92

# assess() thresholds (tuned on HAM10000 + DermNet, see docs/triage.md)
ASSESS_SIDE = 512  # grey copy used for the measurements
MIN_SIDE = 224  # smaller photos lack detail for the dermatologist (the shipped classifier itself sees 48 px)
# Blur: re-blur ratio = Laplacian variance of the photo / that of a Gaussian(sigma 1) copy. A sharp
# photo loses most of its edge energy when blurred again (ratio >> 1); an already blurred one barely
# changes (ratio ~1). Unlike the raw variance it does not depend on content or resolution (smooth
# dermoscopy vs. textured clinical photos). A near-zero variance (no edges at all) is blurry too.
BLUR_MAX_REBLUR_RATIO = 2.2
BLUR_MIN_LAPLACIAN_VAR = 5.0
DARK_MAX_MEAN = 50.0
DARK_MIN_CLIPPED = 0.60  # fraction of pixels <= DARK_LEVEL
BRIGHT_MIN_MEAN = 225.0
BRIGHT_MIN_CLIPPED = 0.50  # fraction of pixels >= BRIGHT_LEVEL
DARK_LEVEL, BRIGHT_LEVEL = 16, 250

REJECTION_CODES = ("not_an_image", "unsupported_format", "too_large", "too_many_pixels", "corrupt", "too_small")
PROBLEM_CODES = ("blurry", "too_dark", "too_bright", "too_small")
# problems that are advice to retake, not a reason to refuse the photo (HAM10000 exports are 200x150)
ADVISORY_CODES = ("too_small",)


class PhotoRejected(Exception):
    """The upload cannot be used as a photo; ``code`` is one of :data:`REJECTION_CODES`."""

    def __init__(self, code: str, detail: str = ""):
        if code not in REJECTION_CODES:
            raise ValueError(f"unknown rejection code {code!r}")
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail


@dataclass
class QualityReport:
    ok: bool  # False only for problems that make the photo unusable (not for ADVISORY_CODES)
    problems: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def advisories(self) -> list[str]:
        return [p for p in self.problems if p in ADVISORY_CODES]


# --- format sniffing --------------------------------------------------------------------------
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}
_OTHER_IMAGE_MAGIC = (  # recognisably an image, but not one we accept
    (b"GIF87a", "gif"), (b"GIF89a", "gif"), (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
    (b"\x00\x00\x01\x00", "ico"), (b"8BPS", "psd"), (b"\xff\x0a", "jxl"), (b"\x00\x00\x00\x0cJXL ", "jxl"),
)


def sniff(raw: bytes) -> str | None:
    """"jpeg" | "png" | "webp" | "heif" for accepted formats, another name for a known image format
    we refuse, None when the bytes do not look like an image at all."""
    if raw.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if raw.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    if raw[4:8] == b"ftyp":
        brands = {raw[8:12]} | {raw[i:i + 4] for i in range(16, min(len(raw), 64), 4)}
        if brands & _HEIF_BRANDS:
            return "heif"
        if b"avif" in brands or b"avis" in brands:
            return "avif"
        return None  # e.g. an MP4 video
    for magic, name in _OTHER_IMAGE_MAGIC:
        if raw.startswith(magic):
            return name
    return None


_heif_registered = False


def _register_heif() -> None:
    global _heif_registered
    if not _heif_registered:
        from pillow_heif import register_heif_opener

        register_heif_opener()
        _heif_registered = True


# --- sanitize -----------------------------------------------------------------------------------
def sanitize(raw: bytes, filename: str | None = None) -> CleanImage:
    """Decode an untrusted upload safely and return it re-encoded without metadata.

    ``filename`` is accepted for logging by callers but deliberately never used to pick a decoder.
    Raises :class:`PhotoRejected`.
    """
    del filename  # never trusted
    if not raw:
        raise PhotoRejected("not_an_image", "empty upload")
    if len(raw) > MAX_BYTES:
        raise PhotoRejected("too_large", f"{len(raw)} bytes")
    kind = sniff(raw)
    if kind is None:
        raise PhotoRejected("not_an_image")
    if kind not in ("jpeg", "png", "webp", "heif"):
        raise PhotoRejected("unsupported_format", kind)
    if kind == "heif":
        _register_heif()
    formats = {"jpeg": ["JPEG"], "png": ["PNG"], "webp": ["WEBP"], "heif": ["HEIF"]}[kind]

    with warnings.catch_warnings():
        # Pillow warns (and above 2x its own limit raises) on huge images: both are refusals here.
        # (catch_warnings is process-global; our own MAX_PIXELS check below is stricter than Pillow's
        # warning threshold, so a race with another thread cannot let a bomb through.)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=formats)  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PhotoRejected("too_many_pixels", str(exc)) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise PhotoRejected("corrupt", str(exc)) from None
        try:
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise PhotoRejected("too_many_pixels", f"{width}x{height}")
            if min(width, height) < MIN_DECODE_SIDE:
                raise PhotoRejected("too_small", f"{width}x{height}")
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated WebP/PNG: the first frame is the photo
            # JPEG/HEIC can decode at a reduced scale straight away: cheaper than decoding full size
            if kind == "jpeg" and max(width, height) > 2 * MAX_SIDE:
                img.draft("RGB", (MAX_SIDE, MAX_SIDE))
            img.load()
            img = ImageOps.exif_transpose(img)
        except PhotoRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PhotoRejected("too_many_pixels", str(exc)) from None
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise PhotoRejected("corrupt", str(exc)) from None

    keep_png = kind == "png"
    img = _normalise_mode(img, keep_alpha=keep_png)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    # a brand-new image from raw pixels carries no info dict: nothing of the original metadata can leak
    pixels = Image.frombytes(img.mode, img.size, img.tobytes())
    out = io.BytesIO()
    if keep_png:
        pixels.save(out, format="PNG", optimize=False)
        mime = "image/png"
    else:
        pixels.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        mime = "image/jpeg"
    return CleanImage(data=out.getvalue(), mime=mime, width=pixels.width, height=pixels.height, quality=None)


def _normalise_mode(img: Image.Image, *, keep_alpha: bool) -> Image.Image:
    if img.mode in ("RGB", "L") or (keep_alpha and img.mode in ("RGBA", "LA")):
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if keep_alpha:
            return rgba
        # JPEG has no alpha: flatten onto white, as a photo viewer would show it
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return img.point(lambda v: v / 256).convert("L")  # 16-bit grey -> 8-bit
    return img.convert("RGB")  # CMYK, YCbCr, P, 1, ...


# --- assess ---------------------------------------------------------------------------------------
def measure(img: Image.Image) -> dict[str, float]:
    """Sharpness and exposure of a decoded photo (grey copy, longest side at most ASSESS_SIDE)."""
    grey = img.convert("L")
    if max(grey.size) > ASSESS_SIDE:
        grey.thumbnail((ASSESS_SIDE, ASSESS_SIDE), Image.Resampling.BILINEAR)
    a = np.asarray(grey, dtype=np.float32)
    lap_var = _laplacian_var(a)
    reblurred = _laplacian_var(np.asarray(grey.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32))
    return {
        "laplacian_var": round(lap_var, 2),
        "reblur_ratio": round(lap_var / max(reblurred, 1e-6), 3),
        "mean_brightness": round(float(a.mean()), 2),
        "dark_fraction": round(float((a <= DARK_LEVEL).mean()), 4),
        "bright_fraction": round(float((a >= BRIGHT_LEVEL).mean()), 4),
    }


def _laplacian_var(a: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian (interior pixels): high when there are crisp edges."""
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4.0 * a[1:-1, 1:-1]
    return float(lap.var())


def assess(clean: CleanImage) -> QualityReport:
    """Is this (already sanitized) photo good enough to analyse? Problems are codes for :func:`tip`;
    ``ok`` stays True when the only problems are advisory (a small photo is stored, with a retake tip)."""
    with Image.open(io.BytesIO(clean.data)) as img:
        img.load()
        width, height = img.size
        metrics: dict[str, Any] = measure(img)
    metrics.update(width=width, height=height)
    problems: list[str] = []
    if metrics["mean_brightness"] <= DARK_MAX_MEAN or metrics["dark_fraction"] >= DARK_MIN_CLIPPED:
        problems.append("too_dark")
    elif metrics["mean_brightness"] >= BRIGHT_MIN_MEAN or metrics["bright_fraction"] >= BRIGHT_MIN_CLIPPED:
        problems.append("too_bright")
    # a dark or washed-out photo has few edges anyway: only call it blurry when exposure is fine
    if not problems and (metrics["reblur_ratio"] < BLUR_MAX_REBLUR_RATIO
                         or metrics["laplacian_var"] < BLUR_MIN_LAPLACIAN_VAR):
        problems.append("blurry")
    if min(width, height) < MIN_SIDE:
        problems.append("too_small")
    return QualityReport(ok=all(p in ADVISORY_CODES for p in problems), problems=problems, metrics=metrics)


# --- advice ---------------------------------------------------------------------------------------
_TIPS: dict[str, dict[str, str]] = {
    "blurry": {
        "en": "The photo is blurred. Hold the phone still 10-15 cm from the skin, tap the spot on the screen to focus, "
              "and wait a moment before taking the picture.",
        "de": "Das Foto ist unscharf. Halten Sie das Handy ruhig in 10-15 cm Abstand zur Haut, tippen Sie zum Scharfstellen "
              "auf die Stelle im Bild und warten Sie kurz, bevor Sie auslösen.",
    },
    "too_dark": {
        "en": "The photo is too dark. Use daylight near a window or a bright room, without shadows on the skin; do not use the flash.",
        "de": "Das Foto ist zu dunkel. Nutzen Sie Tageslicht am Fenster oder einen hellen Raum ohne Schatten auf der Haut; "
              "bitte keinen Blitz verwenden.",
    },
    "too_bright": {
        "en": "The photo is overexposed. Avoid direct sunlight and the flash; soft, even daylight works best.",
        "de": "Das Foto ist überbelichtet. Vermeiden Sie direktes Sonnenlicht und den Blitz; weiches, gleichmäßiges Tageslicht ist am besten.",
    },
    "too_small": {
        "en": "The photo is too small to show details. Move closer (about 10-15 cm) so the skin spot fills a good part of "
              "the picture, and send it as a normal photo, not a thumbnail.",
        "de": "Das Foto ist zu klein, um Details zu erkennen. Gehen Sie näher heran (etwa 10-15 cm), sodass die Hautstelle "
              "einen guten Teil des Bildes füllt, und senden Sie es als normales Foto, nicht als Vorschaubild.",
    },
    "not_an_image": {
        "en": "This file is not a photo. Please send a picture taken with your phone camera (JPEG, PNG, WebP or HEIC).",
        "de": "Diese Datei ist kein Foto. Bitte senden Sie ein mit der Handykamera aufgenommenes Bild (JPEG, PNG, WebP oder HEIC).",
    },
    "unsupported_format": {
        "en": "This image format is not supported. Please send a JPEG, PNG, WebP or HEIC photo.",
        "de": "Dieses Bildformat wird nicht unterstützt. Bitte senden Sie ein JPEG-, PNG-, WebP- oder HEIC-Foto.",
    },
    "too_large": {
        "en": "This file is too large (over 20 MB). Please send a normal phone photo.",
        "de": "Diese Datei ist zu groß (über 20 MB). Bitte senden Sie ein normales Handyfoto.",
    },
    "too_many_pixels": {
        "en": "This image has too many pixels to be processed safely. Please send a normal phone photo.",
        "de": "Dieses Bild hat zu viele Pixel, um sicher verarbeitet zu werden. Bitte senden Sie ein normales Handyfoto.",
    },
    "corrupt": {
        "en": "This image is damaged and cannot be opened. Please take the photo again and resend it.",
        "de": "Dieses Bild ist beschädigt und kann nicht geöffnet werden. Bitte nehmen Sie das Foto neu auf und senden Sie es erneut.",
    },
}
_GENERAL_TIP = {
    "en": "Tips for a good photo: daylight, no flash, phone 10-15 cm from the skin, the spot in the centre and in focus.",
    "de": "Tipps für ein gutes Foto: Tageslicht, kein Blitz, Handy 10-15 cm von der Haut entfernt, die Stelle mittig und scharf.",
}


def tip(code: str, lang: str = "en") -> str:
    """Concrete advice for a problem or rejection code, in ``lang`` (English when unknown)."""
    texts = _TIPS.get(code, _GENERAL_TIP)
    return texts.get(lang) or texts["en"]
