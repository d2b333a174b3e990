#!/usr/bin/env bash
# Set up cam-caffe on Debian 12 / Ubuntu: a virtual environment in .venv with
# the package, its test tools, the ONNX and the Dask extras. Installs python3,
# python3-venv, and chromium + chromium-driver (the tests open --report's page
# in headless Chromium) with apt when they are missing (as root, or through sudo).
# Usage: scripts/setup.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

apt_install() {
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

if ! command -v python3 >/dev/null; then
  echo "==> installing python3"
  apt_install python3 python3-venv
fi
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "==> installing chromium and chromium-driver (for the report's browser tests)"
  apt_install chromium chromium-driver
fi
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  if ! python3 -m venv .venv 2>/dev/null; then
    rm -rf .venv
    echo "==> installing python3-venv"
    apt_install python3-venv
    python3 -m venv .venv
  fi
fi
echo "==> installing cam-caffe into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,onnx,dask]"
echo "==> done: .venv/bin/cam-caffe --help"
