"""Score every (clip, caption) pair of the evaluation splits with a trained run -> <run>/scores.db.

Each clip and each caption is encoded once (batched, GPU when present); scores[caption, clip] =
text . audio (both L2-normalised). One transaction per split: a rerun replaces a split whole.
A scores.db written by another run, config or checkpoint is refused (remove it or --overwrite).
Clip embeddings are also cached in <run>/cache/ for postprocessing/query.py.
"""
from pathlib import Path

import utils.cli
from utils import evaluation, scores_db
from utils.data_utils import encode_split, features_dir
from utils.runs import SCORES_DB, checkpoint_path, load_run_config, resolve_run_dir
from utils.train_utils import load_trained_model
from utils.devices import resolve_device


def main():
    parser = utils.cli.make_parser(__doc__)
    parser.add_argument("--run", help="run directory (default: the newest in paths.output_dir)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing scores.db, whoever wrote it")
    args, cfg = utils.cli.parse(parser)
    run_dir = resolve_run_dir(args.run, cfg)
    cfg = load_run_config(run_dir, args.overrides)
    which = cfg["eval"]["checkpoint"]
    device = resolve_device(cfg["eval"].get("device", "auto"), "eval.device")
    ckpt = checkpoint_path(run_dir, which)
    model, cfg, tid2row = load_trained_model(run_dir, which, device, args.overrides)
    meta = scores_db.expected_meta(run_dir, cfg, which, ckpt, evaluation.checkpoint_epoch(ckpt))
    db_path = Path(run_dir) / SCORES_DB
    conn = scores_db.open_for_write(db_path, meta, overwrite=args.overwrite)
    written = []
    try:
        for split in cfg["eval"]["splits"]:
            emb = encode_split(model, features_dir(cfg), split, tid2row,
                               cfg["eval"]["batch_size"], device, amp=cfg["eval"]["amp"])
            s = evaluation.scored_split(emb)
            print(f"{split}: {len(s.fids)} clips x {len(s.tids)} captions = {s.scores.size} pairs")
            scores_db.write_split(conn, s, progress=True)
            cache = evaluation.save_clip_cache(run_dir, split, emb.fnames, emb.fids, emb.audio,
                                               meta["checkpoint_sha1"])
            written.append(cache)
    finally:
        scores_db.close(conn)
    print(f"wrote {db_path} ({scores_db.db_size_mb(db_path):.1f} MB; splits "
          f"{', '.join(cfg['eval']['splits'])}; checkpoint {which}, epoch {meta['checkpoint_epoch']})")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    utils.cli.run(main)
