#!/usr/bin/env bash
# Install what berth's tests need (Debian packages) and run every check:
# formatting, clippy with warnings denied, unit and integration tests.
# The integration tests start real docker-registry, containerd and skopeo on
# loopback; with CI set, a missing component fails the run instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi

packages=(docker-registry containerd skopeo nginx-light prometheus curl ca-certificates make)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add clippy rustfmt
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "==> module layering (tests/layers.sh)"
./tests/layers.sh
echo "==> deploy/ci-validate.sh (Helm chart, manifests, systemd unit, Dockerfile, scripts)"
./deploy/ci-validate.sh
echo "==> cargo test"
cargo test --all-targets --locked
