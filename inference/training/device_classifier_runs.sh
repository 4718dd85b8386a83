#!/usr/bin/env bash
# The classifier's GPU experiment (issue 23) in one device call of about 9 minutes, four processes
# sharing the GPU:
#   teacher    ResNet-18-size net (width 64) at 128 px, float16 weights (22 MB), then
#   distilled  the serving-size net (width 16, 96 px) learning from the teacher and the labels;
#   s96        the serving-size net alone, trained for as long as the teacher and the student together;
#   s128, w24  the same at 128 px, and wider (24): what resolution and width buy on validation.
#
# Prepared here:  skinbridge train device-kit --size 128 --format webp --quality 85 --out .devkit/data
# (both data sets, about 30 MiB), then with the device tool: carry [".devkit"], timeout_s 600, and run
#   bash inference/training/device_classifier_runs.sh
# Results: $OUT/<run>.tgz (cut into .00, .01, ... when over 15 MiB), see device_train.sh.
#
# ARM, TEACHER and STUDENT set the minutes; EXTRA adds options to every run and PREBUILD=0 skips the
# shared decoded cache (tests run the whole plan on a CPU with a few photos per label).
set -uo pipefail
here=$(dirname "$0")
arm=${ARM:-7.2}
teacher_minutes=${TEACHER:-3.8}
student_minutes=${STUDENT:-3.1}
extra=${EXTRA:-}
# shellcheck source=inference/training/device_cache.sh
source "$here/device_cache.sh"
# batch 128 with lr 3e-3 (the CPU run: 64 with 2e-3); no checkpoints inside a 9-minute call
S="--batch-size 128 --lr 3e-3 --class-balance 0.5 --mix-prob 0.3 --tta-views 8 --cam-stage -2 --epochs 100000
   --val-every 5 --checkpoint-every 3600 $extra"
# shellcheck disable=SC2086
(
    bash "$here/device_train.sh" classifier teacher "$teacher_minutes" --image-size 128 --width 64 $S \
        --lr 2e-3 --half-weights &&
    bash "$here/device_train.sh" classifier distilled "$student_minutes" --image-size 96 --width 16 $S \
        --teacher /tmp/run-teacher/classifier
) &
# shellcheck disable=SC2086
bash "$here/device_train.sh" classifier s96 "$arm" --image-size 96 --width 16 $S &
# shellcheck disable=SC2086
bash "$here/device_train.sh" classifier s128 "$arm" --image-size 128 --width 16 $S &
# shellcheck disable=SC2086
bash "$here/device_train.sh" classifier w24 "$arm" --image-size 96 --width 24 $S &
wait
"${PYTHON:-python3}" - <<'SUMMARY'
import glob, json, pathlib
for run in sorted(glob.glob("/tmp/run-*")):
    folder, name = pathlib.Path(run), pathlib.Path(run).name[4:]
    m = folder / "classifier" / "metrics.json"
    if not m.exists():
        print(name, "FAILED:", (folder / f"{name}.log").read_text()[-600:])
        continue
    m, t = json.loads(m.read_text()), json.loads((folder / "classifier" / "config.json").read_text())["training"]
    print(name, "epochs", t["epochs_done"], "wall", t["wall_s"], "| HAM val/test bal",
          round(m["ham-grouped-val"]["balanced_acc"], 3), round(m["ham-grouped-test"]["balanced_acc"], 3),
          "| DermNet val top1/3", round(m["dermnet-grouped-val"]["top1"], 3),
          round(m["dermnet-grouped-val"]["top3"], 3))
SUMMARY
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null || true
