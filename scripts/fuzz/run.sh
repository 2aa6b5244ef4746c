#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (default 45), one after the other,
# starting from its committed seeds (fuzz/corpus/TARGET, read only) plus what earlier runs
# found (fuzz/target/corpus/TARGET, ignored by git). Any crash, hang (an input running over 30 s)
# or leak stops it with the input saved under fuzz/artifacts/TARGET/ and a non-zero exit.
# With FUZZ_RUNS=N the run is bounded instead: N executions per target from the committed seeds
# only, seed 1, new inputs kept in a temporary folder. Bounded is not reproducible: the parsers'
# hash maps are randomly seeded per process, so coverage differs between two runs.
# Needs a nightly toolchain and cargo-fuzz; installs both when missing (CI).
#   scripts/fuzz/run.sh [SECONDS] [TARGET...]
#   FUZZ_RUNS=N scripts/fuzz/run.sh [0] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../../fuzz"
secs="${1:-45}"
shift || true

# With FUZZ_TOOLS_OPTIONAL=1 (CI) a toolchain or cargo-fuzz that cannot be installed skips the
# fuzzing with a warning instead of failing.
no_tools() {
  if [ -n "${FUZZ_TOOLS_OPTIONAL:-}" ]; then
    echo "WARNING: $1; fuzzing skipped (the committed inputs are still replayed by the tests)"
    exit 0
  fi
  echo "$1" >&2
  exit 1
}
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "== installing the nightly toolchain (cargo-fuzz needs -Z sanitizer flags)"
  rustup toolchain install nightly --profile minimal || no_tools "the nightly toolchain could not be installed"
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked || no_tools "cargo-fuzz could not be installed"
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
echo "== building ${#targets[@]} fuzz targets (release, AddressSanitizer, debug assertions)"
cargo +nightly fuzz build -O --debug-assertions
for t in "${targets[@]}"; do
  if [ -n "${FUZZ_RUNS:-}" ]; then
    found=$(mktemp -d)
    budget=(-runs="$FUZZ_RUNS" -seed=1)
    echo "== fuzz $t: $FUZZ_RUNS executions, seed 1"
  else
    found="target/corpus/$t"
    mkdir -p "$found"
    budget=(-max_total_time="$secs")
    echo "== fuzz $t for ${secs}s"
  fi
  log="target/fuzz-$t.log"
  # minijinja leaks a namespace that holds itself (`{% set ns.n = ns %}`: a reference cycle,
  # ~0.5 KB per rendering; only a template can build it): leaks are not failures there, neither
  # during the run (-detect_leaks=0) nor in LeakSanitizer's check at exit (ASAN_OPTIONS), which
  # reports every such cycle any input built (a committed seed builds one).
  extra=()
  asan="${ASAN_OPTIONS:-}"
  if [ "$t" = chat_template ]; then
    extra=(-detect_leaks=0)
    asan="${asan:+$asan:}detect_leaks=0"
  fi
  if ! ASAN_OPTIONS="$asan" cargo +nightly fuzz run -O --debug-assertions "$t" "$found" "corpus/$t" -- \
    "${budget[@]}" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 "${extra[@]}" >"$log" 2>&1; then
    tail -60 "$log"
    echo "fuzz target $t failed: the input is in fuzz/artifacts/$t/, the log in fuzz/$log"
    exit 1
  fi
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true
  [ -z "${FUZZ_RUNS:-}" ] || rm -rf "$found"
done
