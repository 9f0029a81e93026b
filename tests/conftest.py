"""Shared fixtures: the real-data folder (skips with a reason when absent), one torch thread."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from holons.files import shared_data_root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (or ``$HOLONS_DATA``); tests that need it skip with a reason otherwise."""
    root = shared_data_root()
    if root is None:
        pytest.skip("real data not available: set HOLONS_DATA or place it at ../shared/data")
    return root


@pytest.fixture
def one_thread():
    """Run the test on one torch thread (bit-identical CPU training, no oversubscription), then
    restore the thread count. Modules that train use it for every test with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
