"""What every training run shares: its settings base class and its start (threads, seeds, device,
log, decoded image cache, splits)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.training import data as D


@dataclass
class TrainingRun:
    data: Path
    out: Path
    epochs: int = 20
    seed: int = 0
    device: str = "auto"
    batch_size: int = 64
    lr: float = 1e-3
    ema_decay: float = 0.998
    min_per_class: int = 10  # vocabulary codes with fewer training photos are not learnt
    time_budget_s: float | None = None  # wall clock; the lr schedule follows elapsed time when set
    threads: int = 2
    cache_dir: Path = Path("var/cache")
    items_per_label: int | None = None  # tests: a handful of photos per raw label and split
    docs_img: Path | None = None  # where plots for docs/ go (docs/img)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def small_subset(data: Path, per_label: int) -> list[D.RawItem]:
    """A few photos per (raw label, DermaMNIST split) for fast tests on real images."""
    dm = D.dermamnist_split(data)
    seen: dict[tuple[str, str], int] = {}
    picked = []
    for it in D.ham_items(data) + D.dermnet_items(data):
        key = (it.raw_label, dm.get(it.key, "dermnet"))
        if seen.get(key, 0) < per_label:
            seen[key] = seen.get(key, 0) + 1
            picked.append(it)
    return picked


def run_items(run: TrainingRun) -> list[D.RawItem]:
    """The photos a run decodes: all of HAM10000 + DermNet, or a few per label for tests."""
    if run.items_per_label:
        return small_subset(run.data, run.items_per_label)
    return D.ham_items(run.data) + D.dermnet_items(run.data)


def prepare_run(run: TrainingRun, image_size: int, *, keep_log: bool = False
                ) -> tuple[torch.Generator, str, Path, Any, dict[str, np.ndarray]]:
    """Threads, seeds, device, the log (fresh unless a resumed run continues it), the labelled image
    cache at ``image_size`` and the splits."""
    from inference.engines.base import pick_device

    torch.set_num_threads(run.threads)
    gen = seed_everything(run.seed)
    device = pick_device(run.device)
    run.out.mkdir(parents=True, exist_ok=True)
    log_path = run.out / "train_log.jsonl"
    if not keep_log:
        log_path.write_text("")
    labelled = D.label(D.build_cache(run.data, image_size, run.cache_dir, items=run_items(run)))
    return gen, device, log_path, labelled, D.split_masks(run.data, labelled)
