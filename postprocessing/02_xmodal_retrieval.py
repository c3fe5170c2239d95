"""Retrieval metrics of a run from its scores.db: text->audio and audio->text mAP@10, R@1/5/10.

Writes <run>/metrics.json ({split: {"t2a": {...}, "a2t": {...}}}), <run>/{split}.t2a_retrieval.csv
(caption + top-10 file names), <run>/{split}.t2a_ranks.csv (rank of each caption's own clip,
also stored in the db table t2a_ranks), plots in <run>/plots/, and logs the numbers to the
run's own wandb run.
"""
from pathlib import Path

import utils.cli
from utils import evaluation, scores_db
from utils.errors import UserError
from utils.plots import plot_recall_curves, plot_training_curves
from utils.runs import (METRICS_JSON, METRICS_JSONL, SCORES_DB, checkpoint_path, load_run_config,
                        resolve_run_dir)
from utils.tracking import Tracker


def main():
    parser = utils.cli.make_parser(__doc__)
    parser.add_argument("--run", help="run directory (default: the newest in paths.output_dir)")
    args, cfg = utils.cli.parse(parser)
    run_dir = resolve_run_dir(args.run, cfg)
    cfg = load_run_config(run_dir, args.overrides)
    which, top_k = cfg["eval"]["checkpoint"], cfg["eval"]["top_k"]
    ckpt = checkpoint_path(run_dir, which)
    if not ckpt.is_file():
        raise UserError(f"{run_dir}: no checkpoint — train with main.py (looked for {ckpt})")
    meta = scores_db.expected_meta(run_dir, cfg, which, ckpt, evaluation.checkpoint_epoch(ckpt))
    db_path = Path(run_dir) / SCORES_DB
    conn = scores_db.open_for_read(db_path, meta)
    metrics, chance, curves, written = {}, {}, {}, []
    try:
        for split in cfg["eval"]["splits"]:
            s = scores_db.read_split(conn, split, db_path)
            r = evaluation.evaluate_split(s, top_k=top_k)
            metrics[split], curves[split] = r.metrics, r.curves
            chance[split] = evaluation.split_chance(s)
            scores_db.write_t2a_ranks(conn, split, r.ranks)
            written += evaluation.write_split_files(run_dir, s, r, top_k)
    finally:
        scores_db.close(conn)
    written.append(evaluation.write_metrics_json(Path(run_dir) / METRICS_JSON, metrics))

    plots = Path(run_dir) / "plots"
    if (Path(run_dir) / METRICS_JSONL).is_file():
        written.append(plot_training_curves(Path(run_dir) / METRICS_JSONL, plots / "training_curves.png"))
    written.append(plot_recall_curves(curves, plots / "recall_at_k.png"))

    tracker = Tracker(cfg, run_dir, job_type="eval")
    flat = evaluation.flat_metrics(metrics)
    tracker.log(flat)
    tracker.summary(flat)
    tracker.finish()

    print(f"updated {db_path} (table t2a_ranks)")
    for path in written:
        print(f"wrote {path}")
    print(evaluation.format_table(metrics, chance))  # last: what a person looks for


if __name__ == "__main__":
    utils.cli.run(main)
