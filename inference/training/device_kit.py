"""The training data, shrunk to travel to a GPU machine.

The project's GPU machine gets a copy of the repository only (at most 64 MiB per call), not
``../shared/data``. The kit is a folder with the same layout as the data folder (so every trainer takes
it as ``--data``): the label and split files, the data sets' READMEs (licences and attribution), and
every photo already square-cropped and resized to the training size exactly as the trainer does it,
stored as JPEG or WebP (under the photo's own file name: readers go by the content, and the trainers'
paths stay those of the data folder). Decoding a kit photo at that size gives the trainer's pixels up
to compression rounding: about 2 grey levels on average at quality 85-95.

The kit is derived from non-commercial data: it stays out of git (``.devkit/`` is ignored) and is only
carried to the machine for a training call.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image

from inference.training import data as D
from inference.training.run import small_subset

# the files beside the photos that the trainers read, plus the licences
_METADATA = {
    "ham10000": ("HAM10000_metadata.csv", "dermamnist_split.csv", "README.md"),
    "dermnet": ("labels.csv", "README.md"),
}
_SOURCES = tuple(_METADATA)


def build_device_kit(data: Path, out: Path, size: int, *, quality: int = 95, image_format: str = "jpeg",
                     sources: tuple[str, ...] = _SOURCES, per_label: int | None = None) -> dict[str, int]:
    """Write the kit for ``sources`` under ``out``; returns its photo count and size in bytes.

    A data set left out still gets its (empty) label file, so the trainers read the kit like the
    full data folder. ``per_label``: only the photos a ``--subset-per-label`` run uses (tests)."""
    unknown = sorted(set(sources) - set(_METADATA))
    if unknown:
        raise ValueError(f"unknown data sets {', '.join(unknown)}; known: {', '.join(_METADATA)}")
    # written beside ``out`` and swapped in at the end: a failure (a photo missing, say) keeps the old kit
    building = out.with_name(out.name + ".partial")
    if building.exists():
        shutil.rmtree(building)
    try:
        for source, names in _METADATA.items():
            (building / source).mkdir(parents=True)
            for name in names:
                if source in sources:
                    shutil.copy2(data / source / name, building / source / name)
        if "dermnet" not in sources:
            (building / "dermnet" / "labels.csv").write_text("path,condition\n")
        items = small_subset(data, per_label) if per_label else D.ham_items(data) + D.dermnet_items(data)
        items = [it for it in items if it.source in sources]
        for item in items:
            target = D.item_path(building, item)
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(D.load_image(D.item_path(data, item), size)).save(target, image_format.upper(),
                                                                             quality=quality)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    building.rename(out)
    return {"photos": len(items), "bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}
