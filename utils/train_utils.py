"""Training the dual encoder: the pieces main.py puts together, and loading a trained run.

One epoch = a pass over the training captions (InfoNCE on shuffled batches), the loss over the
validation captions, and text -> audio retrieval metrics on the validation split (each clip
encoded once). Everything needed to continue lives in one checkpoint dict (CONTRIBUTING.md),
written atomically at the end of each epoch, so a run killed at any moment resumes from its
last finished epoch and ends exactly as an uninterrupted run would (on CPU; an epoch's batches
and random crops depend only on the seed and the epoch, with or without DataLoader workers).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import math
import os
import random
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm import tqdm

from models.core import build_model, describe_mismatch
from utils.checkpoint import (CheckpointWriter, load_checkpoint, rng_state, save_checkpoint,
                              set_rng_state)
from utils.clotho import STEP_03
from utils.config import CONFIG_NAME, ConfigError, flat_config, load_run_config, validate as validate_config
from utils.compiling import SYMBOLIC_TIME_OPTIONS, allow_symbolic_time
from utils.criterion_utils import CRITERIA, LogSoftmaxLoss
from utils.data_utils import (CaptionDataset, check_features_found, check_sentence_model,
                              check_split_prepared, collate_pad, encode_split, features_dir,
                              inference_autocast, leave_signals_to_the_parent, load_text_table,
                              logmel_path, read_text_digests, recorded_sentence_model, relevance,
                              split_clip_loader)
from utils.devices import amp_mode, autocast, read_later, resolve_device
from utils.dist_utils import (DistContext, gather, gather_objects, gather_with_grad, launched_with_torchrun,
                              on_master, sync_buffers, weights_checksum, wrap_ddp)
from utils.errors import UserError, raise_if_stopped
from utils.features import check_definition
from utils.io_utils import remove_stale_temps
from utils.metrics import retrieval_metrics
from utils.runs import checkpoint_path, lock_run, require_run_dir
from utils.tracking import Tracker

# Sections that define the trained model and its loss: a resumed run must keep them.
FROZEN_ON_RESUME = ("audio_encoder", "text_encoder", "criterion")
# Keys the optimizer, scheduler and best metric restored from last.pt carry: a new value would be
# written to config.yaml but not used (Adam's lr and weight decay, the plateau schedule), or
# compare epochs on another metric than the best one was chosen on (monitor).
RESTORED_ON_RESUME = ("training.lr", "training.weight_decay", "training.scheduler", "training.monitor")
# The log-mel definition the run has trained on (features.CONFIG_PARAMS).
FEATURES_ON_RESUME = ("features.window_s", "features.hop_s", "features.n_mels")
# The sentence model whose caption embeddings the text projection has learnt from.
FROZEN_KEYS_ON_RESUME = ("sbert.model",)


# --------------------------------------------------------------------------- config

def check_training_config(cfg: dict) -> None:
    """Every key's type and range (utils/config_schema.py), and a global batch that torchrun's
    processes can share; run before any data is read or a run folder made."""
    validate_config(cfg)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if launched_with_torchrun() else 1
    check_global_batch(cfg["training"]["batch_size"], world_size)
    if cfg["training"]["sync_batchnorm"] and world_size > 1 \
            and resolve_device(cfg["training"]["device"], "training.device") == "cpu":
        raise ConfigError("config key 'training.sync_batchnorm' is true, but torch's SyncBatchNorm "
                          "runs on CUDA devices only and this run is on the CPU; set it to false")


def check_global_batch(batch_size: int, world_size: int) -> None:
    if batch_size % world_size:
        raise ConfigError(f"config key 'training.batch_size' ({batch_size}) must be divisible by "
                          f"the number of processes ({world_size}): it is the global batch")


def resume_config(run_dir: str | Path, overrides=()) -> dict:
    """The config of run `run_dir` plus `overrides`, which may not touch the model, the loss,
    or what the restored optimizer and scheduler decide. The run's relative paths.* are found
    against its training directory from anywhere (utils.provenance.resolved_overrides), as the
    postprocessing steps find them; save `load_run_config(run_dir, overrides)`, not this."""
    from utils.provenance import resolved_overrides

    run_dir = require_run_dir(run_dir)
    saved = flat_config(load_run_config(run_dir))
    cfg = load_run_config(run_dir, overrides)
    for key, value in flat_config(cfg).items():
        if saved.get(key) == value:
            continue
        fixed = fixed_on_resume(key)
        if fixed == "model":
            raise UserError(f"--set {key}: {run_dir} was trained with {saved.get(key)!r}; model "
                            "and loss keys cannot change on --resume (start a new run instead)")
        if fixed == "features":
            raise _features_fixed(key, run_dir, saved.get(key))
        if fixed == "restored":
            raise UserError(f"--set {key}: {run_dir} was trained with {saved.get(key)!r}, and the "
                            "optimizer, scheduler and best metric restored from checkpoints/last.pt "
                            "keep it on --resume; start a new run to change it")
    return load_run_config(run_dir, resolved_overrides(run_dir, overrides))


def _features_fixed(key: str, run_dir: Path, trained: object) -> UserError:
    return UserError(f"--set {key}: {run_dir} was trained on log-mels with {trained!r}; a trained "
                     "run's features cannot change (train a new run instead)")


def refuse_feature_overrides(run_dir: Path, cfg: dict, saved: dict) -> None:
    """Scoring, queries and the submission compute or read log-mels with the definition the run
    was trained on (`saved`: its config.yaml): `--set features.hop_s=...` would have changed
    new audio only, without a word."""
    trained, now = flat_config(saved), flat_config(cfg)
    for key in FEATURES_ON_RESUME:
        if now[key] != trained[key]:
            raise _features_fixed(key, run_dir, trained[key])


def fixed_on_resume(key: str) -> str | None:
    """Why a flat config key cannot change on --resume ("model", "features", "restored"), or None."""
    if key.split(".", 1)[0] in FROZEN_ON_RESUME or key in FROZEN_KEYS_ON_RESUME:
        return "model"
    if key in FEATURES_ON_RESUME:
        return "features"
    if any(key == k or key.startswith(k + ".") for k in RESTORED_ON_RESUME):
        return "restored"
    return None


# --------------------------------------------------------------------------- devices, seeds

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- data

@dataclass
class TrainingData:
    table: torch.Tensor                 # [N, D] every caption's sentence embedding
    tid2row: dict
    train_set: CaptionDataset
    val_set: CaptionDataset
    embeddings_path: Path


def load_training_data(cfg: dict, run_dir: str | Path | None = None) -> TrainingData:
    """The caption table and both datasets, validated against each other (UserError if not).
    `run_dir`: the run being resumed (its features cannot change, so advice names its config)."""
    feat_dir = features_dir(cfg)
    run_config = Path(run_dir) / CONFIG_NAME if run_dir is not None else None
    for key in ("train_split", "val_split"):
        check_split_prepared(feat_dir, cfg["data"][key], cfg, f"data.{key}")
        check_definition(feat_dir, cfg["data"][key], cfg["features"], run_config=run_config)
    table, tid2row = load_text_table(feat_dir, cfg["text_encoder"]["embeddings"])
    check_sentence_model(feat_dir / cfg["text_encoder"]["embeddings"], cfg["sbert"]["model"],
                         step_03_for_run(run_dir, cfg) if run_dir is not None else None)
    train_set = CaptionDataset(feat_dir, cfg["data"]["train_split"], tid2row,
                               max_frames=cfg["training"]["max_frames"], train=True)
    val_set = CaptionDataset(feat_dir, cfg["data"]["val_split"], tid2row)  # whole clips
    for key, dataset in (("train_split", train_set), ("val_split", val_set)):
        if dataset.skipped.clips:  # data.skip_bad_audio: say what is left out
            print(dataset.skipped.describe(dataset.split))
        if len(dataset.fids) < 2:  # a batch of one clip's captions has no negative
            raise UserError(f"data.{key}: split '{dataset.split}' has {len(dataset.fids)} clip(s); "
                            "InfoNCE contrasts each caption with other clips, so its loss is 0 "
                            "with fewer than two — give the split more clips")
    return TrainingData(table, tid2row, train_set, val_set,
                        feat_dir / cfg["text_encoder"]["embeddings"])


class EpochPermutation(Sampler[int]):
    """Every index once per epoch, in an order that depends only on (seed, epoch).

    The same orders as a DataLoader with `shuffle=True` and a generator seeded that way at each
    epoch: its iterator first drew its workers' seed from the generator, then RandomSampler
    permuted with the rest. A sampler of our own keeps them with workers that outlive an epoch
    (they draw no seed after the first).
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = int(n), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the workers' seed, as before
        return iter(torch.randperm(self.n, generator=g).tolist())


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class EpochSeeded:
    """Shuffling that depends only on (seed, epoch): a resumed run sees the same batches."""

    def __init__(self, dataset, seed: int, ctx: DistContext):
        self.seed = seed
        self.generator = torch.Generator()  # the DataLoader's: its workers' seed (random crops)
        self.sampler = (DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank,
                                           shuffle=True, seed=seed, drop_last=False)
                        if ctx.enabled else EpochPermutation(len(dataset), seed))

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        self.sampler.set_epoch(epoch)


def make_train_loader(dataset, cfg: dict, device: torch.device, ctx: DistContext
                      ) -> tuple[DataLoader, EpochSeeded]:
    """Shuffled batches of `training.batch_size` captions in total (split evenly over ranks)."""
    batch_size = cfg["training"]["batch_size"]
    check_global_batch(batch_size, ctx.world_size)
    workers = cfg["training"]["num_workers"]
    seeding = EpochSeeded(dataset, cfg["seed"], ctx)
    # Random crops (training.max_frames) are drawn in the workers, which are then started
    # afresh each epoch, seeded from the epoch's generator: a resumed run crops as the
    # uninterrupted one. Whole clips draw nothing there, so the workers live for the whole
    # run: starting them forks this process once per worker, with the GPU idle meanwhile (8
    # workers of a 4-GB process: 0.37 s on a 2-core CPU machine).
    persistent = workers > 0 and cfg["training"]["max_frames"] == 0
    loader = DataLoader(dataset, batch_size=batch_size // ctx.world_size, sampler=seeding.sampler,
                        generator=seeding.generator, num_workers=workers,
                        collate_fn=functools.partial(collate_pad, multiple=cfg["training"]["pad_to_multiple"]),
                        pin_memory=device.type == "cuda", persistent_workers=persistent,
                        drop_last=False, worker_init_fn=leave_signals_to_the_parent)
    return loader, seeding


def last_batch_size(n: int, batch_size: int, world_size: int = 1) -> int:
    """Captions in an epoch's last global batch of `n` (drop_last is not used): with several
    processes the sampler pads `n` to a multiple of them and each takes batch_size/world_size."""
    per_rank, local = -(-n // world_size), batch_size // world_size
    return world_size * (per_rank % local or local)


def _zero_loss_last_batches(train_n: int, val_clips: np.ndarray, batch_size: int, world_size: int
                            ) -> dict[str, str]:
    """{"training" | "validation": what its epoch's last batch holds} where that batch's InfoNCE
    loss is exactly 0: one caption (it has no negative), or, in the validation split's fixed
    order (`val_clips`: the clip of each caption, in loader order), the captions of one clip."""
    out = {}
    if last_batch_size(train_n, batch_size, world_size) == 1:
        out["training"] = "1 caption"
    if len(val_clips):
        last = val_clips[-(len(val_clips) % batch_size or batch_size):]
        if len(np.unique(last)) == 1:
            out["validation"] = "1 caption" if len(last) == 1 else f"{len(last)} captions of one clip"
    return out


def zero_loss_batch_note(cfg: dict, train_n: int, val_clips: np.ndarray, world_size: int = 1) -> str | None:
    """A note when the training or validation split ends on a batch whose loss is exactly 0:
    train_loss and val_loss are the unweighted mean of the batch losses (as the baseline's; on
    Clotho at batch 32 the last batches hold 27 and 9 captions), so such a batch pulls them
    down, val_loss most (it picks best.pt by default and steers the learning rate)."""
    batch_size = cfg["training"]["batch_size"]
    bad = _zero_loss_last_batches(train_n, val_clips, batch_size, world_size)
    if not bad:
        return None
    names = {"training": f"training split {cfg['data']['train_split']}",
             "validation": f"validation split {cfg['data']['val_split']}"}
    losses = " and ".join({"training": "train_loss", "validation": "val_loss"}[k] for k in bad)
    fix = next((b for step in range(world_size, 64 * world_size, world_size)
                for b in (batch_size + step, batch_size - step)
                if b >= max(2, world_size) and not _zero_loss_last_batches(train_n, val_clips, b, world_size)),
               None)
    what = " and ".join(f"the {names[k]} ends on a batch of {held}" for k, held in bad.items())
    one = len(bad) == 1
    return (f"with training.batch_size {batch_size}, {what}, whose InfoNCE loss{'' if one else 'es'} "
            f"{'is' if one else 'are'} exactly 0 but count{'s' if one else ''} as a whole batch in "
            f"{losses} (the mean of the batch losses, as the baseline's), lowering {'it' if one else 'them'}"
            + (f" — training.batch_size {fix} avoids it" if fix is not None else ""))


def make_val_loader(dataset, batch_size: int, seed: int, num_workers: int, device) -> DataLoader:
    """Validation batches in one fixed shuffled order, read by workers that live for the run.

    Fixed, so the loss is comparable from epoch to epoch; shuffled, because in CSV order a
    batch would hold the five captions of a few clips and the loss would mask most pairs.
    """
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    # The workers draw nothing random. Their seed comes from a generator of their own, not from
    # the global RNG: persistent workers take it only in a process's first epoch, which would
    # make a resumed run's dropout masks part from the uninterrupted run's (validation_loss
    # takes the global draw itself, every epoch).
    return DataLoader(torch.utils.data.Subset(dataset, order), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, collate_fn=collate_pad,
                      pin_memory=torch.device(device).type == "cuda",
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=leave_signals_to_the_parent)


# worker processes that read the validation clips for their embeddings, at most
VAL_CLIP_WORKERS = {"cuda": 4, "cpu": 1}


def make_val_clip_loader(cfg: dict, device) -> DataLoader:
    """The validation clips for their embeddings at each epoch's end (clip_loader's batches).
    Workers living for the run (VAL_CLIP_WORKERS, at most training.num_workers; 0: this process)
    read them while this process launches the model's work. On a GPU one worker was what the
    embeddings waited for (an H200: 0.32 s of the 0.70 s they took); on the CPU the model is."""
    workers = min(cfg["training"]["num_workers"], VAL_CLIP_WORKERS[torch.device(device).type])
    return split_clip_loader(features_dir(cfg), cfg["data"]["val_split"], cfg["eval"]["batch_size"],
                             device, workers)


# --------------------------------------------------------------------------- model & optimiser

@dataclass
class Trainer:
    model: torch.nn.Module              # the DualEncoderModel (never the DDP wrapper)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler | None
    criterion: LogSoftmaxLoss
    device: torch.device
    amp: str
    epoch: int = 0                      # last finished epoch
    best_metric: float | None = None
    best_epoch: int = 0
    text_embed_dim: int = 0
    caption_probe: dict = field(default_factory=dict)  # caption_probe(): saved with each checkpoint
    train_model: torch.nn.Module | None = field(default=None)  # compiled / DDP wrapper, or the model
    compiled: bool = False              # train_model is torch.compile'd
    symbolic_time: bool = False         # ... with one graph for every clip length (whole clips)
    compile_checked: bool = False       # the compiled model has run a step
    eager_steps: int = 0                # symbolic time: steps the graph did not fit, run eagerly
    plain_train_model: torch.nn.Module | None = None  # train_model without torch.compile

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]


def build_trainer(cfg: dict, table: torch.Tensor, device: torch.device, fresh: bool = True) -> Trainer:
    """Model (prior weights only for a fresh run), Adam, ReduceLROnPlateau, loss, AMP scaler."""
    build_cfg = cfg if fresh else _random_init(cfg)  # weights come from the checkpoint instead
    model = build_model(build_cfg, text_in_dim=table.shape[1], table=table).to(device)
    cuda = device.type == "cuda"
    if cuda and hasattr(model.audio_enc, "use_channels_last"):
        model.audio_enc.use_channels_last()  # NHWC convs: cuDNN's fast bf16 kernels, same numbers
    t = cfg["training"]
    # fused: one CUDA kernel updates every parameter (the same Adam, without ~150 small launches)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                 lr=t["lr"], weight_decay=t["weight_decay"], fused=cuda)
    s = t["scheduler"]
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=s["factor"], patience=s["patience"],
        threshold=s["threshold"], threshold_mode=s["threshold_mode"], min_lr=s["min_lr"])
    amp = amp_mode(t["amp"], device)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None  # bf16 needs no scaling
    criterion = CRITERIA[cfg["criterion"]["name"]](cfg["criterion"]["temperature"], cfg["criterion"]["dist"])
    return Trainer(model, optimizer, scheduler, scaler, criterion, device, amp,
                   text_embed_dim=int(table.shape[1]), train_model=model)


def _random_init(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["audio_encoder"]["init"] = "random"
    return cfg


def checkpoint_dict(tr: Trainer, cfg: dict, rng_states: list[dict] | None = None) -> dict:
    """`rng_states`: every rank's generator states, in rank order (default: this process's)."""
    return {
        "model": tr.model.state_dict(),  # the caption table is a non-persistent buffer: not saved
        "optimizer": tr.optimizer.state_dict(),
        "scheduler": tr.scheduler.state_dict(),
        "scaler": tr.scaler.state_dict() if tr.scaler is not None else None,
        "epoch": tr.epoch,
        "best_metric": tr.best_metric,
        "best_epoch": tr.best_epoch,
        "config": cfg,
        "rng": rng_states if rng_states is not None else [rng_state(tr.device)],  # one per rank
        "text_embed_dim": tr.text_embed_dim,
        "caption_probe": tr.caption_probe,
    }


def claim_run(run_dir: str | Path, held: contextlib.ExitStack) -> None:
    """Lock a run to resume it (released when `held` closes), then remove the half-written
    checkpoint saves of the process that was killed: only the lock holder may, as a running
    process's own saves look just the same."""
    held.enter_context(lock_run(run_dir))
    remove_stale_temps(checkpoint_path(run_dir, "last").parent)


def read_resume_checkpoint(run_dir: str | Path) -> dict | None:
    """`checkpoints/last.pt` of a run (claimed with claim_run first), or None if it was stopped
    before its first epoch ended."""
    path = checkpoint_path(run_dir, "last")
    if not path.exists():
        return None
    state = load_checkpoint(path)
    missing = [k for k in ("optimizer", "scheduler", "epoch", "rng", "text_embed_dim") if k not in state]
    if missing:
        raise UserError(f"{path}: checkpoint lacks {', '.join(missing)}; it cannot resume a run")
    return state


def check_resume_checkpoint(state: dict, ckpt: Path, cfg: dict) -> None:
    """Refuse a last.pt written under other model, loss, feature or optimizer settings than the
    run's config.yaml says (one copied in from another run, or a config.yaml edited by hand):
    training would go on from a model the config does not describe, and every later step would
    trust the config. Keys a checkpoint of an older version lacks are not compared."""
    saved, ours = flat_config(state.get("config") or {}), flat_config(cfg)
    differ = [k for k in ours if k in saved and saved[k] != ours[k] and fixed_on_resume(k)]
    if differ:
        shown = ", ".join(f"{k} {saved[k]!r} (the run: {ours[k]!r})" for k in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise UserError(f"{ckpt}: written by a run with {shown}{more}, so it is not this run's "
                        f"checkpoint; put the run's own last.pt back, or train a new run")


PROBE_CAPTIONS = 8
PROBE_MIN_COSINE = 0.995  # the same sentence model elsewhere (a local copy, fp16, another GPU): > 0.9999


def caption_probe(table: torch.Tensor, tid2row: dict[str, int], texts: dict[str, str] | None) -> dict:
    """A few caption vectors the model is trained on, spread over the table (so that some are
    in any split still there when the run is scored), with the digest of the text each
    embeds (step 03's record; "" where there is none): {"tids": [K], "vectors": [K, D],
    "texts": [K]}."""
    tids = list(tid2row)
    picks = sorted({round(i * (len(tids) - 1) / max(PROBE_CAPTIONS - 1, 1)) for i in range(PROBE_CAPTIONS)})
    chosen = [tids[i] for i in picks]
    return {"tids": chosen, "vectors": table[[tid2row[t] for t in chosen]].detach().float().cpu().clone(),
            "texts": [(texts or {}).get(t, "") for t in chosen]}


def check_caption_probe(state: dict, ckpt: Path, table: torch.Tensor, tid2row: dict[str, int],
                        embeddings_path: Path, rerun: str) -> None:
    """The caption embeddings must be the vectors the checkpoint was trained on, whatever the
    sentence model is called now: step 03 rerun with another model of the same size (and
    `--set sbert.model=` to match it) would otherwise score the run without a word, near chance.
    A caption whose text was edited since (its tid kept) is not compared; checkpoints without a
    probe (older versions) and captions no longer in the file pass. `rerun`: the step-03
    command for the run (step_03_for_run)."""
    probe = state.get("caption_probe") or {}
    tids, vectors = probe.get("tids") or [], probe.get("vectors")
    texts_then = probe.get("texts") or [""] * len(tids)
    texts_now = read_text_digests(embeddings_path) or {}
    shared = [(i, tid) for i, tid in enumerate(tids) if tid in tid2row
              and not (texts_then[i] and texts_now.get(tid, texts_then[i]) != texts_then[i])]
    if not shared or vectors is None or vectors.shape[1] != table.shape[1]:
        return  # (another size is check_text_dim's to report)
    then = torch.nn.functional.normalize(vectors[[i for i, _ in shared]].float(), dim=1)
    now = torch.nn.functional.normalize(table[[tid2row[t] for _, t in shared]].float(), dim=1)
    cosine = (then * now).sum(dim=1)  # (K,)
    worst = int(cosine.argmin())
    if float(cosine[worst]) < PROBE_MIN_COSINE:
        model = recorded_sentence_model(embeddings_path)
        trained = (state.get("config") or {}).get("sbert", {}).get("model")
        how = (f"another sentence model ({model!r})" if model and model != trained
               else "a sentence model that gives other vectors (another version of it?)")
        raise UserError(f"{embeddings_path}: caption {shared[worst][1]} is not the vector {ckpt} was "
                        f"trained on (cosine {float(cosine[worst]):.3f}): step 03 was rerun with "
                        f"{how} — rerun {rerun}, which embeds the captions with the run's model")


def step_03_for_run(run_dir: Path, cfg: dict, saved: dict | None = None) -> str:
    """The step-03 command that embeds the captions with a trained run's own sentence model,
    from this directory: the run's config (`saved`, default read from the run), plus the data
    paths it was found at elsewhere."""
    paths = (saved if saved is not None else load_run_config(run_dir))["paths"]
    moved = [f"paths.{k}={shlex.quote(str(cfg['paths'][k]))}" for k in ("dataset_dir", "features_dir")
             if cfg["paths"][k] != paths[k]]
    return f"{STEP_03} --conf {Path(run_dir) / CONFIG_NAME}" + (f" --set {' '.join(moved)}" if moved else "")


def check_text_dim(state: dict, ckpt: Path, table: torch.Tensor, embeddings_path: Path) -> None:
    if int(state["text_embed_dim"]) != table.shape[1]:
        raise UserError(f"{embeddings_path}: sentence embeddings are {table.shape[1]}-d but "
                        f"{ckpt} was trained on {int(state['text_embed_dim'])}-d ones; use the "
                        f"embeddings file the run was trained with")


def restore(tr: Trainer, state: dict, ckpt: Path) -> None:
    """Put a trainer back in the state saved at the end of epoch `state['epoch']`."""
    try:
        tr.model.load_state_dict(state["model"])
        load_optimizer_state(tr.optimizer, state["optimizer"])
        tr.scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{ckpt}: does not fit the model of this run's config "
                        f"({_mismatch_text(tr.model, state['model'], e)})") from None
    if tr.scaler is not None and state.get("scaler"):
        tr.scaler.load_state_dict(state["scaler"])
    tr.epoch, tr.best_epoch = int(state["epoch"]), int(state["best_epoch"])
    tr.best_metric = state["best_metric"]


# How Adam runs, chosen for this process's device (fused on CUDA): not a hyper-parameter, so a
# checkpoint written elsewhere (on the CPU, say) must not bring its own back with the saved groups.
_OPTIMIZER_RUNTIME_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """`optimizer.load_state_dict(saved)`, keeping this run's runtime settings, and each moment
    in its parameter's memory layout: CUDA's fused Adam refuses an NCHW moment of a
    channels_last weight, and `load_state_dict` moves tensors without changing their layout."""
    own = [{k: g[k] for k in _OPTIMIZER_RUNTIME_KEYS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, own):
        group.update(settings)
        on_device_step = bool(group.get("fused") or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":  # fused and capturable Adam keep it on the device, as fp32
                    state[key] = value.to(device=p.device, dtype=torch.float32) if on_device_step else value.cpu()
                elif value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def restore_rng_of_rank(state: dict, ctx: DistContext, cfg: dict, device: torch.device) -> None:
    """Continue this rank's saved RNG streams. Where the checkpoint has none for this rank (it
    was written with fewer processes, or by a version that kept rank 0's only), seed a fresh,
    distinct stream: the run goes on correctly but no longer repeats an uninterrupted one."""
    states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(states) != ctx.world_size and ctx.is_master:
        print(f"note: the checkpoint of epoch {int(state['epoch'])} holds the random streams of "
              f"{len(states)} process(es), this resume runs {ctx.world_size}: the batches of the "
              "epochs to come differ from those of an uninterrupted run (its numbers are not "
              "repeated exactly)", file=sys.stderr)
    if len(states) == ctx.world_size or ctx.is_master:
        set_rng_state(states[ctx.rank], device)
    else:
        seed_everything(cfg["seed"] + ctx.rank + 1_000_003 * int(state["epoch"]))


def improved(monitor: str, value: float, best: float | None) -> bool:
    """val_loss: lower is better; the retrieval metrics: higher is better."""
    if best is None:
        return True
    return value < best if monitor == "val_loss" else value > best


# --------------------------------------------------------------------------- one epoch

def nonfinite_clips(audio: torch.Tensor, clip_ids: torch.Tensor, dataset: CaptionDataset) -> list[str]:
    """The fids of the clips in a batch whose log-mels hold NaN/inf (audio `[B, T, F]`)."""
    bad = (~torch.isfinite(audio.float()).flatten(1).all(dim=1)).cpu()  # [B]
    return sorted({dataset.fids[int(c)] for c in clip_ids.cpu()[bad].tolist()})


def nonfinite_loss_error(epoch: int, step: int, value: float, fids: list[str],
                         dataset: CaptionDataset) -> UserError:
    """A one-line error that says where the loss broke and the likeliest cause (`fids`: the
    batch's clips with NaN/inf log-mels, on every rank)."""
    if fids:
        # step 02 never writes NaN/inf (it rejects such clips), so the file is damaged; it
        # would call the file complete, as it does not read every value: delete it first
        path = logmel_path(dataset.dataset_dir, dataset.split)
        cause = (f"the log-mels of fid {', '.join(fids[:3])} in {path} contain NaN/inf, so the "
                 f"file is damaged — delete {path} and rerun preprocessing/02_audio_logmel.py")
    else:
        cause = "the inputs are finite: try a lower training.lr, or training.amp=off"
    return UserError(f"epoch {epoch}, step {step}: training loss is {value}; stopped without "
                     f"saving ({cause}); the last good checkpoint is kept")


def train_step(tr: Trainer, audio: torch.Tensor, rows: torch.Tensor, clips: torch.Tensor,
               ctx: DistContext) -> torch.Tensor:
    """One optimiser step on a batch already on the device -> the loss (a 0-d tensor, no sync).

    audio `[B, T, 64]`, rows `[B]` (caption table rows), clips `[B]` (clip ids: same clip = not a
    negative). Under DDP each rank encodes its share of the batch; embeddings and clip ids are
    gathered so the negatives span the global batch, and every rank computes the same global loss.
    """
    if not tr.compiled:
        return _step(tr, audio, rows, clips, ctx)
    if tr.symbolic_time:  # whole clips: a graph pinned to the first length fails that step
        torch._dynamo.mark_dynamic(audio, 1)
    else:  # a graph per padded or cropped length
        torch._dynamo.mark_static(audio, 1)
    # the epoch's last, smaller batch may share the graph of the full ones
    torch._dynamo.maybe_mark_dynamic(audio, 0)
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    if tr.compile_checked and not tr.symbolic_time:
        return _step(tr, audio, rows, clips, ctx)
    if tr.compile_checked:
        return _symbolic_step(tr, audio, rows, clips, ctx)
    try:
        loss = _step(tr, audio, rows, clips, ctx)
    except Exception as e:  # noqa: BLE001 - any compiler failure: train on without it
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        what = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        if ctx.enabled:  # a rank redoing the step alone would run collectives the others never
            # join (a hang until the timeout); its exit makes torchrun stop them all instead
            raise UserError(f"torch.compile failed on the first step on rank {ctx.rank} ({what}); "
                            "set training.compile=off for a run with several processes") from e
        tqdm.write(f"warning: torch.compile failed on the first step ({what}); training "
                   "continues without it (set training.compile=off to skip the attempt)")
        tr.compiled, tr.symbolic_time, tr.train_model = False, False, tr.plain_train_model
        loss = _step(tr, audio, rows, clips, ctx)
    tr.compile_checked = True
    return loss


def _symbolic_step(tr: Trainer, audio, rows, clips, ctx: DistContext) -> torch.Tensor:
    """Whole clips: the one graph serves every length, and no other is built (each would cost
    ~30 s, and a compiler that pins the length would build one per length). A batch the graph
    does not fit (its guards fail before the step runs) is trained eagerly."""
    stance = getattr(torch.compiler, "set_stance", None)
    if stance is None:  # torch < 2.6: recompiling is the only way
        return _step(tr, audio, rows, clips, ctx)
    try:
        with stance("fail_on_recompile"):
            return _step(tr, audio, rows, clips, ctx)
    except RuntimeError as e:
        if "fail_on_recompile" not in str(e):
            raise
        if tr.eager_steps == 0:
            # "- 0/0: <guard>  # <where it was added>", one line per failed guard
            guards = [line.strip()[2:].split(": ", 1)[-1] for line in str(e).splitlines()
                      if line.strip().startswith("- ")]
            tqdm.write(f"warning: a batch of {audio.shape[0]} clips x {audio.shape[1]} frames does not "
                       f"fit the compiled graph ({(guards or ['guards failed'])[0][:160]}); such "
                       "batches are trained without torch.compile (eager_steps in metrics.jsonl)")
        tr.eager_steps += 1
        return _step(tr, audio, rows, clips, ctx, tr.plain_train_model)


def _step(tr: Trainer, audio, rows, clips, ctx: DistContext, model=None) -> torch.Tensor:
    with autocast(tr.device, tr.amp):
        audio_emb, text_emb = (model or tr.train_model)(audio, rows)
    audio_emb = gather_with_grad(audio_emb.float(), ctx)
    text_emb = gather_with_grad(text_emb.float(), ctx)
    loss = tr.criterion(audio_emb, text_emb, gather(clips, ctx))  # [global B] clip ids
    tr.optimizer.zero_grad(set_to_none=True)
    if tr.scaler is not None:
        tr.scaler.scale(loss).backward()
        tr.scaler.step(tr.optimizer)
        tr.scaler.update()
    else:
        loss.backward()
        tr.optimizer.step()
    return loss.detach()


@dataclass
class EpochStats:
    loss: float           # mean of the batch losses
    steps: int
    captions: int         # this process's captions
    seconds: float        # the training pass (not validation)
    data_wait: float      # seconds spent waiting for the DataLoader: ~0 when it keeps up


def train_one_epoch(tr: Trainer, loader: DataLoader, epoch: int, ctx: DistContext,
                    log_every: int = 50, on_log: Callable[[dict], None] | None = None,
                    check: Callable[[], None] | None = None) -> EpochStats:
    """One pass over the training captions (see train_step); `check()` runs between steps
    (the background checkpoint write's error surfaces there, not an epoch later)."""
    tr.train_model.train()
    total, n, window, captions, wait = 0.0, 0, [], 0, 0.0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not ctx.is_master, leave=False,
               dynamic_ncols=True)

    def account(step: int, loss: Callable[[], float], audio: torch.Tensor, clips: torch.Tensor) -> None:
        nonlocal total, n, window, captions
        value = loss()  # waits for this step only: the next one is already queued
        if not math.isfinite(value):
            # the loss is the global batch's: every rank is here, and each sees its share only
            fids = nonfinite_clips(audio, clips, loader.dataset)
            fids = sorted(set().union(*gather_objects(fids, ctx)))
            raise nonfinite_loss_error(epoch, step, value, fids, loader.dataset)
        total, n, captions = total + value, n + 1, captions + len(clips)
        window.append(value)
        bar.set_postfix(loss=f"{total / n:.4f}", refresh=False)
        if on_log is not None and step % log_every == 0:
            on_log({"train/loss": sum(window) / len(window), "train/epoch": epoch - 1 + step / len(loader),
                    "train/lr": tr.lr})
            window = []

    # Each step's loss is read after the next step is queued, and without waiting for that one
    # (read_later): reading it at once, or with .item(), would leave the GPU idle while the CPU
    # loads and launches every next step. A NaN still stops the run at its own step (one more
    # step runs on the spoilt weights; nothing is saved).
    pending = None  # (step, its loss's reader, audio, clips) of the step whose loss is not read yet
    batches = iter(bar)
    for step in itertools.count(1):
        t0 = time.perf_counter()
        try:
            audio, rows, clips = next(batches)
        except StopIteration:
            break
        wait += time.perf_counter() - t0
        audio = audio.to(tr.device, non_blocking=True)
        rows = rows.to(tr.device, non_blocking=True)
        clips = clips.to(tr.device, non_blocking=True)
        if tr.compiled and not tr.compile_checked and ctx.is_master:
            tqdm.write(compile_note(tr))
        graphs = compiled_graphs() if tr.compiled else 0
        loss = read_later(train_step(tr, audio, rows, clips, ctx))
        if tr.compiled and compiled_graphs() != graphs:
            # the bar's clock skips a graph's build: counted as a step, it made the bar promise
            # hours (7:38:50 after the first step of a Clotho epoch on an H200)
            bar.unpause()
        if pending is not None:
            account(*pending)
        pending = (step, loss, audio, clips)
        if check is not None:
            check()
        raise_if_stopped()
    if pending is not None:
        account(*pending)
    return EpochStats(total / max(n, 1), n, captions, time.perf_counter() - start, wait)


@torch.no_grad()
def validation_loss(tr: Trainer, loader: DataLoader, amp: str = "off") -> float:
    """Mean InfoNCE over the validation batches, eval mode (single process, unwrapped model).
    `amp`: eval.amp, not training.amp: this loss picks best.pt and steers ReduceLROnPlateau
    (an absolute threshold of 0.005), so by default it is the original's fp32 value."""
    model = tr.model
    was_training = model.training
    model.eval()
    # the one draw from the global RNG that a fresh DataLoader iterator took in earlier
    # versions (make_val_loader): a seed gives the numbers it gave before
    torch.empty((), dtype=torch.int64).random_()
    # summed on the device in float64 (what a Python float sum of the batch losses gives),
    # read once: a read per batch would stall the GPU at every batch
    total, n = torch.zeros((), dtype=torch.float64, device=tr.device), 0
    for audio, rows, clips in loader:
        with inference_autocast(tr.device, amp):
            audio_emb, text_emb = model(audio.to(tr.device, non_blocking=True),
                                        rows.to(tr.device, non_blocking=True))
        total += tr.criterion(audio_emb.float(), text_emb.float(),
                              clips.to(tr.device, non_blocking=True)).double()
        n += 1
    model.train(was_training)
    return total.item() / max(n, 1)


def validate(tr: Trainer, cfg: dict, tid2row: dict, val_loader: DataLoader,
             clip_loader: DataLoader | None = None) -> dict:
    """{val_loss, val_t2a_mAP@10, val_t2a_R@1, val_t2a_R@5, val_t2a_R@10} on data.val_split.
    `clip_loader`: make_val_clip_loader's, kept for the run (else the clips are read here)."""
    # Validation's batches come in ~80 lengths for Clotho's validation split (its clips, ~33
    # batches of similar length, and the loss's batches, each padded to its longest clip): with
    # the autotuner that fit() turns on for padded or cropped training, every one would be
    # timed anew (on an H200 a training step paid ~4 s for each new length: the README's
    # lengths table, padded to x16)
    with cudnn_autotuner(False):
        return _validate(tr, cfg, tid2row, val_loader, clip_loader)


@contextlib.contextmanager
def cudnn_autotuner(on: bool):
    """cudnn.benchmark set to `on` for the block, then as it was (a notebook that trains and
    then scores keeps its own setting)."""
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was


def _validate(tr: Trainer, cfg: dict, tid2row: dict, val_loader: DataLoader,
              clip_loader: DataLoader | None) -> dict:
    val_loss = validation_loss(tr, val_loader, cfg["eval"]["amp"])
    if clip_loader is not None:
        # a loader made for this pass draws once from the global RNG as it starts, a kept one
        # does not: drawn here, runs validated either way (resumed ones too) keep the same
        # random streams, so the same numbers
        torch.empty((), dtype=torch.int64).random_()
    emb = encode_split(tr.model, features_dir(cfg), cfg["data"]["val_split"], tid2row,
                       cfg["eval"]["batch_size"], tr.device, 0, cfg["eval"]["amp"], clip_loader)
    if not (np.isfinite(emb.audio).all() and np.isfinite(emb.text).all()):
        raise UserError(f"validation ({cfg['data']['val_split']}): the model gives NaN/inf "
                        "embeddings; check the validation log-mels or lower training.lr")
    metrics = retrieval_metrics(emb.text @ emb.audio.T, relevance(emb))  # [Q, C]
    return {"val_loss": val_loss, **{f"val_t2a_{k}": v for k, v in metrics.items()}}


# --------------------------------------------------------------------------- the run

@dataclass
class FitResult:
    run_dir: Path
    epochs_done: int
    best_epoch: int
    best_metric: float | None
    monitor: str
    stopped_early: bool
    written: list[Path]
    checksum: str


def use_compile(cfg: dict, device: torch.device, world_size: int = 1) -> bool:
    """training.compile: auto = on for CUDA, off on the CPU (compiling there takes longer than
    it saves); on = on anywhere. Whole clips get one graph with a symbolic time axis
    (utils.compiling), padded or cropped ones a graph for each of their few lengths. On an H200
    the compiled whole-clip epoch took 17.9 s against 25.5 s eager, for ~40 s of compiling in
    the first (README, Speed). `auto` leaves SyncBatchNorm under DDP eager: the compiler breaks
    its graph at each of CNN14's 13 BatchNorm layers (pytorch#161302), a speed nobody has
    measured."""
    t = cfg["training"]
    synced = t["sync_batchnorm"] and world_size > 1
    return t["compile"] == "on" or (t["compile"] == "auto" and device.type == "cuda" and not synced)


def few_lengths(cfg: dict) -> bool:
    """Training batches come in a few lengths: padded to a multiple, or cropped."""
    t = cfg["training"]
    return t["pad_to_multiple"] > 0 or t["max_frames"] > 0


def cudnn_benchmark(cfg: dict, device: torch.device) -> bool:
    """cuDNN's autotuner times every kernel for each new input shape: worth it only when a run
    has few shapes (cropped clips, or lengths padded to a multiple), not for whole clips of
    hundreds of different lengths, where each new length would be tuned anew. For the training
    pass only: validation runs whole clips (validate)."""
    return device.type == "cuda" and few_lengths(cfg)


def wrap_for_training(tr: Trainer, cfg: dict, ctx: DistContext, device: torch.device) -> None:
    """tr.train_model = the model, in DDP under torchrun, compiled if training.compile says so.

    Only the training forward is compiled (see use_compile); validation and scoring use the
    plain module (the same weights).
    """
    if ctx.enabled and cfg["training"]["sync_batchnorm"]:
        # in place: the same parameters and buffers, so the optimizer and checkpoints are unchanged
        tr.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(tr.model)
    model = tr.model
    if ctx.enabled:
        model = wrap_ddp(model, device)  # BatchNorm running stats: synced per epoch (sync_buffers)
    tr.plain_train_model = model
    tr.compiled = use_compile(cfg, device, ctx.world_size)
    tr.train_model = model
    if not tr.compiled:
        return
    # one graph per padded length: allow them all (dynamo's default is 8)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    tr.symbolic_time = not few_lengths(cfg)
    if tr.symbolic_time:
        try:
            allow_symbolic_time()
        except RuntimeError as e:
            tqdm.write(f"warning: {e}; training continues without torch.compile")
            tr.compiled = tr.symbolic_time = False
            return
    tr.train_model = torch.compile(model, options=SYMBOLIC_TIME_OPTIONS if tr.symbolic_time else None)


def compile_note(tr: Trainer) -> str:
    """What the first compiled step is doing, said before it starts."""
    what = ("one graph for every clip length, built at the first step: ~45 s on an H200"
            if tr.symbolic_time else "a graph for each padded or cropped length, built as each "
            "first comes: ~30 s each on an H200")
    return (f"compiling the training step with torch.compile ({what}, once per run; "
            "training.compile=off trains without)")


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process (a new clip length must not add one)."""
    from torch._dynamo.utils import counters  # internal, but the only count there is

    return int(counters["stats"]["unique_graphs"])


def fit(cfg: dict, run_dir: Path, data: TrainingData, ctx: DistContext, device: torch.device,
        resume_state: dict | None = None) -> FitResult:
    """Train epochs `resume_state['epoch'] + 1 .. training.epochs` (all of them for a new run)."""
    with cudnn_autotuner(cudnn_benchmark(cfg, device)):
        return _fit(cfg, run_dir, data, ctx, device, resume_state)


def _fit(cfg: dict, run_dir: Path, data: TrainingData, ctx: DistContext, device: torch.device,
         resume_state: dict | None) -> FitResult:
    t = cfg["training"]
    seed_everything(cfg["seed"] + ctx.rank)
    tr = build_trainer(cfg, data.table, device, fresh=resume_state is None)
    tr.caption_probe = caption_probe(data.table, data.tid2row, read_text_digests(data.embeddings_path))
    if resume_state is not None:
        restore(tr, resume_state, checkpoint_path(run_dir, "last"))
        restore_rng_of_rank(resume_state, ctx, cfg, device)
    first_epoch = tr.epoch  # what this process writes is what it trained after that
    wrap_for_training(tr, cfg, ctx, device)
    loader, seeding = make_train_loader(data.train_set, cfg, device, ctx)
    val_loader = make_val_loader(data.val_set, t["batch_size"], cfg["seed"], t["num_workers"], device)
    val_clip_loader = make_val_clip_loader(cfg, device) if ctx.is_master else None  # rank 0 validates
    val_clips = data.val_set.caption_clip[val_loader.dataset.indices]  # [Q] in the loader's order
    note = zero_loss_batch_note(cfg, len(data.train_set), val_clips, ctx.world_size)
    if note is not None and ctx.is_master:
        print(f"note: {note}", file=sys.stderr)
    # wandb steps count training captions seen, so they keep increasing across resumes
    monitor, patience = t["monitor"], t["early_stopping"]
    last, best = checkpoint_path(run_dir, "last"), checkpoint_path(run_dir, "best")
    stopped_early = patience > 0 and tr.epoch - tr.best_epoch >= patience and tr.epoch > 0
    writer = CheckpointWriter()
    tracker = Tracker(cfg, run_dir, samples_per_epoch=len(data.train_set)) if ctx.is_master else None
    summarized = False
    try:
        if tracker is not None:
            # drop records of an epoch that finished after the checkpoint; log to wandb the
            # checkpointed epochs that no earlier wandb segment holds
            tracker.rewind(tr.epoch)
        for epoch in range(tr.epoch + 1, t["epochs"] + 1):
            if stopped_early:
                break
            start, eager_before = time.time(), tr.eager_steps
            seeding.set_epoch(epoch)
            # a failed write stops a single process at once; under DDP it stops every rank
            # together at the next checkpoint (rank 0 alone must not leave the collectives)
            stats = train_one_epoch(tr, loader, epoch, ctx, t["log_every"],
                                    tracker.log_train if tracker is not None else None,
                                    None if ctx.enabled else writer.check)
            sync_buffers(tr.model, ctx)
            lr = tr.lr
            record = on_master(ctx, lambda: validate(tr, cfg, data.tid2row, val_loader, val_clip_loader))
            tr.scheduler.step(record["val_loss"])
            tr.epoch = epoch
            is_best = improved(monitor, record[monitor], tr.best_metric)
            if is_best:
                tr.best_metric, tr.best_epoch = float(record[monitor]), epoch
            record = {"epoch": epoch, "train_loss": stats.loss, **record, "lr": lr,
                      "seconds": time.time() - start, "train_seconds": stats.seconds,
                      "data_wait_seconds": stats.data_wait}
            if tr.compiled:
                record["compiled_graphs"] = compiled_graphs()
            if tr.symbolic_time:  # this epoch's steps the graph did not fit
                record["eager_steps"] = tr.eager_steps - eager_before
            rng_states = gather_objects(rng_state(device), ctx)  # every rank's, for an exact resume
            on_master(ctx, lambda: _end_of_epoch(tr, cfg, tracker, record, is_best, best, last, rng_states,
                                                 writer))
            if patience > 0 and epoch - tr.best_epoch >= patience:
                stopped_early = True
                if ctx.is_master:
                    tqdm.write(f"early stopping: {monitor} has not improved for {patience} epochs "
                               f"(best {tr.best_metric:.4f} at epoch {tr.best_epoch})")
            raise_if_stopped()  # a Ctrl-C that Python dropped (errors.stop) during validation
        on_master(ctx, writer.wait)  # the last checkpoint is on disk before the run says done
        checksum = weights_checksum(tr.model, ctx)
        if tracker is not None:
            tracker.summarize_best(tr.best_epoch, {f"best_{monitor}": tr.best_metric,
                                                   "stopped_early": stopped_early})
            summarized = True
    finally:
        writer.close()  # a write under way is finished, whatever stopped the run
        if tracker is not None:
            if not summarized and tr.best_epoch > 0:
                # stopped (Ctrl-C, a time limit, an error): the summary is still the best
                # epoch's, not the last one's, for a sweep that ranks runs by it
                with contextlib.suppress(Exception):  # the error under way is the one to report
                    tracker.summarize_best(tr.best_epoch, {f"best_{monitor}": tr.best_metric})
            tracker.finish()
    # "wrote" only what this process wrote: a resumed run whose epochs did not beat the best
    # left best.pt as it was, and its config.yaml is main.py's business
    names = (run_dir / CONFIG_NAME if resume_state is None else None,
             last if tr.epoch > first_epoch else None, best if tr.best_epoch > first_epoch else None,
             tracker.jsonl if tracker and tr.epoch > first_epoch else None)
    written = [p for p in names if p is not None and p.exists()]
    return FitResult(run_dir, tr.epoch, tr.best_epoch, tr.best_metric, monitor, stopped_early,
                     written, checksum)


def _end_of_epoch(tr: Trainer, cfg: dict, tracker: Tracker, record: dict, is_best: bool,
                  best: Path, last: Path, rng_states: list[dict], writer: CheckpointWriter) -> None:
    """Log, then `best`, then `last`: whatever moment a kill comes, resuming from `last`
    redoes exactly the epochs whose records or `best` weights might not have been written.

    The checkpoint is copied off the GPU here (a fraction of a second) and written to disk in
    the background while the next epoch trains: one file, which `best` shares as a hard link.
    """
    tracker.log_epoch(record)
    state = writer.snapshot(checkpoint_dict(tr, cfg, rng_states))
    writer.submit(f"the checkpoint of epoch {record['epoch']} ({last})", save_checkpoint,
                  last, state, copies=[best] if is_best else [])
    tqdm.write(format_epoch(record, cfg["training"]["epochs"], is_best))


def format_epoch(r: dict, epochs: int, is_best: bool) -> str:
    return (f"epoch {r['epoch']}/{epochs}  train_loss {r['train_loss']:.4f}  val_loss "
            f"{r['val_loss']:.4f}  t2a mAP@10 {r['val_t2a_mAP@10']:.4f}  R@1 {r['val_t2a_R@1']:.4f}  "
            f"R@5 {r['val_t2a_R@5']:.4f}  R@10 {r['val_t2a_R@10']:.4f}  lr {r['lr']:.2e}  "
            f"{r['seconds']:.1f}s"
            + ("  *best" if is_best else ""))


# --------------------------------------------------------------------------- trained runs

def load_trained_model(run_dir: str | Path, which: str = "best", device="cpu", overrides=()
                       ) -> tuple[torch.nn.Module, dict, dict]:
    """A trained run's model in eval mode, its config, and the tid -> table-row mapping.

    The config is read back from the run directory (plus `overrides`, e.g. a moved
    paths.features_dir); the caption table is rebuilt from its `text_encoder.embeddings` file.
    """
    run_dir = require_run_dir(run_dir)
    cfg, saved = load_run_config(run_dir, overrides), load_run_config(run_dir)
    refuse_feature_overrides(run_dir, cfg, saved)
    check_features_found(cfg, run_dir)
    path = checkpoint_path(run_dir, which)
    if not path.is_file():
        raise UserError(f"{run_dir}: no checkpoint — train with main.py (looked for {path})")
    state = load_checkpoint(path)
    table, tid2row = load_text_table(features_dir(cfg), cfg["text_encoder"]["embeddings"])
    embeddings_path = features_dir(cfg) / cfg["text_encoder"]["embeddings"]
    rerun = step_03_for_run(run_dir, cfg, saved)
    check_sentence_model(embeddings_path, cfg["sbert"]["model"], rerun)
    if "text_embed_dim" in state:
        check_text_dim(state, path, table, embeddings_path)
    check_caption_probe(state, path, table, tid2row, embeddings_path, rerun)
    # the checkpoint's weights replace the random init: the caller's random stream is left as it was
    with torch.random.fork_rng(devices=[]):
        model = build_model(_random_init(cfg), text_in_dim=table.shape[1], table=table)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        model_sets = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in FROZEN_ON_RESUME]
        given = f" with --set {' '.join(model_sets)}" if model_sets else ""
        raise UserError(f"{path}: does not fit the model of {run_dir / CONFIG_NAME}{given} "
                        f"({_mismatch_text(model, state['model'], e)})") from None
    return model.to(device).eval(), cfg, tid2row


def _mismatch_text(model: torch.nn.Module, weights, error: Exception) -> str:
    """Which tensors differ (names, shapes): torch's first line says only "Error(s) in loading
    state_dict for DualEncoderModel:", the details follow on lines a one-line error drops."""
    problems = describe_mismatch(model, weights) if isinstance(weights, dict) else []
    return "; ".join(problems[:3]) if problems else str(error).strip().splitlines()[0][:200]
