#!/usr/bin/env bash
# The classifier card's A/B arms (issue 23): short runs with equal epochs, one CPU thread each, on the
# lesion/series-grouped splits; then `skinbridge train classifier-report --ab LABEL=var/train/ab-NAME ...`
# puts their validation numbers into the card. Usage: inference/training/ab_classifier.sh [DATA] [EPOCHS]
set -euo pipefail
data=${1:-../shared/data}
epochs=${2:-6}
arm() { name=$1; shift
  OMP_NUM_THREADS=1 skinbridge train classifier --data "$data" --epochs "$epochs" --threads 1 --tta-views 8 \
    --seed 0 --lr 0.002 --batch-size 64 --out "var/train/ab-$name" --docs var/train/docs-ab "$@" \
    > "var/train/ab-$name.log" 2>&1
  echo "$name done $(date +%T)"; }
mkdir -p var/train
arm A-48px-w16-cb025 --image-size 48 --width 16 --class-balance 0.25
arm B-96px-w16-cb025 --image-size 96 --width 16 --class-balance 0.25
arm C-96px-w16-cb05 --image-size 96 --width 16 --class-balance 0.5
arm D-96px-w16-cb05-mix03 --image-size 96 --width 16 --class-balance 0.5 --mix-prob 0.3
arm E-96px-w24-cb05-mix03 --image-size 96 --width 24 --class-balance 0.5 --mix-prob 0.3
