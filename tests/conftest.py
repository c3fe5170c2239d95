"""Shared fixtures. Tests never touch the network: wandb is disabled, the hub is offline."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_CAPTIONS = REPO.parent / "shared" / "clotho_captions"


@pytest.fixture
def repo() -> Path:
    return REPO


@pytest.fixture
def shared_captions() -> Path:
    if not (SHARED_CAPTIONS / "clotho_captions_development.csv").is_file():
        pytest.skip("../shared/clotho_captions is absent")
    return SHARED_CAPTIONS
