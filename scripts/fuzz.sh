#!/usr/bin/env bash
# Runs every fuzz target for SECS seconds (default 60) from the committed seeds, and prints a
# table: executions, coverage, corpus, crashes. `make fuzz` calls it; docs/reliability.md has
# the figures. A crash leaves its input in fuzz/artifacts/TARGET/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
# FUZZ_RUNS stops each target after that many executions, if it comes before SECS.
runs="${FUZZ_RUNS:+-runs=$FUZZ_RUNS}"
targets="${FUZZ_TARGETS:-wire flv avc aac annexb fmp4 player_session rtmp http_query codecs ts cmaf}"
# cargo-fuzz 0.13.1 builds with nightly flags; RUSTC_BOOTSTRAP lets this stable toolchain take
# them (design.md).
if [ "$(cargo fuzz --version 2>/dev/null || true)" != "cargo-fuzz 0.13.1" ]; then
  cargo install cargo-fuzz --version =0.13.1
fi
export RUSTC_BOOTSTRAP=1
work=fuzz/target/corpus
printf '| target | seconds | executions | exec/s | coverage (edges) | corpus | crashes |\n'
printf '|---|---:|---:|---:|---:|---:|---:|\n'
failed=0
for t in $targets; do
  mkdir -p "$work/$t" "fuzz/corpus/$t"
  log="fuzz/target/$t.log"
  # New inputs go to the working corpus; the committed seeds are read, never written.
  if (cd fuzz && cargo fuzz run "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$secs" $runs -print_final_stats=1 -timeout=10 -rss_limit_mb=2048) >"$log" 2>&1; then
    crashes=0
  else
    crashes=1
    failed=1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  corpus=$(ls "$work/$t" | wc -l)
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$t" "$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o '[0-9]* second' | grep -o '[0-9]*' || echo "$secs")" "$execs" "$rate" "$cov" "$corpus" "$crashes"
  if [ "$crashes" != 0 ]; then
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -5 >&2 || true
  fi
done
exit $failed
