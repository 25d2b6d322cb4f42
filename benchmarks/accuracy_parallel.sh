#!/usr/bin/env bash
# benchmarks/accuracy.py on a many-core machine: one process per kind and seed group, 2 threads
# each (same figures as one process, up to thread-order rounding).
# Usage: bash benchmarks/accuracy_parallel.sh OUT_PREFIX [accuracy.py options, e.g. --set preset='"prior"']
#   SEEDS="1,2,3,4,5,6 7,8,9,10,11,12" (the default) sets the seed groups; writes OUT_PREFIX.out
#   (every process's output) and OUT_PREFIX.jsonl (one row per region).
set -euo pipefail
out=$1; shift
work=$(mktemp -d)
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2
for k in points traffic urban; do
  for s in ${SEEDS:-1,2,3,4,5,6 7,8,9,10,11,12}; do
    python "$(dirname "$0")/accuracy.py" --kinds "$k" --seeds "$s" --set threads=2 "$@" > "$work/$k-${s%%,*}.out" 2>&1 &
  done
done
wait
cat "$work"/*.out > "$out.out"
grep -h '^{' "$work"/*.out > "$out.jsonl"
rm -rf "$work"
grep -h "geometric" "$out.out"
