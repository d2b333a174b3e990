#!/usr/bin/env bash
# Lint and type checks, as CI runs them before the tests (configuration in
# pyproject.toml): ruff over the code, tests, benchmarks and scripts; mypy over
# the package. Needs the test extra in .venv (scripts/setup.sh).
# Usage: scripts/lint.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "==> ruff"
.venv/bin/ruff check cam_caffe tests benchmarks scripts
echo "==> mypy"
.venv/bin/mypy
