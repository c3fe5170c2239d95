"""Shared fixtures. Tests never touch the network: wandb is disabled, the hub is offline."""
import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests press Ctrl-C in scripts they run. Started in the background (`make test &`), the suite
# would inherit SIGINT ignored, and so would every script it starts: Ctrl-C as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

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
