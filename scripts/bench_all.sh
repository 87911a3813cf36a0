#!/usr/bin/env bash
# Every figure in README.md's Results section, one command after another, with the time each took.
# Usage: bash scripts/bench_all.sh [OUT_DIR]   (default bench-results/; needs `bash scripts/setup.sh` first)
# Run it on an otherwise idle machine: the benches time themselves, and other work skews them.
set -uo pipefail  # one failing bench is reported and the others still run
cd "$(dirname "$0")/.." || exit 1
out=${1:-bench-results}
mkdir -p "$out" || exit 1
export COLUMNS=${COLUMNS:-160}
fedpriv=.venv/bin/fedpriv
: > "$out/times.txt"

run() {
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$out/times.txt"
  "$@" 2>&1 | tee "$out/$name.txt"
  local code=${PIPESTATUS[0]}
  echo "== $name took $((SECONDS - start)) s (exit code $code)" | tee -a "$out/times.txt"
}

total=$SECONDS
run dp-overhead "$fedpriv" bench dp-overhead
run framework "$fedpriv" bench framework --repeats 2
run framework-ray "$fedpriv" bench framework --clients 50 --backend ray
run scale "$fedpriv" bench scale
run deployment "$fedpriv" bench deployment --clients 3 --clients 10 --timeout 600
run peer "$fedpriv" bench peer
run quality "$fedpriv" bench quality --out "$out/quality"
echo "== all benches took $((SECONDS - total)) s" | tee -a "$out/times.txt"
