"""Run directories: `<paths.output_dir>/<experiment>-<timestamp>/`, holding everything of one run."""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import time
from pathlib import Path

from utils.config import CONFIG_NAME, load_run_config  # noqa: F401  (its home for the scripts)
from utils.errors import UserError
from utils.io_utils import ensure_dir
from utils.locks import exclusive

WANDB_ID_FILE = "wandb_id.txt"
METRICS_JSONL = "metrics.jsonl"
METRICS_JSON = "metrics.json"
SCORES_DB = "scores.db"
LOCK_FILE = ".lock"  # utils.locks: held by the process working on the run


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def new_run_dir(cfg: dict, name: str | None = None) -> Path:
    """Create a fresh run directory; an existing one is never overwritten."""
    output_dir = Path(cfg["paths"]["output_dir"])
    if name is not None and (name in ("", ".", "..") or any(c in name for c in "/\\\0")):
        raise UserError(f"--name {name!r}: a run name is one folder name inside paths.output_dir "
                        "(no '/', not '.' or '..'); to put runs elsewhere set paths.output_dir")
    ensure_dir(output_dir)
    if name is None:  # runs started in the same second get -2, -3, ...
        stamp = f"{cfg['experiment']}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in itertools.count(1):
            run_dir = output_dir / (stamp if n == 1 else f"{stamp}-{n}")
            with contextlib.suppress(FileExistsError):
                run_dir.mkdir()  # atomic: of two processes creating the same name, one gets it
                return run_dir
    run_dir = output_dir / name
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise UserError(f"{run_dir}: run directory already exists; use --resume {run_dir} to "
                        "continue it or choose another --name") from None
    return run_dir


def has_checkpoint(run_dir: str | Path) -> bool:
    """A run that finished at least one epoch (or was given a checkpoint)."""
    return any(checkpoint_path(run_dir, which).is_file() for which in ("last", "best"))


def remove_unstarted_run(run_dir: str | Path) -> bool:
    """Delete a run directory that holds no checkpoint (a run that failed before its first
    epoch ended), so that it neither blocks its --name nor looks like a run. A directory with a
    checkpoint is kept. Returns whether it was removed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or has_checkpoint(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return not run_dir.exists()


@contextlib.contextmanager
def lock_run(run_dir: str | Path):
    """`with lock_run(run):` one process at a time on a run (training, scoring, metrics,
    submission): a second one is refused with one line naming the first."""
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as held:
        try:
            lock = held.enter_context(exclusive(run_dir / LOCK_FILE, f"run {run_dir}"))
        except OSError as e:
            # the folder itself, not one file in it (another user's .lock: the generic line)
            folder_blocked = e.errno == errno.EROFS or not os.access(run_dir, os.W_OK)
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and folder_blocked:
                # no config key moves a run
                raise UserError(f"{run_dir}: the run folder is not writable "
                                f"({os.strerror(e.errno).lower()}); copy it somewhere writable "
                                f"(cp -r {run_dir} DEST) and pass --run DEST (or --resume DEST)"
                                ) from None
            raise
        yield lock


def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def not_a_run_error(path: str | Path, also: str = "") -> UserError:
    return UserError(f"{path}: not a run directory (no {CONFIG_NAME}){also}; pass a directory "
                     "made by main.py")


def require_run_dir(path: str | Path) -> Path:
    path = Path(path)
    if not is_run_dir(path):
        raise not_a_run_error(path)
    return path


def checkpoint_mtime(run_dir: Path) -> float:
    """When the run's newest checkpoint was written (0 without one)."""
    times = [p.stat().st_mtime for p in (checkpoint_path(run_dir, w) for w in ("last", "best"))
             if p.is_file()]
    return max(times, default=0.0)


def latest_run_dir(output_dir: str | Path) -> Path:
    """The run trained last: the one whose newest checkpoint was written last (a --resume of an
    older run makes it the newest; editing a config.yaml does not). Folders of runs that never
    finished an epoch are skipped (nothing to evaluate there)."""
    output_dir = Path(output_dir)
    runs = [p for p in output_dir.glob("*") if p.is_dir() and is_run_dir(p) and has_checkpoint(p)] \
        if output_dir.is_dir() else []
    if not runs:
        raise UserError(f"no trained run in '{output_dir}' (paths.output_dir): "
                        + (_found_below(output_dir) or "train one with `python main.py` or pass --run DIR"))
    return max(runs, key=checkpoint_mtime)


def _found_below(output_dir: Path, name: str | None = None) -> str | None:
    """Advice when trained runs (or the run `name`) lie one folder deeper, in another config's
    paths.output_dir (`make demo`'s outputs/demo inside conf.yaml's outputs): the --conf that
    names that folder, from the working directory's YAML files, or --run."""
    pattern = f"*/{name}" if name else "*/*"
    found = sorted({p.parent for p in output_dir.glob(pattern)
                    if p.is_dir() and is_run_dir(p) and has_checkpoint(p)}) if output_dir.is_dir() else []
    if not found:
        return None
    folder = found[0]
    confs = [p.name for p in sorted(Path.cwd().glob("*.y*ml")) if _output_dir_of(p) == folder.resolve()]
    conf = f"--conf {confs[0]} (its paths.output_dir)" if confs else f"a --conf whose paths.output_dir is {folder}"
    return f"runs are in {folder}: pass {conf}, or --run {folder / (name or '<run>')}"


def _output_dir_of(conf: Path) -> Path | None:
    from utils.config import load_config

    try:
        return Path(load_config(conf)["paths"]["output_dir"]).resolve()
    except (UserError, KeyError, TypeError, OSError):  # not one of our configs (sweep.yaml, ...)
        return None


def resolve_run_dir(run: str | Path | None, cfg: dict | None) -> Path:
    """`--run DIR` if given (a run directory, or the name of one in paths.output_dir, as
    main.py --name gave it), else the newest run in output_dir."""
    if run is None:
        return latest_run_dir(cfg["paths"]["output_dir"])
    run = Path(run)
    if is_run_dir(run) or cfg is None:
        return require_run_dir(run)
    named = Path(cfg["paths"]["output_dir"]) / run
    if len(run.parts) == 1 and is_run_dir(named):
        return named
    if len(run.parts) != 1:
        raise not_a_run_error(run)
    below = _found_below(Path(cfg["paths"]["output_dir"]), str(run))
    if below:
        raise UserError(f"{run}: no such run in {named.parent} (paths.output_dir of --conf); {below}")
    raise not_a_run_error(run, f" nor is {named} (paths.output_dir of --conf)")


