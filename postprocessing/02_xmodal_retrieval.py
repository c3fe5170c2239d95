"""Retrieval metrics of a run from its scores.db: text->audio and audio->text mAP@10, R@1/5/10
(and a2t R@k_any, mean/median rank), and the run's retrieval report.

Writes <run>/metrics.json (per split "t2a"/"a2t" metrics, chance, ranks, counts; definitions,
provenance), <run>/{split}.t2a_retrieval.csv (caption + top-10 file names),
<run>/{split}.t2a_ranks.csv (rank of each caption's own clip, also stored in the db table
t2a_ranks), figures in <run>/plots/, and <run>/report/index.html: the metrics, figures and
listening panels of sampled queries (eval.report.* in the config). Logs the numbers, a table of
every query per split, the listening sample with its audio, the rank histograms and the figures
to the run's wandb evaluation run.
"""
from pathlib import Path

import utils.cli
from utils import evaluation, provenance, report, scores_db
from utils.data_utils import check_features_found, check_split_prepared, features_dir, skipped_counts
from utils.errors import UserError
from utils.plots import plot_run_figures
from utils.runs import METRICS_JSON, SCORES_DB, checkpoint_path, load_run_config, lock_run
from utils.tracking import Tracker


def main():
    parser = utils.cli.make_parser(__doc__)
    utils.cli.add_run_argument(parser)
    args, run_dir, overrides, conf_cfg = utils.cli.parse_run(parser)
    with lock_run(run_dir):
        evaluate(run_dir, load_run_config(run_dir, overrides))
        provenance.record_invocation(run_dir, None, args.overrides, action="metrics",
                                     conf=args.conf if conf_cfg else None)


def evaluate(run_dir: Path, cfg: dict) -> None:
    which, top_k = cfg["eval"]["checkpoint"], cfg["eval"]["top_k"]
    opts = report.settings(cfg)
    ckpt = checkpoint_path(run_dir, which)
    if not ckpt.is_file():
        raise UserError(f"{run_dir}: no checkpoint — train with main.py (looked for {ckpt})")
    epoch = evaluation.checkpoint_epoch(ckpt)
    check_features_found(cfg, run_dir)  # else the db would look like another data's scores
    for split in cfg["eval"]["splits"]:  # a typo: named as such, not "run step 01" with it
        check_split_prepared(features_dir(cfg), split, cfg, "eval.splits")
    meta = scores_db.expected_meta(run_dir, cfg, which, ckpt, epoch)
    db_path = Path(run_dir) / SCORES_DB
    conn = scores_db.open_for_read(db_path, meta)
    results, samples, skipped, written = [], [], {}, []
    try:
        for split in cfg["eval"]["splits"]:
            s = scores_db.read_split(conn, split, db_path)
            r = evaluation.evaluate_split(s, top_k=top_k)
            results.append(r)
            scores_db.write_t2a_ranks(conn, split, r.ranks)
            written += evaluation.write_split_files(run_dir, s, r, top_k)
            samples.append(report.split_sample(s, r.ranks, r.top, cfg["paths"]["dataset_dir"], opts,
                                               a2t_ranks=r.a2t_ranks))
            # distinct clips: a clip can be listed by step 01 and again by step 02
            skipped[split] = skipped_counts(features_dir(cfg), [split])[split]["clips"]
    finally:
        scores_db.close(conn)
    doc = evaluation.metrics_document(
        results, evaluation.metrics_provenance(run_dir, meta, results, skipped,
                                               sbert_model=cfg["sbert"]["model"]), skipped)
    written.append(evaluation.write_metrics_json(Path(run_dir) / METRICS_JSON, doc))
    figures = plot_run_figures(run_dir, results, cfg=cfg)
    written += figures

    page = None
    if cfg["eval"]["report"]["enabled"]:
        page = report.write_report(run_dir, samples, doc, None, figures, opts,
                                   subtitle=f"checkpoint {which} (epoch {epoch}) · written "
                                            f"{report.now_text()}",
                                   tuned=report.tuning_notes(cfg))

    tracker = Tracker(cfg, run_dir, job_type="eval")
    try:
        # which checkpoint each row scored: a run evaluated again after a --resume has several
        flat = {**evaluation.flat_metrics(doc), "checkpoint_epoch": epoch}
        tracker.log(flat)
        tracker.summary({**flat, "checkpoint": which, "checkpoint_sha1": meta.get("checkpoint_sha1")})
        report.log_to_tracker(tracker, samples, page,
                              page.images if page else {p.stem: p for p in figures},
                              opts.clips_per_query)
    finally:
        tracker.finish()

    print(f"updated {db_path} (table t2a_ranks)")
    for path in written:
        print(f"wrote {path}")
    print(evaluation.format_table(doc))  # what a person looks for ...
    if page:  # ... and where to look next (`make demo` ends with this line)
        print(f"report: {page.path} ({report.format_size(page.size)}; open it in a browser)")
    elif (old := Path(run_dir) / report.REPORT_DIR / report.INDEX).is_file():
        print(f"note: {old} is an earlier run's page, left as it was (eval.report.enabled is false); "
              "it does not show these metrics")

if __name__ == "__main__":
    utils.cli.run(main)
