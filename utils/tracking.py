"""Experiment tracking: wandb (online / offline / disabled) plus a local metrics.jsonl.

The local file needs no account and is what plots and tests read. The training run's wandb id
is stored in the run directory (wandb_id.txt), so `--resume` continues the same wandb run;
evaluation (postprocessing) logs to a run of its own, `<id>-eval` (job_type "eval", same group),
so it can never touch the training history.

History across resumes: each wandb.init (a "segment") starts its `_step` afresh, and an offline
segment knows nothing of the earlier ones. So every row is logged with an explicit step that
keeps increasing across segments: in a training run the step is the number of training
captions seen (epoch e ends at e * samples_per_epoch), in an evaluation run one step per
evaluation. What earlier segments logged is read back from their own transaction logs
(`<run>/wandb/*run-*-<id>/run-<id>.wandb`): a resumed training run logs every epoch of
metrics.jsonl that no segment holds, and none twice.
"""
from __future__ import annotations

import configparser
import json
import netrc
import os
import re
import struct
import sys
import time
import uuid
import zlib
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator, Sequence
from urllib.parse import urlsplit

import numpy as np

from utils.errors import UserError
from utils.io_utils import atomic_write_text
from utils.runs import METRICS_JSONL, WANDB_ID_FILE


DEFAULT_BASE_URL = "https://api.wandb.ai"


def wandb_base_url() -> str:
    """The wandb server: WANDB_BASE_URL, else the `base_url` that `wandb login --host URL`
    saved in wandb's settings file, else the wandb cloud."""
    if os.environ.get("WANDB_BASE_URL"):
        return os.environ["WANDB_BASE_URL"].rstrip("/")
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings", encoding="utf-8")
    except (configparser.Error, OSError, UnicodeDecodeError):
        return DEFAULT_BASE_URL
    return parser.get("default", "base_url", fallback=DEFAULT_BASE_URL).rstrip("/") or DEFAULT_BASE_URL


def _netrc_has_key(host: str) -> bool:
    """Whether the .netrc that wandb reads ($NETRC, else ~/.netrc or ~/_netrc) has a password
    for `host` (host[:port], as `wandb login` writes it)."""
    path = os.environ.get("NETRC")
    if not path:
        home = Path.home()
        path = next((p for p in (home / ".netrc", home / "_netrc") if p.is_file()), home / ".netrc")
    try:
        entry = netrc.netrc(str(Path(path).expanduser())).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def wandb_mode(configured: str) -> str:
    """The effective mode. WANDB_MODE in the environment wins (tests set `disabled`);
    `auto` is online when an API key is known for the server (WANDB_API_KEY, or a .netrc entry
    for the host of wandb_base_url(): the cloud or a self-hosted server), else offline."""
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if env == "dryrun":
        return "offline"
    if configured != "auto":
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlsplit(wandb_base_url()).netloc
    return "online" if host and _netrc_has_key(host) else "offline"


def _chosen_by_auto(configured: str) -> bool:
    """The mode came from `auto` (wandb_mode), not from the config or WANDB_MODE."""
    return configured == "auto" and os.environ.get("WANDB_MODE") not in ("online", "offline", "disabled", "dryrun")


def _writable_wandb_dirs(run_dir: Path) -> None:
    """wandb stages logged tables and media in WANDB_DATA_DIR and caches them in WANDB_CACHE_DIR,
    both in HOME by default (~/.local/share/wandb, ~/.cache/wandb). With HOME missing or
    read-only (a cluster node, a container) every logged table failed with a PermissionError
    traceback, and wandb's service printed its own log lines into the job's output: such a
    folder is put in the run's wandb folder instead."""
    import wandb.env

    for var, default in (("WANDB_DATA_DIR", wandb.env.get_data_dir()),
                         ("WANDB_CACHE_DIR", wandb.env.get_cache_dir())):
        if os.environ.get(var):
            continue  # the user's choice, even an unusable one: wandb names it in its error
        try:
            Path(default).mkdir(parents=True, exist_ok=True)
            if os.access(default, os.W_OK):
                continue
        except OSError:
            pass
        os.environ[var] = str(run_dir.resolve() / "wandb" / var.lower())


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


# --------------------------------------------------------------------------- wandb's local files
# Every wandb run segment (one wandb.init ... finish, online or offline) writes its records to
# <dir>/wandb/{offline-,}run-<YYYYmmdd_HHMMSS>-<id>/run-<id>.wandb: protobuf `Record`s
# (wandb.proto.wandb_internal_pb2) in the LevelDB log format: a 7-byte file header, then 32 KiB
# blocks of chunks, each `crc32 (u32 LE) | length (u16 LE) | type (u8) | data`, where the crc is
# zlib.crc32 of the type byte and the data, and a record is one FULL chunk or FIRST, MIDDLE...,
# LAST. A block's tail shorter than a chunk header is zero padding.

_LOG_HEADER = b":W&B\xe1\xbe\x00"  # ident, magic 0xBEE1 (LE), version 0
_BLOCK = 32768
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _log_records(data: bytes) -> Iterator[bytes]:
    """The records' payloads in a .wandb file's bytes. A torn or corrupt chunk (a process killed
    while writing) drops the record it belongs to and reading goes on at the next block, as
    LevelDB's reader does; a torn tail simply ends the file."""
    pos, pending = len(_LOG_HEADER), None
    while pos + _CHUNK_HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK_HEADER:
            pos += left  # padding
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        if (kind == 0 and length == 0) or len(chunk) < length \
                or zlib.crc32(bytes([kind]) + chunk) != crc or _CHUNK_HEADER + length > left:
            pending = None
            pos += left  # skip to the next block
            continue
        pos += _CHUNK_HEADER + length
        if kind == _FULL:
            pending = None
            yield chunk
        elif kind == _FIRST:
            pending = [chunk]
        elif kind == _MIDDLE and pending is not None:
            pending.append(chunk)
        elif kind == _LAST and pending is not None:
            yield b"".join(pending + [chunk])
            pending = None


def read_wandb_file(path: str | Path) -> list:
    """The records of one run segment's `.wandb` file (wandb_internal_pb2.Record), in order."""
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not data.startswith(_LOG_HEADER[:4]):
        raise UserError(f"{path}: not a wandb transaction log (bad header)")
    records = []
    for payload in _log_records(data):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - a payload that passed its crc but is not ours: skip it
            continue
        records.append(record)
    return records


def history_rows(records: Iterable) -> list[tuple[int, dict]]:
    """(step, {key: value}) of every history row among `records`, in order. Keys nested by
    wandb (a dict logged as a value) are joined with '.'."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or ".".join(item.nested_key)
            row[key] = json.loads(item.value_json) if item.value_json else None
        rows.append((int(record.history.step.num), row))
    return rows


_SEGMENT_DIR = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-(.+)")


def wandb_segments(run_dir: str | Path, run_id: str) -> list[Path]:
    """The `.wandb` files of wandb run `run_id` under `<run_dir>/wandb/`, oldest first (each
    segment's directory is named `[offline-]run-<start time>-<id>`)."""
    root = Path(run_dir) / "wandb"
    found = []
    for d in (root.iterdir() if root.is_dir() else ()):
        m = _SEGMENT_DIR.fullmatch(d.name)
        if m and m.group(2) == run_id and not d.is_symlink() and (d / f"run-{run_id}.wandb").is_file():
            found.append((m.group(1), d / f"run-{run_id}.wandb"))
    return [path for _, path in sorted(found)]


def eval_run_id(train_run_id: str) -> str:
    """The wandb id of a training run's evaluation run."""
    return f"{train_run_id}-eval"


def _has_exit(records: list) -> bool:
    return any(r.WhichOneof("record_type") == "exit" for r in records)


# Tracker.finish waits this long for silence before it gives up on its own exit record (which
# always comes); a reader of a segment killed mid-run waits the default 2 s (none will come)
FINISHED_QUIET_S = 20.0


def read_finished_segment(path: Path, quiet_s: float = 2.0, limit_s: float = 30.0) -> list:
    """The records of a segment that may still be being written: wandb's service writes a
    finished segment's last rows and its exit record just after `finish()` returns, and the
    service of a killed process may still be flushing. Wait for the exit record, or until the
    file has not grown for `quiet_s` (a killed segment never gets one)."""
    records = read_wandb_file(path)
    deadline = time.monotonic() + limit_s
    size, since = path.stat().st_size, time.monotonic()
    while not _has_exit(records) and time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.05)
        if path.stat().st_size != size:
            records = read_wandb_file(path)
            size, since = path.stat().st_size, time.monotonic()
    return records


def _next_segment_second(segments: list[Path]) -> None:
    """Wait, if need be, until the clock second differs from the newest segment's start: wandb
    names a segment's directory by its start second, and a second segment of the same run
    started within that second would overwrite the first's log."""
    if not segments:
        return
    newest = _SEGMENT_DIR.fullmatch(segments[-1].parent.name).group(1)
    deadline = time.monotonic() + 2.0
    while datetime.now().strftime("%Y%m%d_%H%M%S") <= newest and time.monotonic() < deadline:
        time.sleep(1.01 - time.time() % 1)


class Tracker:
    """Logs to `<run_dir>/metrics.jsonl` and, unless disabled, to wandb. Only rank 0 makes one.

    job_type "train": the run whose id is in `<run_dir>/wandb_id.txt` (created on first use);
    its summary names the evaluation run (`eval_run_id`, and `eval_run_url` when online).
    job_type "eval": the run `eval_run_id(<training id>)`, grouped with the training run.
    `samples_per_epoch` (training captions per epoch) scales the steps of a training run.
    """

    def __init__(self, cfg: dict, run_dir: str | Path, job_type: str = "train",
                 samples_per_epoch: int | None = None):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / METRICS_JSONL
        self.mode = wandb_mode(cfg["wandb"]["mode"])
        self.job_type = job_type
        self.samples_per_epoch = max(int(samples_per_epoch or 1), 1)
        self.run = self.run_id = None
        self.logged_epochs: set[int] = set()  # epochs that some segment of this run holds
        self._prior_step = -1  # the highest step that earlier segments logged
        self._step = 0  # the step of the row being written
        if self.mode == "disabled":
            return
        import wandb  # imported only when used: it is slow to import

        id_file = self.run_dir / WANDB_ID_FILE
        had_id = id_file.is_file()
        # a new run: the id `wandb agent` chose for this sweep trial, else a fresh one
        train_id = id_file.read_text().strip() if had_id else \
            os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12]
        if not re.fullmatch(r"[^\s:;,#?/'\"]+", train_id):
            raise UserError(f"{id_file}: {train_id!r} is not a wandb run id; restore the file, or "
                            "delete it to log this run to a new wandb run")
        if not had_id:  # an evaluation of a run trained without wandb names its training run too
            atomic_write_text(id_file, train_id + "\n")
        _writable_wandb_dirs(self.run_dir)
        is_train = job_type == "train"
        run_id = train_id if is_train else eval_run_id(train_id)
        earlier = self._read_earlier_segments(run_id)
        _next_segment_second(earlier)
        # offline, wandb cannot ask the server whether the run exists: say so ourselves
        resumed = bool(earlier) or (is_train and had_id)

        def start(mode: str):
            settings = wandb.Settings(resumed=True) if resumed and mode == "offline" else None
            return wandb.init(
                project=cfg["wandb"]["project"], entity=cfg["wandb"]["entity"], id=run_id,
                resume="allow", dir=str(self.run_dir), config=cfg, mode=mode,
                name=self.run_dir.name if is_train else f"{self.run_dir.name}-eval",
                group=train_id, tags=cfg["wandb"]["tags"], job_type=job_type, settings=settings)

        try:
            self.run = start(self.mode)
        except (wandb.errors.CommError, wandb.errors.UsageError) as e:
            # no API key, or a server that cannot be reached (a cluster's compute nodes often
            # have no internet while the login node's ~/.netrc makes `auto` online)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            sync = f"`wandb sync {self.run_dir / 'wandb'}`"
            if self.mode != "online" or not _chosen_by_auto(cfg["wandb"]["mode"]):
                raise UserError(f"wandb could not start {self.mode} ({reason}); without access to the "
                                "wandb server set wandb.mode: offline (or WANDB_MODE=offline) and "
                                f"upload later with {sync}") from None
            # `auto` promised online only where it can be: the run goes on offline
            print(f"note: wandb could not start online ({reason}); logging offline into "
                  f"{self.run_dir / 'wandb'} (upload later with {sync}; wandb.mode: offline "
                  "skips the attempt)", file=sys.stderr)
            self.mode = "offline"
            # wandb's service still holds the failed run's id ("run ID … is in use"): a new one
            wandb.teardown()
            self.run = start(self.mode)
        self.run_id = self.run.id
        # online, a resumed run continues after the server's last step (rows of a killed
        # segment may be on the server though its local log lost them)
        self._prior_step = max(self._prior_step, int(self.run.starting_step) - 1)
        self._step = self._prior_step + 1
        unsynced = [p for p in earlier if p.parent.name.startswith("offline-")
                    and not p.with_suffix(".wandb.synced").exists()]
        if self.mode == "online" and unsynced:
            print(f"warning: {len(unsynced)} offline wandb segment(s) of run {run_id} are not "
                  f"synced; upload them first (wandb sync {self.run_dir / 'wandb'}), or wandb "
                  "drops their rows as older than this segment's", file=sys.stderr)
        if not is_train:
            self.run.summary.update({"train_run_id": train_id})
            return
        # store the id actually used (in case the environment chose it)
        if self.run.id != train_id:
            atomic_write_text(id_file, self.run.id + "\n")
        link = {"eval_run_id": eval_run_id(self.run.id)}
        if self.run.url:
            link["eval_run_url"] = f"{self.run.url.rsplit('/', 1)[0]}/{link['eval_run_id']}"
        self.run.summary.update(link)
        self.run.define_metric("epoch")
        self.run.define_metric("val_*", step_metric="epoch")
        self.run.define_metric("train_loss", step_metric="epoch")
        self.run.define_metric("lr", step_metric="epoch")
        self.run.define_metric("train/epoch")
        self.run.define_metric("train/loss", step_metric="train/epoch")
        self.run.define_metric("train/lr", step_metric="train/epoch")
        for name in ("seconds", "train_seconds", "data_wait_seconds", "compiled_graphs", "eager_steps"):
            self.run.define_metric(name, step_metric="epoch")

    def _read_earlier_segments(self, run_id: str) -> list[Path]:
        """Note which epochs and steps the earlier segments of `run_id` logged."""
        segments = wandb_segments(self.run_dir, run_id)
        for k, path in enumerate(segments):
            # only the newest can still be being written: each later segment started after
            # the one before it was finished or its process gone
            records = read_finished_segment(path) if k == len(segments) - 1 else read_wandb_file(path)
            for step, row in history_rows(records):
                self._prior_step = max(self._prior_step, step)
                if isinstance(row.get("epoch"), (int, float)):
                    self.logged_epochs.add(int(row["epoch"]))
        return segments

    # ------------------------------------------------------------------ history

    def rewind(self, epoch: int) -> None:
        """Start (or resume) after `epoch`: forget local records after it (written before a
        crash, not in the checkpoint), then log to wandb every kept record that no segment of
        this run holds (an epoch whose process was killed before wandb wrote it)."""
        kept = [r for r in read_jsonl(self.jsonl) if r.get("epoch", 0) <= epoch]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in kept))
        for record in sorted(kept, key=lambda r: r.get("epoch", 0)):
            self._log_epoch_to_wandb(record)

    def log_epoch(self, record: dict) -> None:
        """Append an epoch's record to metrics.jsonl (on disk first), then to wandb."""
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._log_epoch_to_wandb(record)

    def _log_epoch_to_wandb(self, record: dict) -> None:
        epoch = record.get("epoch")
        if self.run is None or not isinstance(epoch, int) or epoch in self.logged_epochs:
            return  # an epoch redone after a resume keeps the row its first run logged
        step = epoch * self.samples_per_epoch
        if step <= self._prior_step:
            return  # the server has the row although no local log does (online, killed)
        self._log_at(record, step)
        self.logged_epochs.add(epoch)

    def log_train(self, data: dict) -> None:
        """A training-loss point {"train/loss", "train/epoch" (fractional), ...}, at the step of
        the captions seen so far. Points an earlier segment logged (the part of an epoch redone
        after a resume) are not logged again."""
        if self.run is None:
            return
        step = round(float(data["train/epoch"]) * self.samples_per_epoch)
        if step > self._prior_step:
            self._log_at(data, step)

    def log(self, data: dict) -> None:
        """Anything else: into the current row (an evaluation run: one row per evaluation)."""
        if self.run is not None:
            self.run.log(data, step=self._step)

    def _log_at(self, data: dict, step: int) -> None:
        # never below a step already used: wandb would drop the row
        self._step = max(step, self._step)
        self.run.log(data, step=self._step)

    # ------------------------------------------------------------------ media (no-ops when disabled)

    def log_table(self, key: str, columns: Sequence[str], rows: Iterable[Sequence]) -> None:
        """One wandb.Table under `key`: `columns` names, one list of cells per row."""
        if self.run is None:
            return
        import wandb

        self.log({key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def log_audio_table(self, key: str, columns: Sequence[str], rows: Iterable[Sequence],
                        audio_columns: Iterable[str]) -> None:
        """A wandb.Table whose cells in `audio_columns` are audio file paths (wandb.Audio, the
        file is copied into the run); None there stays an empty cell (a missing clip)."""
        if self.run is None:
            return
        import wandb

        columns = list(columns)
        audio = {columns.index(c) for c in audio_columns}
        data = [[wandb.Audio(str(cell)) if i in audio and cell is not None else cell
                 for i, cell in enumerate(row)] for row in rows]
        self.log({key: wandb.Table(columns=columns, data=data)})

    def log_histogram(self, key: str, values: Sequence[float], num_bins: int = 64) -> None:
        """A wandb.Histogram of `values` (e.g. the rank of each caption's true clip)."""
        if self.run is None:
            return
        import wandb

        self.log({key: wandb.Histogram(np.asarray(values, dtype=np.float64), num_bins=num_bins)})

    def log_images(self, images: dict[str, str | Path]) -> None:
        """{name: image file} as wandb.Image (e.g. the PNG plots), in one history row."""
        if self.run is None or not images:
            return
        import wandb

        self.log({name: wandb.Image(str(path)) for name, path in images.items()})

    def summary(self, data: dict) -> None:
        if self.run is not None:
            self.run.summary.update(data)

    def summarize_best(self, best_epoch: int, extra: dict) -> None:
        """The run's summary is the best epoch's record, its `epoch` included (a sweep or a runs
        table compares runs by it), plus `epochs_trained` and `extra`. One epoch's numbers: a
        min or max per key would mix epochs, and the last step's training-loss point (train/*)
        would sit beside them as if it were that epoch's."""
        if self.run is None:
            return
        records = read_jsonl(self.jsonl)
        best = [r for r in records if r.get("epoch") == best_epoch]
        trained = max((r["epoch"] for r in records if isinstance(r.get("epoch"), int)), default=None)
        # wandb holds a row logged with a step until a later step comes, and committing it
        # then (at finish) would put the last epoch's numbers back into the summary
        self.run.log({}, commit=True)
        for key in [k for k in self.run.summary.keys() if k.startswith("train/")]:
            del self.run.summary[key]
        self.summary({**(best[-1] if best else {}), "best_epoch": best_epoch,
                      "epochs_trained": trained, **extra})

    def finish(self) -> None:
        """End the wandb segment, and wait until its transaction log is complete on disk: the
        service writes its last rows and exit record just after run.finish() returns, and the
        next segment (another evaluation, a resume) continues from the steps it reads there.
        On a loaded machine the service can pause for seconds; a reader that gave up early
        would log at a step wandb already has (and wandb drops such rows)."""
        if self.run is None:
            return
        self.run.finish()
        self.run = None
        segments = wandb_segments(self.run_dir, self.run_id)
        if segments:
            read_finished_segment(segments[-1], quiet_s=FINISHED_QUIET_S)
