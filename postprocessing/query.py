"""Free-text search: the top-k clips of a split for a caption you type, with their scores.

    python postprocessing/query.py --run DIR [--split evaluation] [--top-k 10] "a dog barks in the rain"

The query is embedded with the run's sbert.model and text encoder; the split's clip embeddings
are computed once and cached in <run>/cache/{split}_clip_embeds.npz (recomputed when the
checkpoint changes).
"""
import utils.cli
from utils import evaluation
from utils.data_utils import encode_split, features_dir
from utils.errors import UserError
from utils.runs import checkpoint_path, load_run_config, resolve_run_dir
from utils.train_utils import load_trained_model
from utils.devices import resolve_device


def main():
    parser = utils.cli.make_parser(__doc__)
    parser.add_argument("query", help="the text to search for")
    parser.add_argument("--run", help="run directory (default: the newest in paths.output_dir)")
    parser.add_argument("--split", default="evaluation", help="split to search (default: evaluation)")
    parser.add_argument("--top-k", type=int, default=10, help="clips to show (default: 10)")
    args, cfg = utils.cli.parse(parser)
    utils.cli.print_config_if_asked(args, load_run_config(resolve_run_dir(args.run, cfg), args.overrides))
    query = args.query.strip()
    if not query:
        raise UserError("the query is empty: pass the text to search for, e.g. \"a dog barks\"")
    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    run_dir = resolve_run_dir(args.run, cfg)
    cfg = load_run_config(run_dir, args.overrides)
    which = cfg["eval"]["checkpoint"]
    device = resolve_device(cfg["eval"].get("device", "auto"), "eval.device")
    model, cfg, tid2row = load_trained_model(run_dir, which, device, args.overrides)
    key = evaluation.checkpoint_key(checkpoint_path(run_dir, which))

    cached = evaluation.load_clip_cache(run_dir, args.split, key)
    if cached is None:
        emb = encode_split(model, features_dir(cfg), args.split, tid2row,
                           cfg["eval"]["batch_size"], device, amp=cfg["eval"]["amp"])
        path = evaluation.save_clip_cache(run_dir, args.split, emb.fnames, emb.fids, emb.audio, key)
        fnames, clip_embeds = emb.fnames, emb.audio
        print(f"cached {len(fnames)} clip embeddings in {path}")
    else:
        fnames, _, clip_embeds = cached
    text = evaluation.embed_texts(cfg, model, [query], device)
    idx, scores = evaluation.rank_clips(text, clip_embeds, args.top_k)
    print(f"top {idx.shape[1]} of {len(fnames)} {args.split} clips for: {query}")
    for rank, (j, score) in enumerate(zip(idx[0].tolist(), scores[0].tolist()), start=1):
        print(f"{rank:>3}  {score:+.4f}  {fnames[j]}")


if __name__ == "__main__":
    utils.cli.run(main)
