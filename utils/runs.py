"""Run directories: `<paths.output_dir>/<experiment>-<timestamp>/`, holding everything of one run."""
from __future__ import annotations

import time
from pathlib import Path

from utils.config import CONFIG_NAME, load_config
from utils.errors import UserError

WANDB_ID_FILE = "wandb_id.txt"
METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
SCORES_DB = "scores.db"


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def new_run_dir(cfg: dict, name: str | None = None) -> Path:
    """Create a fresh run directory; an existing one is never overwritten."""
    output_dir = Path(cfg["paths"]["output_dir"])
    name = name or f"{cfg['experiment']}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = output_dir / name
    if run_dir.exists():
        raise UserError(f"{run_dir}: run directory already exists; use --resume {run_dir} to "
                        "continue it or choose another --name")
    run_dir.mkdir(parents=True)
    return run_dir


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def latest_run_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    runs = [p for p in output_dir.glob("*") if p.is_dir() and is_run_dir(p)] if output_dir.is_dir() else []
    if not runs:
        raise UserError(f"no run directory in '{output_dir}' (paths.output_dir): train one with "
                        "`python main.py` or pass --run DIR")
    return max(runs, key=lambda p: (p / CONFIG_NAME).stat().st_mtime)


def resolve_run_dir(run: str | Path | None, cfg: dict) -> Path:
    """`--run DIR` if given (it must be a run directory), else the newest run in output_dir."""
    if run is None:
        return latest_run_dir(cfg["paths"]["output_dir"])
    run = Path(run)
    if not is_run_dir(run):
        raise UserError(f"{run}: not a run directory (no {CONFIG_NAME}); pass a directory made by main.py")
    return run


def load_run_config(run_dir: str | Path, overrides=()) -> dict:
    """The config a run was trained with, read back from the run directory (plus overrides)."""
    return load_config(Path(run_dir) / CONFIG_NAME, overrides)
