#!/usr/bin/env bash
# Module layering (issue #13): layers point one way,
#   server -> mirror -> {upstream, cache} -> {transfer, registry}
# and no two modules import each other (cargo-modules finds any cycle).
set -euo pipefail
cd "$(dirname "$0")/.."

fail=0
# below: "importer|what it must not import"
rules=(
  "src/cache|crate::(server|mirror|upstream|admin|node)::"
  "src/upstream|crate::(server|mirror|cache|admin|node)::"
  "src/registry|crate::(server|mirror|cache|upstream|admin|node|config)::"
  "src/transfer.rs|crate::(server|mirror|cache|upstream|admin|node)::"
  "src/mirror|crate::(server|admin|node)::"
)
for r in "${rules[@]}"; do
  dir=${r%%|*}
  pat=${r#*|}
  # Code only: doc comments may name other layers.
  if hits=$(grep -rnHE "$pat" "$dir" | grep -vE '^[^:]+:[0-9]+:\s*//'); then
    echo "layering: $dir must not import $pat:"
    echo "$hits"
    fail=1
  fi
done

if ! cargo modules --version >/dev/null 2>&1; then
  # 0.27 is the last release that builds with this machine's Rust (1.95).
  cargo install --locked cargo-modules --version 0.27.0
fi
# Module-level "uses" edges only. (`--acyclic` itself also counts a type and
# its own methods as a cycle, so the cycle search is tests/module_cycles.py.)
cargo modules dependencies --lib --no-externs --no-sysroot --no-fns --no-traits \
  --no-types --no-owns >target/modules.dot
python3 tests/module_cycles.py <target/modules.dot || fail=1
exit $fail
