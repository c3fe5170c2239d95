"""GPU speed figures, all measured in one run on one GPU (prints a table, writes JSON).

    python benchmarks/bench_gpu.py [--out bench_gpu.json] [--work /tmp/bench_gpu]
                                   [--dataset DIR] [--sections steps,lengths,loader,epoch,logmel,busy]
                                   [--only NAME,...] [--epoch-workers N] [--goal] [--smoke]
                                   [--budget-s SECONDS]

1. steps:   the training step at batch 32 x 1501 frames (30-s clips), full-width CNN14, 768-d
            sentence embeddings: a faithful re-implementation of the original code's step
            (fp32, NCHW, per-sample InfoNCE loop, plain Adam) against this repository's step with
            each optimisation switched on in turn (bf16 autocast, channels_last, fused Adam,
            torch.compile with a fixed, then a symbolic time axis). Peak GPU memory of each.
            Random batches are made before the clock starts and copied to the GPU in the
            loop as each code's loader hands them over: pageable and waited for (the
            original), pinned and not waited for (this repository's steps).
2. lengths: the same steps with whole clips of varying length, as a shuffled Clotho epoch gives
            them (each batch padded to its longest of 32 clips of 751-1501 frames): cuDNN's
            autotuner on/off, padding to a multiple of N frames (training.pad_to_multiple), and
            the compiled model, padded and with a symbolic time axis (graphs built).
3. loader:  clips/s the training DataLoader delivers from a Clotho-shaped HDF5 file, for 1..16
            worker processes (pinned memory, as on CUDA).
4. epoch:   real `main.py` runs of 2 epochs on a Clotho-sized set (3839 clips / 19195 captions
            for training, 1045 / 5225 for validation): whole clips as main.py trains them on
            CUDA (compiled, a symbolic time axis), whole clips eager (training.compile=off), and
            padded to a multiple of 64 frames (compiled): seconds per epoch, time spent waiting
            for data, GPU utilisation (nvidia-smi) over epoch 2 and over its training pass
            alone, graphs compiled.
5. logmel:  preprocessing/02 on generated wavs of 15-30 s with features.device=cuda against cpu
            (features.workers = the machine's cores), and how far apart the two results are.
6. busy:    where the GPU waits: main.py's training loop without its loader (whole clips, eager
            and compiled) and validation's two parts (the loss over padded batches, the clip
            embeddings in batches whose padding the encoder masks out, as main.py computes them,
            and one unpadded batch per distinct length, as before), each timed, then profiled
            (torch.profiler): the GPU's kernel time against the wall time, and the host's time
            to queue a step. The profiles' heaviest entries go to busy_profiles.txt in --work.

Without --dataset, a Clotho-shaped feature set is generated in --work (1.4 GB). Refuses to run
without CUDA (`--smoke` runs every section at toy sizes on any device, to check the script).

--budget-s (default 540 with --goal, else none): the whole run's wall-clock limit, for a GPU
machine lent for a fixed time that kills the command at its limit. A main.py or step-02 run is
killed in time to leave the JSON and the table written (the epochs it finished are kept), and
a variant not started by then is listed as skipped. The JSON is rewritten after every variant.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from benchlib import (CLOTHO_CLIPS, batch_max_lengths, embed_per_length, loader_throughput,
                      make_clotho_features, original_infonce)
from models.audio_encoders import DEFAULT_CHANNELS, CNN14Encoder
from models.core import DualEncoderModel
from models.text_encoders import SentBERTBaseEncoder
from utils.compiling import SYMBOLIC_TIME_OPTIONS, allow_symbolic_time
from utils.criterion_utils import LogSoftmaxLoss
from utils.devices import read_later
from utils.dist_utils import DistContext
from utils.io_utils import atomic_write_text
from utils.train_utils import Trainer, compiled_graphs, train_step

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("steps", "lengths", "loader", "epoch", "logmel", "busy")
STARTED = time.monotonic()  # the process's start, as a lender's time limit counts it
# --goal: name fragments of the variants it measures (see --only)
GOAL_VARIANTS = ("original", "training.compile=off", "main.py on CUDA: whole clips", "the default on CUDA",
                 "preprocessing/02")
GOAL_BUDGET_S = 540         # --goal's default: a GPU lent for 15 minutes, 10 a command, start-up included


class Bench:
    """Sizes of one benchmark run (the full ones, or toy ones for --smoke)."""

    def __init__(self, smoke: bool, device: torch.device):
        self.device = device
        self.smoke = smoke
        self.batch = 4 if smoke else 32
        self.frames = 160 if smoke else 1501
        self.channels = (4, 8, 8, 16, 16, 16) if smoke else DEFAULT_CHANNELS
        self.text_dim = 16 if smoke else 768
        self.table_rows = 100 if smoke else 19195
        self.warmup, self.timed = (1, 2) if smoke else (5, 20)
        self.length_steps = 4 if smoke else 30
        self.clips = {"development": 24, "validation": 8, "evaluation": 8} if smoke else CLOTHO_CLIPS
        self.wavs = 6 if smoke else 256

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# --------------------------------------------------------------------------- 1 + 2: steps

def make_trainer(b: Bench, amp: str = "off", channels_last: bool = False, fused: bool = False,
                 compile_: bool = False, symbolic: bool = False) -> Trainer:
    torch.manual_seed(0)
    table = torch.randn(b.table_rows, b.text_dim)
    model = DualEncoderModel(CNN14Encoder(300, b.channels), SentBERTBaseEncoder(b.text_dim, 300, table))
    model = model.to(b.device)
    if channels_last:
        model.audio_enc.use_channels_last()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt)
    tr = Trainer(model, opt, sched, None, LogSoftmaxLoss(0.07), b.device, amp,
                 text_embed_dim=b.text_dim, train_model=model)
    tr.plain_train_model = model
    if compile_:  # as utils.train_utils.wrap_for_training does
        if symbolic:
            allow_symbolic_time()
        tr.compiled, tr.symbolic_time = True, symbolic
        tr.train_model = torch.compile(model, options=SYMBOLIC_TIME_OPTIONS if symbolic else None)
        torch._dynamo.config.recompile_limit = 64
    return tr


def random_batches(b: Bench, lengths: list[int], g: torch.Generator, pinned: bool) -> list[tuple]:
    """CPU batches (audio (B, T, F), caption rows (B,), clip ids (B,)), made before the clock
    starts. Pinned for this repository's step, as main.py's loaders hand them over (copied
    without waiting); pageable for the original's, whose loader did not pin."""
    pin = pinned and b.device.type == "cuda"
    out = []
    for frames in lengths:
        batch = (torch.randn(b.batch, frames, 64, generator=g) - 5,
                 torch.randint(0, b.table_rows, (b.batch,), generator=g),
                 torch.randint(0, b.batch * 2, (b.batch,), generator=g))  # some clips repeat
        out.append(tuple(t.pin_memory() for t in batch) if pin else batch)
    return out


def original_step(tr: Trainer, audio, rows, clips, ctx) -> torch.Tensor:
    """The original code's step: fp32, its per-sample loss loop, clip ids as a Python list."""
    audio_emb, text_emb = tr.train_model(audio, rows)
    loss = original_infonce(audio_emb, text_emb, clips.tolist(), 0.07)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    return loss.detach()


def on_device(b: Bench, batch: tuple, step) -> tuple:
    """The original copies its batch as its loop did (waiting for the copy; clip ids stay a
    CPU list); this repository's step as main.py does (from pinned memory, without waiting)."""
    audio, rows, clips = batch
    if step is original_step:
        return audio.to(b.device), rows.to(b.device), clips
    return tuple(t.to(b.device, non_blocking=True) for t in batch)


def time_steps(b: Bench, tr: Trainer, lengths: list[int], warmup: int, step=train_step) -> dict:
    """ms per step over `lengths` (one batch each) after `warmup` steps of the first length."""
    g = torch.Generator().manual_seed(1)
    ctx = DistContext(rank=1)
    graphs0 = compiled_graphs()
    pinned = step is not original_step
    start = time.perf_counter()
    for batch in random_batches(b, [lengths[0]] * warmup, g, pinned):
        step(tr, *on_device(b, batch, step), ctx).item()
    b.sync()
    warm_s = time.perf_counter() - start
    if b.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = random_batches(b, lengths, g, pinned)
    start = time.perf_counter()
    for batch in batches:
        loss = step(tr, *on_device(b, batch, step), ctx)
    loss.item()
    b.sync()
    seconds = time.perf_counter() - start
    out = {"ms_per_step": 1e3 * seconds / len(lengths), "clips_per_s": b.batch * len(lengths) / seconds,
           "warmup_s": warm_s, "steps": len(lengths), "graphs_built": compiled_graphs() - graphs0}
    if tr.symbolic_time:  # steps the one graph did not fit, trained eagerly
        out["eager_steps"] = tr.eager_steps
    if b.device.type == "cuda":
        out["peak_mem_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return out


# a variant whose torch.compile failed on its first step trained on eagerly (train_step's
# fallback, with a warning): its figures are the eager step's, not to be read as compiled ones
COMPILE_FELL_BACK = {"error": "torch.compile failed on the first step (its warning is in the output "
                              "above); the figures are the eager step's", "compiled": False}


def release_gpu_memory() -> None:
    """After the caller has dropped its trainer: hand its cached blocks back to the driver, so
    that the main.py and step-02 processes started later find the GPU's memory free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_steps(b: Bench, report) -> None:
    fixed = [b.frames] * b.timed
    # cudnn.benchmark: off as main.py runs whole clips, on as it runs padded or cropped ones
    variants = [
        ("original: fp32, NCHW, per-sample loss, Adam", dict(), original_step, False),
        ("repo: fp32", dict(), train_step, False),
        ("repo: bf16 autocast", dict(amp="bf16"), train_step, False),
        ("repo: bf16 + channels_last", dict(amp="bf16", channels_last=True), train_step, False),
        ("repo: bf16 + channels_last + fused Adam (main.py on CUDA, training.compile=off)",
         dict(amp="bf16", channels_last=True, fused=True), train_step, False),
        ("repo: bf16 + channels_last + fused Adam + compile (main.py on CUDA: padded or cropped clips)",
         dict(amp="bf16", channels_last=True, fused=True, compile_=True), train_step, True),
        ("repo: ... + compile with a symbolic time axis (main.py on CUDA: whole clips)",
         dict(amp="bf16", channels_last=True, fused=True, compile_=True, symbolic=True), train_step, False),
    ]
    if b.device.type != "cuda":
        variants = [(n, {**kw, "amp": "off", "fused": False}, s, bm) for n, kw, s, bm in variants]
    base = None
    for name, kwargs, step, benchmark in variants:
        def run():
            torch.backends.cudnn.benchmark = benchmark
            tr = make_trainer(b, **kwargs)
            try:
                result = time_steps(b, tr, fixed, b.warmup, step)
                return result if tr.compiled or not kwargs.get("compile_") else {**result, **COMPILE_FELL_BACK}
            finally:
                torch.backends.cudnn.benchmark = False
                del tr
                release_gpu_memory()
        result = report.section("steps", name, run)
        if result and step is original_step and "error" not in result:
            base = result["ms_per_step"]
        if result and base:  # no ratio when the original's step was not measured
            result["speedup_vs_original"] = base / result["ms_per_step"]
            report.save()


def bench_lengths(b: Bench, report) -> None:
    lengths = batch_max_lengths(np.random.default_rng(0), b.length_steps, b.batch)
    report.data["length_sequence"] = {"distinct": len(set(lengths)), "min": min(lengths),
                                      "max": max(lengths), "steps": len(lengths)}
    amp = "bf16" if b.device.type == "cuda" else "off"

    def eager(channels_last: bool, benchmark: bool, multiple: int = 0):
        def run():
            torch.backends.cudnn.benchmark = benchmark
            padded = [-(-n // multiple) * multiple for n in lengths] if multiple else lengths
            tr = make_trainer(b, amp=amp, channels_last=channels_last, fused=b.device.type == "cuda")
            try:
                first = time_steps(b, tr, padded, b.warmup)      # new shapes: tuning included
                again = time_steps(b, tr, padded, 0)             # every shape seen before
                return {**again, "first_pass_ms_per_step": first["ms_per_step"],
                        "distinct_shapes": len(set(padded))}
            finally:
                torch.backends.cudnn.benchmark = False
                del tr
                release_gpu_memory()
        return run

    report.section("lengths", "bf16 NCHW, cudnn.benchmark off", eager(False, False))
    report.section("lengths", "bf16 channels_last, cudnn.benchmark off (main.py, training.compile=off)", eager(True, False))
    report.section("lengths", "bf16 channels_last, cudnn.benchmark on", eager(True, True))
    for multiple in (16, 64):
        report.section("lengths", f"bf16 channels_last, pad to x{multiple}, cudnn.benchmark on",
                       eager(True, True, multiple))

    def compiled(multiple: int = 0):
        def run():
            torch.backends.cudnn.benchmark = multiple > 0  # as main.py sets it
            padded = [-(-n // multiple) * multiple for n in lengths] if multiple else lengths
            tr = make_trainer(b, amp=amp, channels_last=True, fused=b.device.type == "cuda",
                              compile_=True, symbolic=multiple == 0)
            try:
                first = time_steps(b, tr, padded, b.warmup)
                again = time_steps(b, tr, padded, 0)
                return {**again, "first_pass_ms_per_step": first["ms_per_step"],
                        "compile_and_warmup_s": first["warmup_s"], "still_compiled": tr.compiled,
                        "distinct_shapes": len(set(padded)),
                        "graphs_built": first["graphs_built"] + again["graphs_built"]}
            finally:
                torch.backends.cudnn.benchmark = False
                del tr
                release_gpu_memory()
        return run

    # padded first: the symbolic time axis changes how this process compiles every later model
    report.section("lengths", "bf16 channels_last + compile, pad to x64 (main.py, training.pad_to_multiple=64)",
                   compiled(64))
    report.section("lengths", "bf16 channels_last + compile, whole clips, symbolic time axis (main.py on CUDA)",
                   compiled())


# --------------------------------------------------------------------------- 3: loader

def bench_loader(b: Bench, report, dataset_dir: Path) -> None:
    from utils.data_utils import CaptionDataset, load_text_table

    _, tid2row = load_text_table(dataset_dir)
    dataset = CaptionDataset(dataset_dir, "development", tid2row, train=True)
    cores = os.cpu_count() or 1
    for workers in sorted({1, 2, 4, 8, 16} & set(range(1, cores + 1))) or [1]:
        report.section("loader", f"{workers} worker(s)", lambda: loader_throughput(
            dataset, workers, batches=4 if b.smoke else 150, batch_size=b.batch,
            pin_memory=b.device.type == "cuda"))


# --------------------------------------------------------------------------- 4: epoch

def gpu_uuid(device: torch.device) -> str | None:
    """The GPU's UUID as nvidia-smi writes it, lower case, without "GPU-" (None if unknown)."""
    try:
        return str(torch.cuda.get_device_properties(device).uuid).lower().removeprefix("gpu-")
    except (AttributeError, RuntimeError):
        return None


class GpuUtilisation:
    """Samples `nvidia-smi` every 100 ms in the background: (time, utilisation %, memory MiB) of
    the benchmark's GPU. nvidia-smi lists every GPU of the machine, whatever
    CUDA_VISIBLE_DEVICES says, so lines are matched to ours by UUID (all of them are kept when
    its UUID matches none). MIG instances report no utilisation: `why_none` then says so.

    Each sample is placed at the time nvidia-smi took it (its `timestamp` field), not when its
    line arrived: writing to a pipe, a C program's output may sit in a 4-KB buffer (~50 lines,
    seconds of samples) before it is sent, which would move samples out of the epoch they
    belong to."""

    def __init__(self, device: torch.device):
        self.uuid = gpu_uuid(device)
        self.samples: list[tuple[float, str, float, float]] = []
        self.unreadable = 0  # lines without a number ("[N/A]" under MIG)
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=timestamp,uuid,utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            fields = [v.strip() for v in line.split(",")]
            taken = smi_time(fields[0]) if len(fields) == 4 else None
            fields = fields[-3:]
            try:
                uuid, util, mem = fields[0].lower().removeprefix("gpu-"), float(fields[1]), float(fields[2])
            except (ValueError, IndexError):
                self.unreadable += 1
                continue
            self.samples.append((taken or time.time(), uuid, util, mem))

    def mean(self, t0: float, t1: float) -> float | None:
        ours = [s for s in self.samples if s[1] == self.uuid] or self.samples
        values = [u for t, _, u, _ in ours if t0 <= t <= t1]
        return float(np.mean(values)) if values else None

    def why_none(self) -> str | None:
        if self.proc is None:
            return "nvidia-smi not found"
        if not self.samples:
            return (f"nvidia-smi gave {self.unreadable} lines without a utilisation (a MIG instance?)"
                    if self.unreadable else "nvidia-smi gave no samples")
        return None

    def stop(self) -> None:
        """Stop sampling; every line nvidia-smi wrote is in `samples` when this returns."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join(timeout=10)


def smi_time(stamp: str) -> float | None:
    """nvidia-smi's `timestamp` ("2025/01/31 12:34:56.789", local time) as time.time() gives
    it, or None if it is not one."""
    for fmt in ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S"):
        with contextlib.suppress(ValueError):
            return datetime.datetime.strptime(stamp, fmt).timestamp()
    return None


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has just ended
        os.killpg(proc.pid, signal.SIGKILL)


def run_logged(cmd: list[str], log: Path, env: dict, timeout_s: float) -> tuple[int, list[tuple[float, str]]]:
    """Run a command, keeping each output line with the time it arrived (appended to `log`).
    Killed after `timeout_s`, so that one hung run leaves the later measurements their time."""
    lines = []
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        killed = []

        def kill() -> None:  # its workers too: they hold the output pipe open
            killed.append(True)
            kill_group(proc)

        watchdog = threading.Timer(timeout_s, kill)
        watchdog.start()
        try:
            for line in proc.stdout:
                lines.append((time.time(), line.rstrip("\n")))
                f.write(line)
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:  # Ctrl-C: its own session does not get the terminal's signal
                kill_group(proc)
                proc.wait()
    if killed:
        lines.append((time.time(), f"killed: still running after {timeout_s:.0f} s"))
    return proc.returncode, lines


# a run still going after this long has hung (a whole-clips epoch pair takes ~1 min on an H200,
# a compiled one a few more): killed, and the rest of the benchmark goes on
EPOCH_TIMEOUT_S = 900
LOGMEL_TIMEOUT_S = 600
BUDGET_MARGIN_S = 15  # --budget-s: left for killing the run under way and writing JSON and table

EPOCH_VARIANTS = (
    ("main.py, 2 epochs, Clotho-sized (whole clips, compiled: the default on CUDA)", []),
    ("main.py, 2 epochs, Clotho-sized, training.compile=off (whole clips, eager)", ["training.compile=off"]),
    ("main.py, 2 epochs, Clotho-sized, training.pad_to_multiple=64 (compiled)", ["training.pad_to_multiple=64"]),
)


def bench_epoch(b: Bench, report, dataset_dir: Path, work: Path, workers: int) -> None:
    from utils.tracking import read_jsonl

    def run(extra: list[str]):
        out_dir = work / "runs"
        overrides = [f"paths.dataset_dir={dataset_dir}", f"paths.output_dir={out_dir}",
                     "paths.features_dir=null", "audio_encoder.init=random", "training.epochs=2",
                     f"training.num_workers={workers}", "wandb.mode=disabled",
                     f"training.device={b.device.type}", *extra]
        if b.smoke:
            overrides += [f"audio_encoder.channels={list(b.channels)}", f"training.batch_size={b.batch}"]
        name = f"bench-{int(time.time())}"
        gpu = GpuUtilisation(b.device) if b.device.type == "cuda" else None
        env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        t0 = time.time()
        code, lines = run_logged([sys.executable, "main.py", "--name", name, "--set", *overrides],
                                 work / "main_py.log", env, timeout_s=report.timeout(EPOCH_TIMEOUT_S))
        if gpu is not None:
            gpu.stop()
        # read whatever the run got to write: a run killed in its second epoch keeps its first
        records = read_jsonl(out_dir / name / "metrics.jsonl")
        ends = [t for t, l in lines if re.match(r"epoch \d+/\d+ ", l)]  # printed after each epoch
        result = {"records": records, "process_s": time.time() - t0, "num_workers": workers}
        if code != 0:
            result["error"] = f"main.py exited {code}: " + " | ".join(l for _, l in lines[-5:])
        if len(records) >= 2:
            r = records[1]
            result["epoch2_s"] = r["seconds"]
            result["epoch2_train_s"] = r.get("train_seconds")
            result["epoch2_data_wait_s"] = r.get("data_wait_seconds")
            result["train_captions_per_s_epoch2"] = 5 * b.clips["development"] / r["train_seconds"]
            result["compiled_graphs"] = r.get("compiled_graphs")
            result["eager_steps"] = r.get("eager_steps")
        if len(ends) >= 2:
            # From one epoch line to the next: the epoch's training pass, its validation, and
            # whatever else holds the GPU up between epochs (the checkpoint's copy, the loaders).
            result["epoch2_line_to_line_s"] = ends[1] - ends[0]
        if gpu is not None and gpu.why_none():
            result["gpu_util_missing"] = gpu.why_none()
        if gpu is not None and len(ends) >= 2:
            result["gpu_util_epoch2_pct"] = gpu.mean(ends[0], ends[1])
            result["gpu_util_epoch1_pct"] = gpu.mean(t0, ends[0])
            if len(records) >= 2:  # epoch 2's training pass starts as epoch 1's line is printed
                train_end = ends[0] + records[1]["train_seconds"]
                result["gpu_util_epoch2_train_pct"] = gpu.mean(ends[0], train_end)
                result["gpu_util_epoch2_rest_pct"] = gpu.mean(train_end, ends[1])
        return result

    for name, extra in EPOCH_VARIANTS:
        report.section("epoch", name, functools.partial(run, extra))


# --------------------------------------------------------------------------- 5: log-mels

def bench_logmel(b: Bench, report, work: Path) -> None:
    import h5py

    root = work / "wavs"
    cores = os.cpu_count() or 1
    common = ["--set", f"paths.dataset_dir={root}", f"paths.output_dir={work / 'runs'}",
              f"demo.sizes.development={b.wavs}", "demo.sizes.validation=2", "demo.sizes.evaluation=2",
              "demo.min_seconds=15.0", "demo.max_seconds=30.0", f"demo.workers={cores}",
              "data.splits=[development]", f"features.workers={cores}", "wandb.mode=disabled"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def step(script: str, *extra: str) -> float:
        start = time.time()
        code, lines = run_logged([sys.executable, script, *common, *extra], work / "logmel.log", env,
                                 timeout_s=report.timeout(LOGMEL_TIMEOUT_S))
        if code != 0:
            raise RuntimeError(f"{script} exited {code}: " + " | ".join(l for _, l in lines[-3:]))
        return time.time() - start

    def run():
        if not (root / "clotho_captions_development.csv").exists():
            step("preprocessing/00_make_demo_dataset.py")
        step("preprocessing/01_clotho_dataset.py")
        h5 = root / "development_audio_logmels.hdf5"
        times = {}
        for device in ("cpu", "cuda") if b.device.type == "cuda" else ("cpu",):
            h5.unlink(missing_ok=True)
            times[device] = step("preprocessing/02_audio_logmel.py", f"features.device={device}")
            h5.rename(h5.with_name(f"{device}.hdf5"))
        result = {"clips": b.wavs, "workers": cores, **{f"{d}_s": s for d, s in times.items()}}
        if "cuda" in times:
            result["cuda_speedup"] = times["cpu"] / times["cuda"]
            with h5py.File(root / "cpu.hdf5") as a, h5py.File(root / "cuda.hdf5") as c:
                result["max_abs_diff"] = float(max(np.abs(a[k][()] - c[k][()]).max() for k in a))
        return result

    report.section("logmel", "preprocessing/02, cuda vs cpu", run)


# --------------------------------------------------------------------------- 6: GPU busy

def kernel_ms(prof) -> float:
    """Milliseconds the GPU spent running kernels and copies in a torch.profiler profile: the
    device's own events only (an operator's row repeats the time of the kernels it launched),
    as the profile table's "Self CUDA time total" counts them."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3


def profile_table(prof, title: str, path: Path) -> None:
    """The profile's heaviest host-side and GPU-side entries, appended to `path`."""
    with path.open("a") as f:
        for key in ("self_cpu_time_total", "self_device_time_total"):
            f.write(f"\n## {title}, by {key}\n{prof.key_averages().table(sort_by=key, row_limit=20)}\n")


def profiled(b: Bench, fn):
    """The torch.profiler profile of `fn()` (host and, on CUDA, GPU events), the GPU waited for."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        b.sync()
    return prof


def busy_loop(b: Bench, tr: Trainer, batches: list[tuple], reader=read_later) -> tuple[float, float]:
    """main.py's loop without its loader: step k's loss is read once step k+1 is queued, without
    waiting for step k+1 (read_later; `reader=lambda t: t.item`: as main.py read it before, waiting
    for step k+1 too). -> (wall s, host s spent queueing the steps: the copies and train_step
    calls)."""
    ctx, pending, host = DistContext(rank=1), None, 0.0
    b.sync()
    start = time.perf_counter()
    for batch in batches:
        t0 = time.perf_counter()
        loss = reader(train_step(tr, *on_device(b, batch, train_step), ctx))
        host += time.perf_counter() - t0
        if pending is not None:
            pending()
        pending = loss
    pending()
    b.sync()
    return time.perf_counter() - start, host


def bench_busy(b: Bench, report, dataset_dir: Path, work: Path) -> None:
    """Where the GPU waits: the training step (whole clips, without the loader) eager and
    compiled, and validation's two parts, each timed, then profiled for its kernel time."""
    tables = work / "busy_profiles.txt"
    tables.unlink(missing_ok=True)
    steps = 6 if b.smoke else 60
    lengths = batch_max_lengths(np.random.default_rng(2), steps, b.batch)
    batches = random_batches(b, lengths, torch.Generator().manual_seed(2), pinned=True)
    amp = "bf16" if b.device.type == "cuda" else "off"

    def step(compile_: bool):
        def run():
            tr = make_trainer(b, amp=amp, channels_last=b.device.type == "cuda",
                              fused=b.device.type == "cuda", compile_=compile_, symbolic=compile_)
            try:
                busy_loop(b, tr, batches)  # new lengths (and the compilation) before the clock
                wall, host = busy_loop(b, tr, batches)
                wall_item, _ = busy_loop(b, tr, batches, reader=lambda t: t.item)
                prof = profiled(b, lambda: busy_loop(b, tr, batches))
                profile_table(prof, f"training steps, {'compiled' if compile_ else 'eager'}", tables)
                gpu = kernel_ms(prof) / steps
                return {"steps": steps, "ms_per_step": 1e3 * wall / steps,
                        "ms_per_step_loss_read_by_item": 1e3 * wall_item / steps,
                        "host_ms_per_step": 1e3 * host / steps,
                        "gpu_ms_per_step": gpu, "gpu_busy_pct": 100 * gpu / (1e3 * wall / steps),
                        "compiled": tr.compiled, "eager_steps": tr.eager_steps if compile_ else None}
            finally:
                tr = None  # held by the profiled closure too
                release_gpu_memory()
        return run

    report.section("busy", "training steps, whole clips, eager (bf16, channels_last, fused Adam)", step(False))

    def validation():
        from utils.config import load_config
        from utils.data_utils import ClipDataset, encode_split
        from utils.train_utils import (build_trainer, load_training_data, make_val_clip_loader, make_val_loader,
                                       validation_loss)

        overrides = [f"paths.dataset_dir={dataset_dir}", "paths.features_dir=null",
                     "audio_encoder.init=random", f"training.device={b.device.type}"]
        if b.smoke:
            overrides += [f"audio_encoder.channels={list(b.channels)}", f"training.batch_size={b.batch}"]
        cfg = load_config(REPO / "conf.yaml", overrides)
        data = load_training_data(cfg)
        tr = build_trainer(cfg, data.table, b.device)
        loader = make_val_loader(data.val_set, cfg["training"]["batch_size"], cfg["seed"], 8, b.device)
        clips = make_val_clip_loader(cfg, b.device)  # as main.py validates
        alone = ClipDataset(dataset_dir, cfg["data"]["val_split"], clips.dataset.fids)
        parts = {"validation loss": lambda: validation_loss(tr, loader),
                 "clip embeddings": lambda: encode_split(tr.model, dataset_dir, cfg["data"]["val_split"],
                                                         data.tid2row, cfg["eval"]["batch_size"], b.device,
                                                         loader=clips),
                 "clip embeddings per length": lambda: embed_per_length(tr.model, alone,
                                                                        cfg["eval"]["batch_size"], b.device)}
        result = {}
        try:
            for name, fn in parts.items():
                fn()  # cuDNN meets every length once
                start = time.perf_counter()
                fn()
                b.sync()
                wall = time.perf_counter() - start
                prof = profiled(b, fn)
                profile_table(prof, f"validation, {name}", tables)
                key = name.replace(" ", "_")
                result[f"{key}_s"] = wall
                result[f"{key}_gpu_busy_pct"] = 100 * kernel_ms(prof) / 1e3 / wall
        finally:
            tr = None  # the parts' closures hold it: dropped, its GPU memory can go back
            release_gpu_memory()
        return result

    report.section("busy", "validation (fp32): loss over padded batches, clip embeddings in masked batches "
                   "(main.py) and one batch per length (before)", validation)
    report.section("busy", "training steps, whole clips, compiled (symbolic time axis)", step(True))


# --------------------------------------------------------------------------- report

class Report:
    """`budget_s`: the whole process's wall-clock limit (None: none), counted from its start."""

    def __init__(self, path: Path, device: torch.device, only: list[str] = (), budget_s: float | None = None):
        self.path = path
        self.only = list(only)  # measure only the variants whose name contains one of these
        self.deadline = STARTED + budget_s - BUDGET_MARGIN_S if budget_s else None
        self.data: dict = {"device": device_name(device), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                           "cpu_cores": os.cpu_count(), "budget_s": budget_s}
        for name in SECTIONS:
            self.data[name] = {}

    def left_s(self) -> float:
        return self.deadline - time.monotonic() if self.deadline is not None else float("inf")

    def timeout(self, limit_s: float) -> float:
        """A subprocess's time limit: `limit_s`, or less where the budget ends sooner."""
        return max(1.0, min(limit_s, self.left_s()))

    def section(self, section: str, name: str, fn):
        if self.only and not any(o in name for o in self.only):
            return None
        if self.left_s() < 1:
            self.data[section][name] = {"error": f"skipped: the budget of {self.data['budget_s']} s "
                                                 "was spent (--budget-s)"}
            print(f"[{section}] {name}: skipped, the budget is spent", flush=True)
            self.save()
            return None
        print(f"[{section}] {name} ...", flush=True)
        start = time.time()
        try:
            result = fn()
        except Exception as e:  # one variant failing must not lose the others' figures
            result = None
            self.data[section][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            traceback.print_exc()
        else:
            self.data[section][name] = result
        if isinstance(self.data[section][name], dict):
            self.data[section][name]["wall_s"] = time.time() - start
        print(f"[{section}] {name}: {json.dumps(self.data[section][name], default=str)[:400]} "
              f"({time.time() - start:.0f} s)", flush=True)
        self.save()
        return result

    def save(self) -> None:
        """Atomically: a kill at the lender's time limit leaves the last complete JSON."""
        self.data["elapsed_s"] = time.monotonic() - STARTED
        atomic_write_text(self.path, json.dumps(self.data, indent=1, default=str))

    def table(self) -> str:
        lines = [f"{self.data['device']} | torch {self.data['torch']} | CUDA {self.data['cuda']} | "
                 f"cuDNN {self.data['cudnn']} | {self.data['cpu_cores']} CPU cores"]
        for section in SECTIONS:
            for name, r in self.data[section].items():
                if not isinstance(r, dict) or "error" in r:
                    lines.append(f"{section:7} {name:75} ERROR {r.get('error') if isinstance(r, dict) else r}")
                    continue
                keys = [k for k in ("ms_per_step", "speedup_vs_original", "first_pass_ms_per_step",
                                    "graphs_built", "peak_mem_GB", "clips_per_s", "epoch2_s",
                                    "epoch2_data_wait_s", "epoch2_line_to_line_s", "gpu_util_epoch2_pct",
                                    "gpu_util_epoch2_train_pct", "gpu_util_epoch2_rest_pct",
                                    "compiled_graphs", "eager_steps", "gpu_util_missing", "cpu_s", "cuda_s",
                                    "ms_per_step_loss_read_by_item", "host_ms_per_step", "gpu_ms_per_step",
                                    "gpu_busy_pct",
                                    "validation_loss_s", "validation_loss_gpu_busy_pct",
                                    "clip_embeddings_s", "clip_embeddings_gpu_busy_pct",
                                    "clip_embeddings_per_length_s", "clip_embeddings_per_length_gpu_busy_pct",
                                    "cuda_speedup", "max_abs_diff") if r.get(k) is not None]
                lines.append(f"{section:7} {name:75} " + "  ".join(
                    f"{k} {r[k]:.4g}" if isinstance(r[k], float) else f"{k} {r[k]}" for k in keys))
        return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_gpu.json", help="JSON file for every figure")
    parser.add_argument("--work", default="/tmp/bench_gpu", help="folder for generated data and runs")
    parser.add_argument("--dataset", help="a folder with step 01-03 outputs (default: generate one)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    parser.add_argument("--epoch-workers", type=int, default=0,
                        help="training.num_workers for the epoch (default: the config's)")
    parser.add_argument("--only", default="", help="comma-separated name fragments: measure only "
                        "the variants whose name contains one (e.g. 'original,2 epochs')")
    parser.add_argument("--goal", action="store_true", help="only what the speed goals are judged by, "
                        "in one run (~5 minutes on an H200): the original's step, main.py's whole-clip "
                        "step compiled and eager, its whole-clip epochs compiled and eager, step 02 "
                        "cuda vs cpu")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, any device: checks the script")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"wall-clock limit of the whole run in seconds (default {GOAL_BUDGET_S} with "
                        "--goal, else none; 0: none): main.py and step-02 runs are killed in time to "
                        "write the JSON and the table, later variants are skipped")
    args = parser.parse_args()
    if args.goal:  # not the padded, compiled epoch: an opt-in key, and ~4 minutes of compiling
        args.sections = "steps,logmel,epoch"
        args.only = ",".join(GOAL_VARIANTS)
        if args.budget_s is None:
            args.budget_s = GOAL_BUDGET_S
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available() and not args.smoke:
        print("error: bench_gpu.py measures CUDA training and found no CUDA device "
              "(torch.cuda.is_available() is False); run it on a GPU machine", file=sys.stderr)
        sys.exit(2)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = Bench(args.smoke, device)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = Report(Path(args.out), device, [o for o in args.only.split(",") if o], args.budget_s or None)
    dataset = Path(args.dataset) if args.dataset else None
    for section in sections:  # in the order given: the first ones get measured first
        if section in ("loader", "epoch", "busy") and dataset is None:
            dataset = work / "clotho_shaped"
            if not (dataset / "sbert_embeds.pkl").exists() and report.left_s() > 0:  # ~20 s
                start = time.time()
                make_clotho_features(dataset, b.clips, b.text_dim)
                report.data["generated_features_s"] = time.time() - start
        if section == "steps":
            bench_steps(b, report)
        elif section == "lengths":
            bench_lengths(b, report)
        elif section == "loader":
            bench_loader(b, report, dataset)
        elif section == "epoch":
            from utils.config import load_config

            workers = args.epoch_workers or load_config(REPO / "conf.yaml")["training"]["num_workers"]
            bench_epoch(b, report, dataset, work, workers)
        elif section == "logmel":
            bench_logmel(b, report, work)
        elif section == "busy":
            bench_busy(b, report, dataset, work)
    report.save()
    print(report.table())
    print(f"wrote {report.path}")


if __name__ == "__main__":
    main()
