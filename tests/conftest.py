"""Shared fixtures: the real-data folder (skips with a reason when absent) and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from holons.files import shared_data_root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$HOLONS_DATA``); tests that need it skip with a reason otherwise."""
    root = shared_data_root()
    if root is None:
        pytest.skip("real data not available: set HOLONS_DATA or place it at ../shared/data")
    return root
