"""Ask a trained run: the clips that match a text, or the captions that match a clip.

    python postprocessing/query.py "a dog barks in the rain"                 # clips of a split
    python postprocessing/query.py --folder my_recordings/ "a dog barks"     # your own audio
    python postprocessing/query.py --queries queries.txt --json              # one query per line
    python postprocessing/query.py --audio my_recordings/garden.wav          # captions of a split
    python postprocessing/query.py --html out.html "a dog barks"             # ... and a page with players

--run DIR (or a run's name in paths.output_dir) picks the run (default: the one trained last
in paths.output_dir of --conf); with --run DIR the command works from any directory. The checkpoint is the run's eval.checkpoint (`best`), on
eval.device. A split's clip embeddings are cached in <run>/cache/ and a folder's in
<run>/cache/folders/, keyed on the checkpoint's content, eval.amp and what the clips were
computed from: a split's log-mel file (rewritten by preprocessing 02 when a wav changes), or a
folder's files by name, size and modification time. The Python API behind this is
models.retrieval.Retriever.
"""
import sys
from pathlib import Path

import utils.cli
from models.retrieval import Retriever, results_json
from utils import report
from utils.errors import UserError
from utils.runs import load_run_config


def read_queries(path: str) -> list[str]:
    """One query per line (blank lines skipped); `-` reads standard input."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{path}: queries file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file (one query per line)") from None
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise UserError(f"{path}: no queries in it (one query per line)")
    return queries


def print_table(searched: str, queries: list[str], results: list) -> None:
    """One block per query: rank, score, clip (and the caption, for audio queries)."""
    for query, hits in zip(queries, results):
        print(f"\ntop {len(hits)} of {searched} for: {query}")
        for h in hits:
            line = f"{h.rank:>3}  {h.score:+.4f}  {h.fname}"
            print(line if h.caption is None else f"{line}  {h.caption}")


def main():
    parser = utils.cli.make_parser(__doc__)
    parser.add_argument("text", nargs="*", help="the text to search for (quotes optional)")
    utils.cli.add_run_argument(parser)
    parser.add_argument("--queries", metavar="FILE", help="search each line of FILE (- = stdin)")
    parser.add_argument("--audio", nargs="+", metavar="FILE",
                        help="find the captions of these audio files")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--split", help="split to search (default: the last of the run's "
                                       "eval.splits, evaluation for Clotho)")
    where.add_argument("--folder", metavar="DIR", help="search the .wav/.flac files of DIR instead")
    parser.add_argument("--top-k", type=int, help="results per query (default: the run's eval.top_k, 10)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--html", metavar="OUT.html",
                        help="also write the results as a page with a player per clip (the clips "
                             "go to OUT_audio/ beside it, or are linked: eval.report.audio)")
    # --conf is only read to find the run: with --run DIR it may be absent (any directory)
    args, run_dir, overrides, _ = utils.cli.parse_run(parser)
    text = " ".join(args.text).strip()
    asked = [name for name, given in (("TEXT", args.text), ("--queries", args.queries),
                                      ("--audio", args.audio)) if given]
    if len(asked) > 1:
        raise UserError(f"give one of TEXT, --queries FILE or --audio FILE (got {' and '.join(asked)})")
    if args.audio and args.folder:
        raise UserError("--audio finds captions of a split; --folder only applies to text queries")
    for path in args.audio or ():
        if Path(path).is_dir():  # else it reads as a missing file, which it is not
            raise UserError(f"--audio takes audio files, and {path} is a folder; to search the "
                            f"clips of a folder for a text, give --folder {path} \"TEXT\"")
    if not asked or (args.text and not text):
        raise UserError("the query is empty: pass the text to search for, e.g. \"a dog barks\" "
                        "(or --queries FILE, or --audio FILE)")
    if args.top_k is not None and args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.html:
        report.check_query_page_target(args.html, [*(args.audio or ()), *filter(None, [args.queries])],
                                       args.folder)
    queries = read_queries(args.queries) if args.queries else args.audio or [text]
    if len(args.text) > 1 and any(" " in a.strip() for a in args.text):
        # several quoted phrases: the words are one query (quotes are optional), not several
        print(f"note: the {len(args.text)} arguments are searched as one query: {text!r}; "
              "for several queries, put one a line in a file and pass --queries FILE",
              file=sys.stderr)

    # progress to stderr with --json, so that stdout is one JSON document
    out = sys.stderr if args.json else sys.stdout
    retriever = Retriever.from_run(run_dir, overrides=overrides,
                                   which=load_run_config(run_dir, overrides)["eval"]["checkpoint"],
                                   log=lambda message: print(message, file=out))
    top_k = args.top_k or retriever.cfg["eval"]["top_k"]
    about = retriever.describe()
    print(f"run {about['run']} · checkpoint {about['checkpoint']} (epoch {about['epoch']}, "
          f"sha1 {about['checkpoint_sha1'][:10]}) · {about['device']}", file=out)
    skipped = []
    if args.audio:
        index = retriever.caption_index(args.split)
        results = retriever.captions_for(queries, top_k, split=args.split)
        what = f"{len(index.captions)} {index.split} captions"
    else:
        index = retriever.clip_index(args.split, args.folder)
        results = retriever.search(queries, top_k, split=args.split, folder=args.folder)
        what = f"{len(index.fnames)} clips of {index.source}"
        skipped = index.skipped
        for name, why in skipped:
            print(f"skipped {name}: {why}", file=out)
    if args.json:
        print(results_json(retriever, what, queries, results, skipped, retriever.notes))
    else:
        print_table(what, queries, results)
    if args.html:
        # a split's clips are shown with their first caption, as in the report
        known = retriever.first_captions(args.split) if not args.audio and not args.folder else None
        page = report.write_query_results(
            args.html, queries, results, audio_queries=bool(args.audio), clip_captions=known,
            audio=retriever.cfg["eval"]["report"]["audio"],
            subtitle=f"run {Path(about['run']).name} · checkpoint {about['checkpoint']} (epoch {about['epoch']}) "
                     f"· {what}")
        print(f"wrote {page}", file=out)


if __name__ == "__main__":
    utils.cli.run(main)
