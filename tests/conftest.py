"""Shared fixtures: where the real data lives, and small real slices of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _shared_data() -> Path:
    env = os.environ.get("FACEFL_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = _shared_data()
    if not path.is_dir():
        pytest.skip(f"shared data folder not found at {path} (set FACEFL_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def lfw_root(shared_data: Path) -> Path:
    root = shared_data / "lfw"
    if not (root / "pairsDevTest.txt").is_file():
        pytest.skip(f"LFW not found at {root} (see ../shared/data/README.md)")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One face cache for the whole test session (the cache itself is tested in test_datasets)."""
    return tmp_path_factory.mktemp("face-cache")
