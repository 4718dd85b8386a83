#!/usr/bin/env bash
# The next classifier call on the GPU machine (issue 23), planned from the runs of 4 December
# (docs/models.md): those were bound by per-step overhead (about 45 ms a step whatever the net), so
# this call runs one process at a time with batches four times larger, and gives the teacher most of it:
#   teacher     ResNet-18-size net (width 64) at 128 px, batch 512, float16 weights (22 MB);
#   d16, d24    the serving-size nets (width 16 and 24, 96 px) distilled from it, one after the other.
# Prepared here as for device_classifier_runs.sh (the 128 px WebP kit); device tool: carry [".devkit"],
# timeout_s 600, and run   bash inference/training/device_classifier_distill.sh
# TEACHER, STUDENT set the minutes, EXTRA adds options to every run, PREBUILD=0 skips the shared cache.
set -uo pipefail
here=$(dirname "$0")
teacher_minutes=${TEACHER:-4.2}
student_minutes=${STUDENT:-1.6}
extra=${EXTRA:-}
# shellcheck source=inference/training/device_cache.sh
source "$here/device_cache.sh"
S="--batch-size 512 --class-balance 0.5 --mix-prob 0.3 --tta-views 8 --cam-stage -2 --epochs 100000 --val-every 10
   --checkpoint-every 3600 $extra"
# shellcheck disable=SC2086
bash "$here/device_train.sh" classifier teacher "$teacher_minutes" --image-size 128 --width 64 --lr 4e-3 $S \
    --half-weights || exit 1
for width in 16 24; do
    # shellcheck disable=SC2086
    bash "$here/device_train.sh" classifier "d$width" "$student_minutes" --image-size 96 --width "$width" \
        --lr 6e-3 $S --teacher /tmp/run-teacher/classifier
done
for run in /tmp/run-*; do
    tail -n 1 "$run/classifier/train_log.jsonl" 2>/dev/null | sed "s|^|$(basename "$run"): |"
done
