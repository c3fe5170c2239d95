"""Time postprocessing on a Clotho-evaluation-sized split with the library functions 01/02 use.

Random L2-normalised 300-d embeddings for `--clips` clips and `--captions-per-clip` captions
each -> score matrix (matmul) -> scores.db (write_split, then read back as 02 does) -> metrics in
both directions + recall curves + t2a ranks (ranks table in the db too) -> retrieval and rank
CSVs. Prints one line per stage and, last, one JSON line:
{"seconds_total", "seconds_scores", "seconds_sqlite", "seconds_sqlite_write",
 "seconds_sqlite_read", "seconds_metrics", "seconds_csv", "peak_rss_mb", "pairs", "db_mb",
 "cpu_seconds_total", "load_avg_1min"}.
On a busy machine wall time exceeds CPU time (SQLite work is single-threaded); both are shown.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from utils import evaluation, scores_db


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return kb / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def fake_split(n_clips: int, per_clip: int, dim: int, seed: int):
    """Embeddings where each caption is near its clip (so metrics are not trivially 0)."""
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((n_clips, dim)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    caption_clip = np.repeat(np.arange(n_clips), per_clip)
    text = audio[caption_clip] + rng.standard_normal((len(caption_clip), dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    fids = [uuid.UUID(int=int(i) + 1).hex for i in range(n_clips)]
    fnames = [f"clip_{i:05d}.wav" for i in range(n_clips)]
    tids = [uuid.UUID(int=(1 << 64) + i).hex for i in range(len(caption_clip))]
    captions = [f"caption {i} of clip {c}, 'quoted'; and so on" for i, c in enumerate(caption_clip)]
    return audio, text, fids, fnames, tids, captions, caption_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=1045)
    parser.add_argument("--captions-per-clip", type=int, default=5)
    parser.add_argument("--dim", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="directory to keep scores.db and the CSVs in (default: a temp dir)")
    args = parser.parse_args()

    audio, text, fids, fnames, tids, captions, caption_clip = fake_split(
        args.clips, args.captions_per_clip, args.dim, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        db = out / "scores.db"
        scores_db.remove_db(db)
        t0, cpu0 = time.perf_counter(), time.process_time()
        s = scores_db.ScoredSplit(split="evaluation", fids=fids, fnames=fnames, tids=tids,
                                  captions=captions, caption_clip=caption_clip,
                                  scores=evaluation.score_matrix(text, audio))
        t1 = time.perf_counter()
        meta = {"schema_version": scores_db.SCHEMA_VERSION, "run": "bench"}
        conn = scores_db.open_for_write(db, meta)
        scores_db.write_split(conn, s)
        t2 = time.perf_counter()
        back = scores_db.read_split(conn, "evaluation")
        t3 = time.perf_counter()
        assert np.array_equal(back.scores, s.scores), "scores.db does not round-trip the matrix"
        result = evaluation.evaluate_split(back)
        t4 = time.perf_counter()
        scores_db.write_t2a_ranks(conn, "evaluation", result.ranks)
        evaluation.write_split_files(out, back, result)
        scores_db.close(conn)
        t5, cpu = time.perf_counter(), time.process_time() - cpu0
        size = scores_db.db_size_mb(db)

    timings = {"scores": t1 - t0, "sqlite_write": t2 - t1, "sqlite_read": t3 - t2,
               "metrics": t4 - t3, "csv": t5 - t4}
    for name, sec in timings.items():
        print(f"{name:<13} {sec:7.2f} s")
    print(evaluation.format_table({"evaluation": result.metrics}))
    print(json.dumps({
        "seconds_total": round(t5 - t0, 3), "seconds_scores": round(t1 - t0, 3),
        "seconds_sqlite": round(t3 - t1, 3), "seconds_sqlite_write": round(t2 - t1, 3),
        "seconds_sqlite_read": round(t3 - t2, 3), "seconds_metrics": round(t4 - t3, 3),
        "seconds_csv": round(t5 - t4, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
        "pairs": int(s.scores.size), "db_mb": round(size, 1),
        "cpu_seconds_total": round(cpu, 3), "load_avg_1min": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
