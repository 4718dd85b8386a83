#!/usr/bin/env bash
# One training run (classifier or explanation generator) on the project's GPU machine, in a device call.
#
# Prepared here (see docs/models.md, "Training on a GPU"):
#   skinbridge train device-kit --sources ham10000 --out .devkit/data    # the photos at 64 px, ~21 MiB
#   pip download diffusers==<version in .venv> -d .whl --no-deps ...     # generator only: no diffusers there
# Then, with the device tool: carry [".devkit", ".whl"] and run
#   bash inference/training/device_train.sh generator|classifier NAME MINUTES [that trainer's options...]
# Several runs can share the GPU in one call:
#   bash inference/training/device_train.sh generator eps 8 ... & bash ... generator v 8 ... & wait
#
# DEVICE, KIT, PYTHON, WHEELS and CACHE override cuda, .devkit/data, python3, .whl and the run's own cache
# folder (tests run it on a CPU; runs of one call can share a cache built beforehand).
# Each run leaves $OUT/NAME.tgz (the model folder, its card and plots, and the run's log NAME.log), cut
# into NAME.tgz.00, .01, ... of 15 MiB when larger: a device call returns at most 8 files of 16 MiB.
# Join them with `cat NAME.tgz.* > NAME.tgz`.
set -uo pipefail
trainer=${1:?generator or classifier}
name=${2:?run name}
minutes=${3:?training minutes}
shift 3
case "$trainer" in
    generator|classifier) ;;
    *) echo "unknown trainer $trainer: generator or classifier" >&2; exit 2 ;;
esac
out=${OUT:-/tmp/out}
mkdir -p "$out"
wheels=${WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    "${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
work="/tmp/run-$name"
rm -rf "$work"
mkdir -p "$work"
"${PYTHON:-python3}" -m inference.training.cli "$trainer" --data "${KIT:-.devkit/data}" \
    --cache-dir "${CACHE:-$work/cache}" --device "${DEVICE:-cuda}" \
    --threads 4 --time-budget "$minutes" --out "$work/$trainer" --docs "$work/docs" "$@" >"$work/$name.log" 2>&1
status=$?
tar czf "$out/$name.tgz" -C "$work" --exclude=./cache --exclude=checkpoint.pt .
if [ "$(stat -c %s "$out/$name.tgz")" -gt $((15 * 1024 * 1024)) ]; then
    split -b 15m -d "$out/$name.tgz" "$out/$name.tgz." && rm "$out/$name.tgz"
fi
exit $status
