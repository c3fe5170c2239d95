"""Train the CNN14 + Sentence-BERT dual encoder with InfoNCE (DCASE 2023 Task 6B baseline).

New run:   python main.py [--conf conf.yaml] [--set key=value ...] [--name NAME]
Import:    python main.py --import-baseline CHECKPOINT [--name NAME]   (the released DCASE 2023
           baseline, Zenodo 10.5281/zenodo.7752975, as a run folder to evaluate; no training)
Resume:    python main.py --resume outputs/<run> [--set training.epochs=100 ...]
Multi-GPU: torchrun --nproc_per_node=N main.py ...   (training.batch_size is the global batch)

Writes <paths.output_dir>/<run>/: config.yaml, checkpoints/{best,last}.pt, metrics.jsonl and
the wandb run. A run stopped at any moment (Ctrl-C, kill, crash) continues with --resume from
its last finished epoch.
"""
import contextlib
import sys
from pathlib import Path

from utils import baseline_release, cli, dist_utils, provenance, train_utils
from utils.config import flat_config, load_config, load_run_config, save_config
from utils.errors import UserError
from utils.io_utils import atomic_write_text
from utils.runs import checkpoint_path, lock_run, new_run_dir, remove_unstarted_run


def main() -> None:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from checkpoints/last.pt")
    parser.add_argument("--name", help="run directory name (default: <experiment>-<timestamp>)")
    parser.add_argument("--run-file", metavar="FILE",
                        help="write the run's folder to FILE once it exists, for a job script to "
                             "pass to --run (the newest run may be another job's)")
    parser.add_argument("--import-baseline", metavar="CHECKPOINT",
                        help="make a run of the released DCASE 2023 baseline checkpoint instead of training")
    args = parser.parse_args()
    if args.resume and args.name:
        parser.error("--name names a new run; it cannot be combined with --resume")
    if args.import_baseline:
        if args.resume:
            parser.error("--import-baseline makes a new run; it cannot be combined with --resume")
        return _import_baseline(args)
    cfg = _resume_config(args, parser) if args.resume else load_config(args.conf, args.overrides)
    train_utils.check_training_config(cfg)
    cli.print_config_if_asked(args, cfg)  # --print-config: the resolved config, nothing else done

    with contextlib.ExitStack() as held, \
            dist_utils.distributed(cfg["training"]["device"]) as (ctx, device):
        trained = _train(args, cfg, ctx, device, held)
    if ctx.is_master and trained is not None:
        _print_result(args, cfg, ctx, *trained)


def _resume_config(args, parser) -> dict:
    """The run's own config.yaml with --set applied; `args.resume` becomes the run's folder (it
    may be given as a run's name in --conf's paths.output_dir, as run.sh passes it)."""
    args.resume = str(cli.find_run(args.resume, args.conf, args.overrides,
                                   conf_given=args.conf != parser.get_default("conf"))[0])
    baseline_release.refuse_resume(args.resume)  # an imported run has no training state
    cfg = train_utils.resume_config(args.resume, args.overrides)
    if any(a == "--conf" or a.startswith("--conf=") for a in sys.argv[1:]):
        _note_conf_not_read(args.conf, args.overrides, args.resume, cfg)
    return cfg


def _train(args, cfg: dict, ctx, device, held: contextlib.ExitStack):
    """Train a new run or go on with `args.resume`: (run folder, FitResult), or None when a
    resumed run has nothing left to train."""
    # One process per run, locked before the checkpoint is read: a second --resume is refused
    # (on every rank) instead of training on from a state the first one is about to replace,
    # or removing its half-written checkpoint as a killed run's
    if args.resume:
        dist_utils.on_master(ctx, lambda: train_utils.claim_run(args.resume, held))
    state = train_utils.read_resume_checkpoint(args.resume) if args.resume else None
    data = train_utils.load_training_data(cfg, args.resume)
    if state is not None:
        ckpt = checkpoint_path(args.resume, "last")
        train_utils.check_resume_checkpoint(state, ckpt, cfg)
        train_utils.check_text_dim(state, ckpt, data.table, data.embeddings_path)
        train_utils.check_caption_probe(state, ckpt, data.table, data.tid2row, data.embeddings_path,
                                        train_utils.step_03_for_run(Path(args.resume), cfg))
        if state["epoch"] >= cfg["training"]["epochs"]:
            if ctx.is_master:
                print(f"nothing to train: {args.resume} has finished {state['epoch']} epochs of "
                      f"training.epochs={cfg['training']['epochs']}; train on with --set "
                      f"training.epochs=N (N > {state['epoch']})")
            return None
    if args.resume:
        run_dir = Path(args.resume)
        if args.overrides:
            # as given: paths resolved for this working directory are not the run's
            dist_utils.on_master(ctx, lambda: save_config(load_run_config(run_dir, args.overrides),
                                                          run_dir))
    else:
        run_dir = dist_utils.on_master(ctx, lambda: _new_run(cfg, args.name, held))
    cli.advise_resume(run_dir)  # Ctrl-C from here on prints the exact --resume command
    if args.run_file:
        dist_utils.on_master(ctx, lambda: atomic_write_text(args.run_file, f"{run_dir.resolve()}\n"))
    try:
        # provenance.json: command line, overrides, cwd, git commit, package versions, hardware,
        # and the data by content (sha1 of the embeddings and of the splits' files)
        dist_utils.on_master(ctx, lambda: provenance.record_invocation(
            run_dir, device, args.overrides, action="resume" if args.resume else "new",
            conf=None if args.resume else args.conf, world_size=ctx.world_size,
            data=provenance.training_data(cfg)))
        if ctx.is_master:
            start = f"resuming after epoch {state['epoch']}" if state else "starting"
            print(f"{start}: {run_dir} on {device}"
                  + (f" x {ctx.world_size} processes" if ctx.enabled else ""), flush=True)
        return run_dir, train_utils.fit(cfg, run_dir, data, ctx, device, state)
    except BaseException:
        # a new run stopped before its first checkpoint (an error, Ctrl-C) leaves no folder
        # behind to block its --name or to pass for a run
        if not args.resume and ctx.is_master and remove_unstarted_run(run_dir):
            cli.set_interrupt_advice(f"no epoch had finished, so nothing is kept ({run_dir} removed)")
        raise


def _print_result(args, cfg: dict, ctx, run_dir: Path, result) -> None:
    best = f"{result.monitor} {result.best_metric:.4f} at epoch {result.best_epoch}" \
        if result.best_metric is not None else "no epoch finished"
    print(f"trained {result.epochs_done}/{cfg['training']['epochs']} epochs"
          + (" (stopped early)" if result.stopped_early else "") + f"; best {best}")
    if ctx.enabled:
        print(f"DDP: weights identical on {ctx.world_size} ranks (checksum {result.checksum})")
    saved = [run_dir / "config.yaml"] if args.resume and args.overrides else []
    for path in saved + result.written:
        print(f"wrote {path}")


def _note_conf_not_read(conf: str, overrides: list[str], run_dir: str, cfg: dict) -> None:
    """A resumed run goes on with its own config.yaml (run.sh passes --conf to every stage).
    Keys that --conf sets otherwise are named, so that they do not look applied."""
    try:
        theirs = flat_config(load_config(conf, overrides))
    except UserError:
        return
    ours = flat_config(cfg)
    # keys training does not read (the demo generator, downloads, where runs go) are no news
    unread = ("demo.", "download.", "paths.output_dir", "paths.pretrained_dir")
    # "from": the value may come from a base file of --conf, not the file itself
    differ = [f"{k} ({theirs[k]!r} from {Path(conf).name}, {ours[k]!r} in the run)" for k in ours
              if theirs.get(k) != ours[k] and not k.startswith(unread)]
    if differ:
        print(f"note: --resume reads {Path(run_dir) / 'config.yaml'}, not {conf}, which gives "
              f"{', '.join(differ[:4])}{' and more' if len(differ) > 4 else ''}; change keys with --set",
              file=sys.stderr)


def _import_baseline(args) -> None:
    """A run folder from the released DCASE 2023 baseline checkpoint (no training)."""
    cfg = load_config(args.conf, args.overrides)
    cli.print_config_if_asked(args, cfg)
    run_dir, written = baseline_release.import_release(cfg, args.import_baseline, args.name)
    with lock_run(run_dir):
        written.append(provenance.record_invocation(run_dir, None, args.overrides, action="import",
                                                    conf=args.conf))
    print(f"imported {args.import_baseline} as run {run_dir}")
    for path in written:
        print(f"wrote {path}")


def _new_run(cfg: dict, name: str | None, held: contextlib.ExitStack) -> Path:
    run_dir = new_run_dir(cfg, name)
    try:
        held.enter_context(lock_run(run_dir))
        save_config(cfg, run_dir)
    except BaseException:
        remove_unstarted_run(run_dir)
        raise
    return run_dir


if __name__ == "__main__":
    cli.run(main)
