"""Shared types and helpers of the inference engines."""

from __future__ import annotations

import hashlib
import json
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# IPTC "digital source type" for media created by a trained model (C2PA / IPTC photo metadata)
IPTC_TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# A model that failed on a case: the case goes on with what worked and carries one of these flags
# (on its AI result, or on the follow-up answer), which the console shows and the admin page counts.
FLAG_VLM_ERROR = "vlm_error"
FLAG_EXPLAINER_ERROR = "explainer_error"
FLAG_FOLLOWUP_FALLBACK = "followup_vlm_error"
MODEL_FAILURE_FLAGS = (FLAG_VLM_ERROR, FLAG_EXPLAINER_ERROR, FLAG_FOLLOWUP_FALLBACK)


@dataclass
class Prediction:
    """One engine's preliminary assessment of one case (never a diagnosis on its own)."""

    engine: Literal["classifier", "vlm"]
    model_id: str
    model_version: str
    weights_sha256: str
    differential: list[dict[str, Any]]  # [{"code": str, "probability": float}], sorted by probability desc
    description: str | None = None
    features: dict[str, Any] | None = None
    flags: list[str] = field(default_factory=list)
    urgency_hints: list[str] = field(default_factory=list)
    advice: str | None = None
    saliency_png: bytes | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def top(self) -> dict[str, Any] | None:
        return self.differential[0] if self.differential else None

    def to_dict(self, *, include_saliency: bool = False) -> dict[str, Any]:
        data = asdict(self)
        if not include_saliency:
            data.pop("saliency_png")
        return data


def model_sha256(path: str | Path) -> str:
    """SHA-256 over a model's weight files (name + content, sorted), so a result names the exact
    weights that produced it. A single file is hashed directly."""
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no weight files under {path}")
    digest = hashlib.sha256()
    for file in files:
        if len(files) > 1:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def pick_device(setting: str | None = "auto") -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; anything else is used as given."""
    import torch

    if not setting or setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {setting!r} requested but no CUDA GPU is available")
    return setting


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def mark_ai_generated(image: Image.Image, caption: str, *, generator: str = "skinbridge") -> bytes:
    """Return PNG bytes of ``image`` with a visible caption strip below it and machine-readable
    provenance (PNG text chunks + XMP with the IPTC digital source type), so the picture can never
    be mistaken for a patient photo, neither by a person nor by software."""
    image = image.convert("RGB")
    w, h = image.size
    font_size = max(9, min(18, w // 24))
    font = _font(font_size)
    # wrap the caption to the image width
    draw_probe = ImageDraw.Draw(image)
    words, lines, line = caption.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw_probe.textlength(trial, font=font) <= w - 8 or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    strip_h = (font_size + 4) * len(lines) + 6
    canvas = Image.new("RGB", (w, h + strip_h), (20, 20, 20))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        draw.text((4, h + 3 + i * (font_size + 4)), text, fill=(255, 255, 255), font=font)

    xmp = (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:dc="http://purl.org/dc/elements/1.1/" '
        f'Iptc4xmpExt:DigitalSourceType="{IPTC_TRAINED_ALGORITHMIC_MEDIA}">'
        f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{_xml_escape(caption)}</rdf:li></rdf:Alt>'
        "</dc:description></rdf:Description></rdf:RDF></x:xmpmeta>"
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("ai_generated", "true")
    info.add_text("generator", generator)
    info.add_text("caption", caption)
    info.add_text("digital_source_type", IPTC_TRAINED_ALGORITHMIC_MEDIA)
    info.add_itxt("XML:com.adobe.xmp", xmp)
    out = io.BytesIO()
    canvas.save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def read_ai_marker(png: bytes) -> dict[str, str]:
    """The provenance text chunks of a PNG (empty when it carries none)."""
    with Image.open(io.BytesIO(png)) as img:
        return {str(k): str(v) for k, v in getattr(img, "text", {}).items()}


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


CONFIG_NAME = "config.json"


class JsonConfig:
    """Dataclass configs saved as ``config.json`` beside the weights; unknown keys are ignored on
    load so older code reads newer folders."""

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")  # type: ignore[call-overload]
        return path

    @classmethod
    def load(cls, folder: str | Path):  # type: ignore[no-untyped-def]
        data = json.loads((Path(folder) / CONFIG_NAME).read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})  # type: ignore[attr-defined]
