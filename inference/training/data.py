"""Training data: decode every photo once into a cached uint8 array, map labels, build splits.

The cache stores pixels plus the *raw* dataset labels (HAM10000 ``dx`` code, DermNet topic), so the
vocabulary grouping can change without decoding 14k JPEGs again; labels are mapped when loaded.

Splits (all deterministic):
- ``dermamnist``: the exact DermaMNIST (MedMNIST v2) train/val/test split, for the published table.
- ``ham_lesion``: lesion-disjoint evaluation. Test = DermaMNIST-test images whose ``lesion_id`` has no
  image in DermaMNIST train/val (val likewise w.r.t. train). One model trained on the DermaMNIST train
  split is thus evaluated honestly on lesions it never saw, with no second training run.
- ``dermnet``: stratified (by DermNet topic) 80/20 train/val split (the explanation generator's).
- ``ham-grouped`` / ``dermnet-grouped`` (classifier v2): 70/15/15 train/val/test, grouped so that no
  lesion (HAM10000 ``lesion_id``) and no DermNet photo series (``acne-face-1-12.jpg`` and
  ``acne-face-1-28.jpg`` are one series) is on two sides, stratified by diagnosis / topic. The
  classifier trains, calibrates and picks its thresholds on these only; DermaMNIST stays a
  published-comparison line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from inference.engines.imaging import square_crop

DERMOSCOPIC, CLINICAL = 0, 1
IMAGE_TYPES = {"dermoscopic": DERMOSCOPIC, "clinical": CLINICAL}

# Fallback when inference/data/ham10000_grouping.csv is missing: HAM10000 dx code -> vocabulary slug.
HAM_FALLBACK = {
    "akiec": "actinic_keratosis",
    "bcc": "basal_cell_carcinoma",
    "bkl": "seborrheic_keratosis",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "nevus",
    "vasc": "vascular_lesion",
}
HAM_DX = tuple(HAM_FALLBACK)  # fixed order used by the DermaMNIST label indices
GROUPING_DIR = Path(__file__).resolve().parent.parent / "data"
CACHE_VERSION = 2


# --- preprocessing (shared with inference so evaluation sees what the engine sees) -------------
def square_resize(img: Image.Image, size: int) -> np.ndarray:
    """The engines' square view (:func:`inference.engines.imaging.square_crop`) as HxWx3 uint8."""
    return np.asarray(square_crop(img, size), dtype=np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as img:
        return square_resize(ImageOps.exif_transpose(img), size)


# --- raw index of both datasets ---------------------------------------------------------------
@dataclass(frozen=True)
class RawItem:
    source: str  # "ham10000" | "dermnet"
    key: str  # HAM image_id or DermNet relative path
    raw_label: str  # HAM dx code or DermNet topic
    group: str  # HAM lesion_id; DermNet: the key itself (no grouping info)
    image_type: int


def ham_items(data: Path) -> list[RawItem]:
    with open(data / "ham10000" / "HAM10000_metadata.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: r["image_id"])
    return [RawItem("ham10000", r["image_id"], r["dx"], r["lesion_id"], DERMOSCOPIC) for r in rows]


def dermnet_items(data: Path) -> list[RawItem]:
    with open(data / "dermnet" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows.sort(key=lambda r: r["path"])
    return [RawItem("dermnet", r["path"], r["condition"], r["path"], CLINICAL) for r in rows]


def item_path(data: Path, item: RawItem) -> Path:
    if item.source == "ham10000":
        return data / "ham10000" / "images" / f"{item.key}.jpg"
    return data / "dermnet" / item.key


# --- pixel cache ----------------------------------------------------------------------------------
@dataclass
class Cache:
    images: np.ndarray  # N x S x S x 3 uint8
    items: list[RawItem]

    @property
    def size(self) -> int:
        return int(self.images.shape[1])


def _cache_name(items: Sequence[RawItem], size: int) -> str:
    digest = hashlib.sha256()
    for it in items:
        digest.update(f"{it.source}|{it.key}\n".encode())
    return f"skin_{size}px_v{CACHE_VERSION}_{digest.hexdigest()[:12]}"


def build_cache(
    data: Path,
    size: int,
    cache_dir: Path,
    *,
    items: Sequence[RawItem] | None = None,
    progress: bool = True,
) -> Cache:
    """Decode ``items`` (default: all of HAM10000 + DermNet) once at ``size`` px, or load the cache."""
    items = list(items) if items is not None else ham_items(data) + dermnet_items(data)
    name = _cache_name(items, size)
    npy, meta = cache_dir / f"{name}.npy", cache_dir / f"{name}.json"
    if npy.exists() and meta.exists():
        return Cache(np.load(npy, mmap_mode="r"), items)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    iterator: Iterable[tuple[int, RawItem]] = enumerate(items)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(items), desc=f"decode {size}px", mininterval=5)
    for i, it in iterator:
        out[i] = load_image(item_path(data, it), size)
    tmp = npy.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(npy)  # atomic: a killed run never leaves a half-written cache behind
    meta.write_text(json.dumps({"size": size, "count": len(items), "version": CACHE_VERSION}))
    return Cache(out, items)


# --- label mapping through the vocabulary grouping --------------------------------------------
def _read_grouping(path: Path, source_cols: Sequence[str]) -> dict[str, str | None]:
    """Read a grouping CSV: a source-label column -> vocabulary code column (blank = excluded)."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        src = next((c for c in source_cols if c in fields), fields[0])
        dst = next((c for c in ("code", "vocabulary_code", "slug", "condition_code") if c in fields), fields[-1])
        return {row[src].strip(): (row[dst].strip() or None) for row in reader}


def ham_grouping() -> dict[str, str | None]:
    path = GROUPING_DIR / "ham10000_grouping.csv"
    if path.exists():
        return _read_grouping(path, ("dx", "ham_dx", "source", "label"))
    return dict(HAM_FALLBACK)


def dermnet_grouping() -> dict[str, str | None] | None:
    path = GROUPING_DIR / "dermnet_grouping.csv"
    if path.exists():
        return _read_grouping(path, ("condition", "dermnet_topic", "topic", "source", "label"))
    return None


@dataclass
class Labelled:
    """The cache with labels mapped to vocabulary codes; rows without a code are dropped."""

    images: np.ndarray
    items: list[RawItem]
    codes: list[str]  # per-row vocabulary code
    image_type: np.ndarray  # per-row 0/1


def item_codes(items: Sequence[RawItem]) -> tuple[list[int], list[str]]:
    """Indices of the items whose label maps to a vocabulary code, and those codes (no pixels needed)."""
    ham_map = ham_grouping()
    dn_map = dermnet_grouping()
    keep, codes = [], []
    for i, it in enumerate(items):
        if it.source == "ham10000":
            code = ham_map.get(it.raw_label)
        else:
            code = dn_map.get(it.raw_label) if dn_map is not None else None
        if code:
            keep.append(i)
            codes.append(code)
    return keep, codes


def label(cache: Cache, *, min_per_class: int = 1) -> Labelled:
    keep, codes = item_codes(cache.items)
    if min_per_class > 1:
        counts: dict[str, int] = defaultdict(int)
        for c in codes:
            counts[c] += 1
        pairs = [(i, c) for i, c in zip(keep, codes, strict=True) if counts[c] >= min_per_class]
        keep, codes = [p[0] for p in pairs], [p[1] for p in pairs]
    idx = np.asarray(keep, dtype=np.int64)
    items = [cache.items[i] for i in keep]
    return Labelled(
        images=cache.images[idx] if len(idx) else cache.images[:0],
        items=items,
        codes=codes,
        image_type=np.asarray([it.image_type for it in items], dtype=np.int64),
    )


# --- splits ---------------------------------------------------------------------------------------
def dermamnist_split(data: Path) -> dict[str, str]:
    """image_id -> "train" | "val" | "test" (the exact DermaMNIST split)."""
    with open(data / "ham10000" / "dermamnist_split.csv", newline="") as fh:
        return {r["image_id"]: r["split"] for r in csv.DictReader(fh)}


def ham_lesion_split(data: Path) -> dict[str, str]:
    """image_id -> split, lesion-disjoint from DermaMNIST train (see module docstring).

    Images of lesions that also appear in DermaMNIST train are labelled "excluded" for val/test.
    """
    dm = dermamnist_split(data)
    lesion = {it.key: it.group for it in ham_items(data)}
    train_lesions = {lesion[i] for i, s in dm.items() if s == "train"}
    seen_lesions = train_lesions | {lesion[i] for i, s in dm.items() if s == "val"}
    out = {}
    for image_id, s in dm.items():
        if s == "train":
            out[image_id] = "train"
        elif s == "val":
            out[image_id] = "val" if lesion[image_id] not in train_lesions else "excluded"
        else:
            out[image_id] = "test" if lesion[image_id] not in seen_lesions else "excluded"
    return out


def dermnet_split(items: Sequence[RawItem], *, val_fraction: float = 0.2, seed: int = 0) -> dict[str, str]:
    """DermNet path -> "train" | "val", stratified by DermNet topic (every topic has >= 16 photos)."""
    by_topic: dict[str, list[str]] = defaultdict(list)
    for it in items:
        if it.source == "dermnet":
            by_topic[it.raw_label].append(it.key)
    rng = np.random.default_rng(seed)
    out = {}
    for topic in sorted(by_topic):
        keys = sorted(by_topic[topic])
        rng.shuffle(keys)
        n_val = max(1, round(len(keys) * val_fraction))
        for j, k in enumerate(keys):
            out[k] = "val" if j < n_val else "train"
    return out


# what `skinbridge train evaluate-classifier --split` accepts: the grouped splits first, then the
# published-comparison (DermaMNIST) and legacy ones
EVALUATION_SPLITS = ("ham-grouped-test", "ham-grouped-val", "dermnet-grouped-test", "dermnet-grouped-val",
                     "dermamnist-test", "dermamnist-val", "ham-lesion-test", "ham-lesion-val", "dermnet-val")
GROUPED_FRACTIONS = (("test", 0.15), ("val", 0.15))  # the rest is "train"


def _rank(seed: int, key: str) -> str:
    """A stable pseudo-random order (independent of Python's hash seed and of list order)."""
    return hashlib.sha256(f"{seed}|{key}".encode()).hexdigest()


def grouped_split(strata: dict[str, set[str]], *, seed: int = 0) -> dict[str, str]:
    """group -> "train" | "val" | "test": whole groups per stratum, GROUPED_FRACTIONS of them held out.

    Each stratum (a diagnosis, a topic) keeps its proportions; strata with fewer than 3 groups go to
    train whole (nothing to validate a class on is better than a class seen only at test time).
    """
    out: dict[str, str] = {}
    for stratum in sorted(strata):
        groups = sorted(strata[stratum], key=lambda g: _rank(seed, g))
        start = 0
        for split, fraction in GROUPED_FRACTIONS:
            n = max(1, round(len(groups) * fraction)) if len(groups) >= 3 else 0
            for g in groups[start : start + n]:
                out[g] = split
            start += n
        for g in groups[start:]:
            out[g] = "train"
    return out


def series(key: str) -> str:
    """DermNet photo series: ``acne-face-1-12.jpg`` and ``acne-face-1-28.jpg`` are photos 12 and 28 of
    series ``acne-face-1`` (likely one patient) and go to one side; a single number (``acne-face-48``)
    is just the photo's index in its topic, so that photo is its own group."""
    folder, _, name = key.rpartition("/")
    stem = re.sub(r"\.\w+$", "", name)
    match = re.fullmatch(r"(.*-\d+)-\d+", stem)
    return f"{folder}/{match.group(1) if match else stem}"


def grouped_splits(items: Sequence[RawItem], *, seed: int = 0) -> dict[str, str]:
    """Item key -> "train" | "val" | "test" for both data sets, without group leakage (see module doc)."""
    strata: dict[str, set[str]] = defaultdict(set)
    group_of: dict[str, str] = {}
    for it in items:
        group = f"{it.source}|{it.group if it.source == 'ham10000' else series(it.key)}"
        # a HAM lesion has one dx; a DermNet series lies in one topic folder
        strata[f"{it.source}|{it.raw_label}"].add(group)
        group_of[it.key] = group
    by_group = grouped_split(strata, seed=seed)
    return {key: by_group[g] for key, g in group_of.items()}


def split_masks(data: Path, labelled: Labelled | Sequence[RawItem]) -> dict[str, np.ndarray]:
    """Boolean row masks over ``labelled`` (or bare items) for every split the trainer and evaluator use.

    The splits are the project's, fixed: a run's ``--seed`` changes its initialisation and draws, never
    which photos are held out (runs with other seeds would otherwise train on each other's test photos).
    """
    items = labelled.items if isinstance(labelled, Labelled) else list(labelled)
    dm = dermamnist_split(data)
    hl = ham_lesion_split(data)
    dn = dermnet_split(items)
    n = len(items)
    masks = {k: np.zeros(n, dtype=bool) for k in (
        "train", "val", "dermamnist-train", "dermamnist-val", "dermamnist-test",
        "ham-lesion-val", "ham-lesion-test", "dermnet-train", "dermnet-val",
        *(f"{src}-grouped-{s}" for src in ("ham", "dermnet") for s in ("train", "val", "test")),
    )}
    # assigned over the whole data sets, so a subset (one split, a test's few photos) gets the same sides
    grouped = grouped_splits(ham_items(data) + dermnet_items(data))
    for i, it in enumerate(items):
        if it.source == "ham10000":
            s = dm.get(it.key)
            if s is None:
                continue
            masks[f"dermamnist-{s}"][i] = True
            h = hl.get(it.key)
            if h in ("val", "test"):
                masks[f"ham-lesion-{h}"][i] = True
            masks[f"ham-grouped-{grouped[it.key]}"][i] = True
        else:
            masks[f"dermnet-{dn[it.key]}"][i] = True
            masks[f"dermnet-grouped-{grouped[it.key]}"][i] = True
    # Joint training set and the calibration set of the classifier (never a test set), grouped.
    masks["train"] = masks["ham-grouped-train"] | masks["dermnet-grouped-train"]
    masks["val"] = masks["ham-grouped-val"] | masks["dermnet-grouped-val"]
    return masks


def ever_trained_on(masks: dict[str, np.ndarray]) -> np.ndarray:
    """Photos a default model may have trained on: the grouped training split (the classifier since v2, the
    generator runs since 3 December 2026) or the earlier DermaMNIST-train / DermNet-80 % split (classifier
    v1 and the generator runs before)."""
    return masks["train"] | masks["dermamnist-train"] | masks["dermnet-train"]


def never_trained_on(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per source, the photos held out by both split schemes (lesion-disjoint for HAM10000): the fair ground
    for measuring a model whichever scheme it trained on, and for comparing models of both."""
    held_out = masks["ham-grouped-val"] | masks["ham-grouped-test"]
    return {"ham10000": masks["ham-lesion-test"] & held_out,
            "dermnet": masks["dermnet-val"] & (masks["dermnet-grouped-val"] | masks["dermnet-grouped-test"])}
