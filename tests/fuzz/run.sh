#!/usr/bin/env bash
# Run every berth fuzz target for a bounded time; exit non-zero on a crash.
#
#   tests/fuzz/run.sh                    # every target, 30 s each
#   FUZZ_SECONDS=300 tests/fuzz/run.sh route config
#
# Uses cargo-fuzz (libFuzzer + AddressSanitizer). On a stable toolchain the
# nightly-only flags cargo-fuzz passes are allowed with RUSTC_BOOTSTRAP=1
# (see README.md). Corpora and crash artifacts go to $FUZZ_WORK (default: a
# directory under CARGO_TARGET_DIR or tests/fuzz/target), never into the
# repository; the committed seeds in tests/fuzz/seeds/ are read, not written.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

seconds="${FUZZ_SECONDS:-30}"
all=(route reference challenge config range)
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then targets=("${all[@]}"); fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
  exit 2
fi

target_dir="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$here/target}/fuzz}"
work="${FUZZ_WORK:-$target_dir/work}"
mkdir -p "$work"
export RUSTC_BOOTSTRAP=1
# AddressSanitizer by default; FUZZ_SANITIZER=none for a faster, plain build.
sanitizer="${FUZZ_SANITIZER:-address}"

echo "==> building fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build --fuzz-dir "$here" --target-dir "$target_dir" -s "$sanitizer"

failed=()
for t in "${targets[@]}"; do
  corpus="$work/corpus/$t"
  artifacts="$work/artifacts/$t"
  mkdir -p "$corpus" "$artifacts"
  echo "==> $t: ${seconds}s"
  log="$work/$t.log"
  if cargo fuzz run --fuzz-dir "$here" --target-dir "$target_dir" -s "$sanitizer" \
      "$t" "$corpus" "$here/seeds/$t" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix="$artifacts/" -print_final_stats=1 >"$log" 2>&1; then
    runs="$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)"
    cov="$(grep -E '#[0-9]+\s+DONE' "$log" | sed -E 's/.*cov: ([0-9]+).*/\1/' | tail -1 || true)"
    echo "    ok: ${runs:-?} executions, coverage ${cov:-?}, corpus $(find "$corpus" -type f | wc -l) inputs"
  else
    echo "    CRASH or error in $t; log: $log; artifacts:" >&2
    ls -l "$artifacts" >&2 || true
    tail -n 40 "$log" >&2
    failed+=("$t")
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "all fuzz targets ran ${seconds}s each without a crash"
