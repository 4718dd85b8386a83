#!/usr/bin/env bash
# One training run of the explanation generator on the project's GPU machine, in a single device call.
#
# Prepared here (see docs/models.md, "Training on a GPU"):
#   skinbridge train device-kit --sources ham10000 --out .devkit/data    # the photos at 64 px, ~21 MiB
#   pip download diffusers==<version in .venv> -d .whl --no-deps ...     # the GPU machine has no diffusers
# Then, with the device tool: carry [".devkit", ".whl"] and run
#   bash inference/training/device_train.sh NAME MINUTES [train-generator options...]
# Several runs can share the GPU in one call (how well is not measured yet):
#   bash inference/training/device_train.sh eps 8 ... & bash inference/training/device_train.sh v 8 ... & wait
#
# DEVICE, KIT, PYTHON and WHEELS override cuda, .devkit/data, python3 and .whl (tests run it on a CPU).
# Each run leaves $OUT/NAME.tgz (the generator folder + its card and sample grid) and $OUT/NAME.log;
# the device returns at most 8 files, hence the archive.
set -uo pipefail
name=${1:?run name}
minutes=${2:?training minutes}
shift 2
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
"${PYTHON:-python3}" -m inference.training.cli generator --data "${KIT:-.devkit/data}" --cache-dir "$work/cache" \
    --device "${DEVICE:-cuda}" \
    --threads 4 --time-budget "$minutes" --out "$work/generator" --docs "$work/docs" "$@" >"$out/$name.log" 2>&1
status=$?
tar czf "$out/$name.tgz" -C "$work" --exclude=./cache . 2>>"$out/$name.log"
exit $status
