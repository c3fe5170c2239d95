"""Score every (clip, caption) pair of the evaluation splits with a trained run -> <run>/scores.db.

Each clip and each caption is encoded once (batched, GPU when present); scores[caption, clip] =
text . audio (both L2-normalised). One transaction per split: a rerun replaces a split whole.
An existing scores.db is added to only if it was computed from the same checkpoint (sha1),
caption embeddings and eval.amp; otherwise, or when it is damaged, it is refused (remove it or
--overwrite). Settings that do not change a score (training.epochs, demo sizes, the run
folder's name) do not matter.
--overwrite builds the new db beside the old one and swaps it in when complete: until then the
old one stays as it was. Clip embeddings are also cached in <run>/cache/ for query.py.
"""
import sys
from pathlib import Path

import numpy as np

import utils.cli  # before torch, which imports tqdm: utils sets a log file's bar interval first
from models.retrieval import split_cache_key
from utils import evaluation, provenance, scores_db
from utils.data_utils import (ClipDataset, SplitEmbeddings, check_split_prepared, damaged_hdf5_error,
                              encode_split, features_dir, logmel_path)
from utils.runs import CONFIG_NAME, SCORES_DB, checkpoint_path, load_run_config, lock_run
from utils.train_utils import load_trained_model
from utils.devices import resolve_device
from utils.features import check_definition

import torch  # after utils: see above


def first_nonfinite_clip(dataset_dir: Path, emb: SplitEmbeddings) -> int | None:
    """The first clip whose embedding AND log-mels hold NaN/inf, or None. Only clips with a
    non-finite embedding are read again, so a healthy split costs one isfinite over `[C, E]`."""
    suspects = np.flatnonzero(~np.isfinite(emb.audio).all(axis=1)).tolist()
    if not suspects:
        return None
    clips = ClipDataset(dataset_dir, emb.split, [emb.fids[i] for i in suspects])
    try:
        return next((i for k, i in enumerate(suspects)
                     if not torch.isfinite(clips[k][0]).all()), None)
    finally:
        clips.close()


def check_inputs_finite(dataset_dir: Path, emb: SplitEmbeddings) -> None:
    """Non-finite scores from non-finite log-mels are a damaged HDF5 (step 02 never writes
    NaN/inf), not a bad checkpoint: say so before write_split blames the model."""
    i = first_nonfinite_clip(dataset_dir, emb)
    if i is not None:
        raise damaged_hdf5_error(logmel_path(dataset_dir, emb.split),
                                 f"clip {emb.fnames[i]} (fid {emb.fids[i]}): its log-mels "
                                 "contain NaN/inf", data=True)


def main():
    parser = utils.cli.make_parser(__doc__)
    utils.cli.add_run_argument(parser)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing scores.db, whatever computed it (the old file "
                             "stays until the new one is complete)")
    args, run_dir, overrides, conf_cfg = utils.cli.parse_run(parser)
    with lock_run(run_dir):
        cfg = load_run_config(run_dir, overrides)
        which = cfg["eval"]["checkpoint"]
        device = resolve_device(cfg["eval"]["device"], "eval.device")
        ckpt = checkpoint_path(run_dir, which)
        model, cfg, tid2row = load_trained_model(run_dir, which, device, overrides)
        meta = scores_db.expected_meta(run_dir, cfg, which, ckpt, evaluation.checkpoint_epoch(ckpt))
        changed = provenance.changed_since_training(run_dir, meta)
        if changed:  # steps 01-03 were rerun after training: a note, the scores are still exact
            print(f"note: {', '.join(changed)} changed since {Path(run_dir).name} was trained "
                  "(provenance.json); the scores use the files as they are now", file=sys.stderr)
        db_path = Path(run_dir) / SCORES_DB
        # every split before any is encoded; against the run's saved settings, not a --set
        trained_on = load_run_config(run_dir)["features"]
        for split in cfg["eval"]["splits"]:
            check_split_prepared(features_dir(cfg), split, cfg, "eval.splits")
            check_definition(features_dir(cfg), split, trained_on, run_config=run_dir / CONFIG_NAME)
        written = []
        with scores_db.writing(db_path, meta, overwrite=args.overwrite) as conn:
            for split in cfg["eval"]["splits"]:
                # taken before encoding (a step 02 rerun meanwhile leaves a stale key), and the
                # one query.py / Retriever computes: they reuse these embeddings
                cache_key = split_cache_key(meta["checkpoint_sha1"], cfg, split, device)
                emb = encode_split(model, features_dir(cfg), split, tid2row,
                                   cfg["eval"]["batch_size"], device, amp=cfg["eval"]["amp"])
                check_inputs_finite(features_dir(cfg), emb)
                s = evaluation.scored_split(emb)
                print(f"{split}: {len(s.fids)} clips x {len(s.tids)} captions = {s.scores.size} pairs")
                if emb.skipped.clips:
                    print(emb.skipped.describe(split))
                scores_db.write_split(conn, s, progress=True,
                                      identity=meta[scores_db.SPLIT_KEY + split])
                written.append(evaluation.save_clip_cache(run_dir, split, emb.fnames, emb.fids,
                                                          emb.audio, cache_key))
        provenance.record_invocation(run_dir, device, args.overrides, action="scores",
                                     conf=args.conf if conf_cfg else None)
    print(f"wrote {db_path} ({scores_db.db_size_mb(db_path):.1f} MB; splits "
          f"{', '.join(cfg['eval']['splits'])}; checkpoint {which}, epoch {meta['checkpoint_epoch']})")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    utils.cli.run(main)
