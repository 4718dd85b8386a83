# Sourced by the device-call scripts: every run of a call reads the same decoded photos, so the kit is
# decoded once per size (in parallel) into CACHE=/tmp/cache before the runs start. PREBUILD=0 skips it
# (tests: runs on a few photos per label build their own small caches).
if [ "${PREBUILD:-1}" = 1 ]; then
    export CACHE=/tmp/cache
    for size in 96 128; do
        PYTHONPATH=$PWD "${PYTHON:-python3}" -c "from pathlib import Path; from inference.training import data as D
D.build_cache(Path('${KIT:-.devkit/data}'), $size, Path('$CACHE'), progress=False)" &
    done
    wait
fi
