from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("ATTNSEG_PARITY_DIR", REPO_ROOT.parent / "shared" / "fixtures" / "parity"))


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not PARITY_DIR.is_dir():
        pytest.skip(f"parity fixtures not found at {PARITY_DIR}")
    return PARITY_DIR


def load_fixture(name: str) -> dict:
    """Load a parity fixture (data only) with weights_only=True; skip the test when it is absent."""
    path = PARITY_DIR / name
    if not path.is_file():
        pytest.skip(f"parity fixture {path} not found")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
