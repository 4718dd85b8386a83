"""Two classifier folders on the photos *neither* trained on: `python -m inference.training.compare_unseen OLD NEW`.

v1 (48 px) trained on the DermaMNIST train split and 80 % of DermNet per topic; v2 on the lesion/series
-grouped train splits. Each one's test split contains photos the other trained on, so the fair common
ground is the intersection: HAM10000 lesions outside DermaMNIST train/val *and* outside the grouped
train split; DermNet photos in v1's validation split *and* outside the grouped train split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from inference.training import data as D
from inference.training.evaluate import evaluate_split, load_model


def compare(folders: dict[str, Path], data: Path, cache_dir: Path = Path("var/cache")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, folder in folders.items():
        model, config = load_model(folder)
        labelled = D.label(D.build_cache(data, config["image_size"], cache_dir, progress=False))
        unseen = D.never_trained_on(D.split_masks(data, labelled))
        h = evaluate_split(model, config, labelled, unseen["ham10000"], "ham-grouped-test")
        d = evaluate_split(model, config, labelled, unseen["dermnet"], "dermnet-grouped-test")
        out[name] = {"ham": {k: h[k] for k in ("n", "acc", "balanced_acc", "auc_macro_ovr")},
                     "ham_melanoma": h["operating_points"].get("melanoma"),
                     "dermnet": {k: d[k] for k in ("n", "top1", "top3")},
                     "dermnet_melanoma": d["operating_points"].get("melanoma")}
    return out


if __name__ == "__main__":
    old, new = (Path(a) for a in sys.argv[1:3])
    data = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("../shared/data")
    print(json.dumps(compare({"old": old, "new": new}, data), indent=1))
