"""Does the classifier's Grad-CAM sit on the lesion? A grid for the eye and a number for the card.

Dermoscopic photos (HAM10000) centre one lesion that is darker than the skin around it, so a rough
lesion mask is the dark part of the photo (Otsu's threshold on a blurred grey image). The number is
the share of the heat map's mass that falls on that mask, against the mask's share of the photo
(what a map spread evenly would score); and how often the map's peak lies on the lesion. Both run
the engine's own Grad-CAM (:meth:`ClassifierEngine.gradcam`) on the validation photos.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from inference.training import data as D


def otsu(values: np.ndarray) -> float:
    """Otsu's threshold of 8-bit values: the cut that maximises the between-class variance."""
    hist = np.bincount(np.clip(values, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256)
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * levels)
    total, total_mean = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mean * weight - mean * total) ** 2 / (weight * (total - weight))
    return float(np.nanargmax(between[:-1]))


def lesion_mask(image: Image.Image, size: int) -> np.ndarray:
    """Boolean size x size mask of the dark (lesion) part of a centre-cropped dermoscopic photo."""
    grey = Image.fromarray(D.square_resize(image, size)).convert("L").filter(ImageFilter.GaussianBlur(2))
    values = np.asarray(grey, dtype=np.float32)
    return values <= otsu(values)


def validation_photos(data: Path, source: str, n: int, seed: int = 0) -> list[tuple[D.RawItem, str]]:
    """``n`` photos of the grouped validation split of ``source`` ("ham10000" | "dermnet"), spread over
    labels, each with its vocabulary code."""
    items = D.ham_items(data) + D.dermnet_items(data)
    split = D.grouped_splits(items)
    keep, codes = D.item_codes(items)
    pool = [(items[i], c) for i, c in zip(keep, codes, strict=True)
            if items[i].source == source and split[items[i].key] == "val"]
    rng = np.random.default_rng(seed)
    by_code: dict[str, list[D.RawItem]] = {}
    for it, code in pool:
        by_code.setdefault(code, []).append(it)
    for group in by_code.values():
        rng.shuffle(group)
    picked: list[tuple[D.RawItem, str]] = []
    while len(picked) < n and any(by_code.values()):  # round robin over labels: rare ones are shown too
        for code in sorted(by_code):
            if by_code[code] and len(picked) < n:
                picked.append((by_code[code].pop(), code))
    return picked


def lesion_overlap(model: Path, data: Path, *, n: int = 200, stages: tuple[int, ...] = (-1, -2)) -> dict[str, Any]:
    """Heat on the lesion for each Grad-CAM stage, over ``n`` dermoscopic validation photos."""
    from inference.engines.classifier import ClassifierEngine

    engine = ClassifierEngine.load(model, device="cpu")
    size = engine.config.image_size
    photos = validation_photos(data, "ham10000", n)
    stats: dict[int, list[tuple[float, bool]]] = {stage: [] for stage in stages}  # (heat on lesion, peak on it)
    areas = []
    for it, _code in photos:  # each photo decoded, masked and classified once; its map drawn per stage
        with Image.open(D.item_path(data, it)) as img:
            rgb = img.convert("RGB")
        mask = lesion_mask(rgb, size)
        areas.append(float(mask.mean()))
        top = int(engine.probabilities([rgb], "dermoscopic")[0].argmax())
        for stage in stages:
            engine.config.cam_stage = stage
            cam = engine.gradcam(rgb, "dermoscopic", top)
            total = float(cam.sum())
            stats[stage].append((float(cam[mask].sum()) / total if total > 0 else float(mask.mean()),
                                 bool(mask.flat[int(cam.argmax())])))
    out: dict[str, Any] = {"n": len(photos), "photos": "HAM10000 lesion-grouped validation"}
    for stage, rows in stats.items():
        out[f"stage{stage}"] = {"heat_on_lesion": float(np.mean([on for on, _ in rows])),
                                "lesion_area": float(np.mean(areas)),
                                "peak_on_lesion": float(np.mean([peak for _, peak in rows]))}
    return out


def saliency_grid(model: Path, data: Path, out: Path, *, per_source: int = 12, columns: int = 6,
                  tile: int = 160) -> Path:
    """A grid of validation photos (half dermoscopic, half clinical) with the engine's Grad-CAM overlay,
    each tile captioned with the top class and its probability."""
    from PIL import ImageDraw

    from inference.engines.classifier import ClassifierEngine

    engine = ClassifierEngine.load(model, device="cpu")
    tiles = []
    for source, image_type in (("ham10000", "dermoscopic"), ("dermnet", "clinical")):
        for it, label in validation_photos(data, source, per_source):
            with Image.open(D.item_path(data, it)) as img:
                rgb = img.convert("RGB")
            probs = engine.probabilities([rgb], image_type)[0]
            top = int(probs.argmax())
            overlay = Image.open(io.BytesIO(engine.saliency_png(rgb, image_type, top)))
            side = min(overlay.size)
            left, upper = (overlay.width - side) // 2, (overlay.height - side) // 2
            square = overlay.crop((left, upper, left + side, upper + side)).resize((tile, tile))
            framed = Image.new("RGB", (tile, tile + 30), "white")
            framed.paste(square, (0, 0))
            draw = ImageDraw.Draw(framed)
            draw.text((3, tile + 2), f"true {label[:22]}", fill="black")
            draw.text((3, tile + 15), f"AI {engine.config.class_codes[top][:18]} {float(probs[top]):.0%}", fill="black")
            tiles.append(framed)
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * tile, rows * (tile + 30)), "white")
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % columns) * tile, (k // columns) * (tile + 30)))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out
