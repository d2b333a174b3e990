#!/usr/bin/env bash
# The test command: set up .venv, build/install pycaffe (cached after the
# first run), then run the whole test suite with every backend.
# Usage: scripts/test.sh [pytest arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
scripts/install_pycaffe.sh
exec .venv/bin/python -m pytest -q "$@"
