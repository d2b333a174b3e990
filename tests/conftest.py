"""Shared fixtures: paths to ../shared, tiny generated nets, and the pycaffe rule.

Tests that need ../shared skip only when it is absent, and fail instead under
CI=true. Tests that need pycaffe never skip under CI=true.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "fixtures"
IN_CI = os.environ.get("CI") == "true"


def shared(*parts: str) -> Path:
    """A fixture file under ../shared/fixtures (skip, or fail in CI, when absent)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        if IN_CI or SHARED.exists():
            pytest.fail(f"fixture {path} is missing")
        pytest.skip(f"../shared fixtures are absent ({SHARED})")
    return path


def require_pycaffe():
    """Import pycaffe, or skip (outside CI only) when it is not installed."""
    try:
        from cam_caffe.backends.caffe import import_caffe
        return import_caffe()
    except Exception as e:  # BackendError when missing
        if IN_CI:
            pytest.fail(f"pycaffe must be installed in CI: {e}")
        pytest.skip(f"pycaffe not installed: {e}")
