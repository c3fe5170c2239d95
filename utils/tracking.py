"""Experiment tracking: wandb (online / offline / disabled) plus a local metrics.jsonl.

The local file needs no account and is what plots and tests read. The wandb run id is stored in
the run directory, so a resumed run and the postprocessing steps add to the same wandb run.
"""
from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path

from utils.errors import UserError
from utils.runs import METRICS_JSONL, WANDB_ID_FILE


def wandb_mode(configured: str) -> str:
    """The effective mode. WANDB_MODE in the environment wins (tests set `disabled`);
    `auto` is online when an API key is known, else offline (syncable later)."""
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a jsonl file in file order ([] if it is missing or empty).

    A line that is not a JSON object is skipped only if it is the last one (written when the run
    was killed); anywhere else it is an error naming the line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:
            if k == len(numbered) - 1:
                break  # truncated last line of an interrupted run
            raise UserError(f"{path}, line {lineno}: not a JSON object") from None
        records.append(record)
    return records


class Tracker:
    """Logs to `<run_dir>/metrics.jsonl` and, unless disabled, to wandb. Only rank 0 makes one."""

    def __init__(self, cfg: dict, run_dir: str | Path, job_type: str = "train"):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / METRICS_JSONL
        self.mode = wandb_mode(cfg["wandb"]["mode"])
        self.run = None
        if self.mode == "disabled":
            return
        import wandb  # imported only when used: it is slow to import

        id_file = self.run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=cfg["wandb"]["project"], entity=cfg["wandb"]["entity"], id=run_id,
            resume="allow", dir=str(self.run_dir), config=cfg, mode=self.mode,
            name=self.run_dir.name, tags=cfg["wandb"]["tags"], job_type=job_type)
        # under `wandb agent` the sweep chooses the id: store the one actually used
        id_file.write_text(self.run.id + "\n")
        self.run.define_metric("epoch")
        self.run.define_metric("val_*", step_metric="epoch")
        self.run.define_metric("train_loss", step_metric="epoch")
        self.run.define_metric("lr", step_metric="epoch")
        # a sweep compares runs by the summary: the best epoch, not the last one
        self.run.define_metric("val_loss", step_metric="epoch", summary="min")
        for name in ("mAP@10", "R@1", "R@5", "R@10"):
            self.run.define_metric(f"val_t2a_{name}", step_metric="epoch", summary="max")

    def rewind(self, epoch: int) -> None:
        """Forget local records after `epoch` (written before a crash, not in the checkpoint)."""
        kept = [r for r in read_jsonl(self.jsonl) if r.get("epoch", 0) <= epoch]
        from utils.io_utils import atomic_write_text

        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))

    def log_epoch(self, record: dict) -> None:
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.log(record)

    def log(self, data: dict) -> None:
        if self.run is not None:
            self.run.log(data)

    def summary(self, data: dict) -> None:
        if self.run is not None:
            self.run.summary.update(data)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
